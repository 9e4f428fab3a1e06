"""Shared report helper of the benchmark scripts: append one section to docs/benchmarks.md.

    import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import publish
    publish("Cached vs online teacher", table_lines, "RATIO online/cached = 12.3x")  # print, append, print

Every section records the date (UTC), the machine (CPU model from /proc/cpuinfo, cores, RAM),
the python / torch / spconv / zarr versions, the device and the command line, then the lines
the script gives (a markdown table and notes) and the headline ratio line.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Sections are appended by the scripts in `benchmarks/` (see `benchmarks/README.md`), newest last.
Each records the machine, the library versions and the exact command; numbers from different
machines are not comparable. With no CLIP weights available offline the MaskCLIP teacher runs
with random weights (`TeacherConfig(model="ViT-B-16", weights="none")`): the timings are those of
the real architecture, the features themselves are meaningless.
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _version(module: str, dists: tuple[str, ...] = ()) -> str:
    import importlib
    import importlib.metadata as md

    for d in dists:
        try:
            return f"{md.version(d)} ({d})"
        except md.PackageNotFoundError:
            continue
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report what is missing, never fail the benchmark
        return f"not importable ({type(e).__name__})"


def _spconv_version() -> str:
    import importlib.metadata as md

    names = sorted({d.metadata["Name"] for d in md.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("spconv")})
    if names:
        return ", ".join(f"{md.version(n)} ({n})" for n in names)
    return _version("spconv")


def device_description(device: str | None = None) -> str:
    """'cpu (N torch threads)' or the CUDA device's name."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return f"{device}: {props.name} ({props.total_memory / 1024**3:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} torch threads; no GPU used)"


def _amx() -> bool:
    from clip2scene.precompute.teacher.precision import cpu_has_amx

    return cpu_has_amx()


def _malloc_tuned() -> bool:
    from clip2scene.runtime import tune_malloc

    return tune_malloc()  # idempotent: says whether this process runs with it


def machine_lines(device: str | None = None) -> list[str]:
    """The environment block of a report section (markdown bullet lines)."""
    import torch

    ram = _ram_gib()
    return [
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, "
        f"{f'{ram:.1f} GiB RAM' if ram is not None else 'RAM unknown'}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, spconv {_spconv_version()}, "
        f"zarr {_version('zarr')}",
        f"- device: {device_description(device)}",
        f"- CPU: AMX tiles {'yes' if _amx() else 'no'}; glibc malloc tuning (clip2scene.runtime) "
        f"{'on' if _malloc_tuned() else 'off'}",
        f"- load average (1/5/15 min) at report time: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"(other processes on this machine compete for the same cores)",
        f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
    ]


def append_report(title: str, lines: list[str], ratio_line: str, device: str | None = None,
                  path: Path | str | None = None) -> Path:
    """Append a section `title` with the environment block, `lines` and `ratio_line` to
    docs/benchmarks.md (created with a short header if missing). Returns the file's path."""
    path = Path(path) if path is not None else REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [] if path.exists() and path.stat().st_size else [_HEADER]
    parts.append(f"\n## {title}\n\n")
    parts.append("\n".join(machine_lines(device)) + "\n")
    if lines:
        parts.append("\n" + "\n".join(lines).rstrip() + "\n")
    parts.append(f"\n**{ratio_line}**\n")
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(parts))
    return path


def publish(title: str, lines: list[str], ratio_line: str, report: bool = True, device: str | None = None) -> None:
    """A script's ending: print the table lines, append them to docs/benchmarks.md unless
    `report` is false (--no-report), and print the RATIO line last."""
    print("\n".join(lines))
    if report:
        append_report(title, lines, ratio_line, device=device)
    print(ratio_line)
