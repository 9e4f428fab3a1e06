"""Where a cache lives: a local folder or any fsspec URL (s3://, gs://, file://, memory://).

    loc = Location.parse("s3://bucket/c.zarr", {"endpoint_url": "http://127.0.0.1:5000"})
    loc.zarr_store(read_only=True)       # a zarr Store for zarr.open_group
    loc.write_json("manifest.json", {...})   # atomic: tmp + rename locally, one PUT on object stores
    loc.read_json("manifest.json")

`parse_storage_options(["key=value", ...])` turns CLI `--storage-option` values into a dict
(values "true"/"false"/numbers are converted; `client_kwargs.endpoint_url=...` nests).
`Lock` keeps two writers off one cache.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from clip2scene.errors import CacheError, ConfigError


def parse_storage_options(values: list[str] | None) -> dict:
    """CLI `key=value` strings -> fsspec storage options (dotted keys nest; true/false/ints/floats parsed)."""
    out: dict = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"--storage-option {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value: object = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def first_difference(key: str, a, b) -> tuple[str, object, object]:
    """The dotted name and both values of the first differing field of two settings: for dicts it
    descends to the differing sub-field (`teacher.image_size`), so a message names that field
    and not two whole dicts."""
    while isinstance(a, dict) and isinstance(b, dict):
        sub = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)
        if sub is None:
            break
        key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
    return key, a, b


def _remote_error_types() -> tuple[type, ...]:
    """Exception types of an unreachable or refusing object store (those installed)."""
    types: list[type] = [ConnectionError, TimeoutError, PermissionError]
    try:
        import botocore.exceptions as be

        types += [be.BotoCoreError, be.ClientError]  # NoCredentialsError, EndpointConnectionError, ...
    except ImportError:
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


def remote_error(url: str | None, e: BaseException) -> CacheError | None:
    """The one-line CacheError for a storage failure `e` at `url` (no credentials, dead endpoint,
    access denied), or None when `e` is something else."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, TypeError) and "unexpected keyword argument" in detail:  # s3fs/botocore at first use
        return CacheError(f"{url or 'cache storage'}: bad --storage-option ({detail})")
    if isinstance(e, CacheError) or not isinstance(e, _remote_error_types()):
        return None
    name = type(e).__name__
    if "credential" in name.lower() or "credential" in detail.lower():
        hint = ("no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws), or pass "
                "--storage-option key=... --storage-option secret=... (anon=true for a public bucket)")
    elif isinstance(e, PermissionError) or "denied" in detail.lower() or "forbidden" in detail.lower():
        hint = "access denied: check the credentials and the bucket's permissions"
    else:
        hint = "cannot reach the storage: check the URL, --storage-option client_kwargs.endpoint_url and the network"
    return CacheError(f"{url or 'cache storage'}: {hint} ({name}: {detail})")


class _RemoteErrors:
    """Context manager: storage failures of a remote location become one-line CacheErrors."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, FileNotFoundError):
            err = remote_error(self.url, exc)
            if err is not None:
                raise err from None
        return False


@dataclass(frozen=True)
class Location:
    """A cache root: `url` as the user gave it, its fsspec filesystem and path inside it."""

    url: str
    storage_options: dict = field(default_factory=dict)

    @staticmethod
    def parse(url: str | Path, storage_options: dict | None = None) -> "Location":
        return Location(str(url), dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    @property
    def local_path(self) -> Path:
        return Path(self.url[len("file://"):] if self.url.startswith("file://") else self.url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:
            return fsspec.filesystem("file")
        return self._url_to_fs()[0]

    def _url_to_fs(self):
        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as e:  # gs:// without gcsfs, ...
            raise CacheError(f"{self.url}: {str(e).splitlines()[0]}") from None
        except (TypeError, ValueError) as e:  # an option the filesystem does not take
            raise CacheError(f"{self.url}: bad --storage-option {self.storage_options} ({e})") from None

    @property
    def root(self) -> str:
        if self.is_local:
            return str(self.local_path.resolve())
        return self._url_to_fs()[1].rstrip("/")

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def zarr_store(self, read_only: bool = False):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(str(self.local_path), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                                 read_only=read_only)

    def _guard(self):
        """Remote storage failures (credentials, endpoint) -> CacheError naming the URL."""
        return _RemoteErrors(self.url)

    def exists(self, rel: str = "") -> bool:
        with self._guard():
            return self.fs.exists(self.key(rel))

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self._guard():
                return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            raise CacheError(f"{self.url}: missing {rel}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic replace: a reader sees the old or the new object, never a torn one."""
        if self.is_local:
            path = Path(self.key(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self._guard():
                self.fs.pipe_file(self.key(rel), data)  # one PUT: atomic on object stores

    def read_json(self, rel: str) -> dict:
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CacheError(f"{self.url}/{rel}: not valid JSON ({e.msg.rstrip(': ')}: line {e.lineno} column {e.colno})") from None

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def remove(self, rel: str) -> None:
        """Delete a file or a whole prefix, if present."""
        k = self.key(rel)
        with self._guard():
            if self.fs.exists(k):
                self.fs.rm(k, recursive=True)

    def list_files(self, rel: str) -> list[str]:
        """Every object under `rel` as paths relative to the cache root (sorted)."""
        base = self.key(rel)
        if not self.exists(rel):
            return []
        root = self.root + "/"
        out = []
        with self._guard():
            found = self.fs.find(base)
        for p in found:
            out.append(p[len(root):] if p.startswith(root) else p.split(root, 1)[-1])
        return sorted(out)

    def checksums(self, rel: str) -> dict[str, str]:
        """sha256 of every object under `rel` (keys relative to the root)."""
        return {f: hashlib.sha256(self.read_bytes(f)).hexdigest() for f in self.list_files(rel)}


class Lock:
    """One writer per cache: an exclusive `writer.lock` object at the cache root.

    Locally the file is created by an exclusive hard link of a fully written temp file; a lock left by a dead process on this host (pid
    gone) is taken over. On object stores creation is check-then-put and read-back (best effort:
    object stores have no exclusive create), which still stops a second writer that starts while
    the first runs.
    """

    NAME = "writer.lock"

    def __init__(self, loc: Location):
        self.loc = loc
        self.token = dict(host=socket.gethostname(), pid=os.getpid(), user=getpass.getuser(),
                          since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), id=uuid.uuid4().hex)
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.loc.read_bytes(self.NAME))
        except (CacheError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def acquire(self) -> None:
        data = json.dumps(self.token).encode()
        for _ in range(2):
            if self.loc.is_local:
                path = Path(self.loc.key(self.NAME))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{self.NAME}.{self.token['id']}")
                tmp.write_bytes(data)
                try:  # link() is an exclusive create that appears with its content: never an empty lock
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                else:
                    self.held = True
                    return
                finally:
                    tmp.unlink()
            elif not self.loc.exists(self.NAME):
                self.loc.write_bytes(self.NAME, data)
                if (self._holder() or {}).get("id") == self.token["id"]:
                    self.held = True
                    return
            holder = self._holder() or {}
            if holder and self._stale(holder):
                self.loc.remove(self.NAME)
                continue
            raise self._busy(holder)
        raise CacheError(f"{self.loc.url}: could not take the writer lock")

    def _busy(self, holder: dict) -> CacheError:
        return CacheError(
            f"{self.loc.url} is being written by {holder.get('user', '?')}@{holder.get('host', '?')} "
            f"pid {holder.get('pid', '?')} since {holder.get('since', '?')}; wait for it, or delete "
            f"{self.loc.url}/{self.NAME} if that process is gone")

    def check_free(self) -> None:
        """CacheError if a live writer holds the lock (a stale one is ignored); takes nothing.

        Lets a writer refuse before any expensive work (loading a teacher); `acquire` still
        decides, so a writer that starts in between is refused there."""
        if not self.loc.exists(self.NAME):
            return
        holder = self._holder()
        if holder and not self._stale(holder):
            raise self._busy(holder)

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("id") == self.token["id"]:
            self.loc.remove(self.NAME)
        self.held = False

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def node_name() -> str:
    return f"{getpass.getuser()}@{platform.node()}"
