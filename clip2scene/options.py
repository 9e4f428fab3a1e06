"""Command-line options and --config files, both made from the config dataclasses' fields.

Every option of `train`, `finetune`, `linear-probe`, `evaluate` and `precompute` is a field of
its config dataclass (TrainConfig + ModelConfig, FinetuneConfig, EvalConfig, PrecomputeConfig +
TeacherConfig), declared with :func:`clip2scene.validation.opt`: default, help text, and where
needed the flag's spelling, a text parser or the word that means None. This module turns those
fields into typer options (:func:`options_for`, :func:`with_options`) and reads `--config` files
whose keys are the field names (:func:`read_config`); :func:`build` merges file and command line
(the command line wins) into one nested dict of field values. The dataclasses validate.

Type -> option: bool -> ``--x/--no-x``; int, float, str, Path -> one value; ``X | None`` -> an
optional value (the field's ``none`` word, e.g. ``none``, also means None); a tuple -> its text
form (``224x416``, ``448``, ``32,32,...``) read by the field's parser; ``storage_options`` (a
dict) -> the repeatable ``--storage-option key=value``; a nested config dataclass (model,
teacher) -> its own fields' options, flat (``--arch``, ``--clip-model``).

Config files: TOML (``tomllib``) or JSON (the ``config.json`` a train / finetune run writes),
keys = field names, nested configs as tables (``[model]``, ``[teacher]``); a bare name such as
``demo`` is a preset of ``clip2scene/configs/``. Every problem is a one-line ConfigError naming
the file (and the key).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer 0.29 vendors click: its own classes
from typer.core import TyperGroup

from clip2scene.errors import ConfigError

PRESETS = Path(__file__).resolve().parent / "configs"

# keys of a run's config.json that record the run rather than choose an option: ignored when it is
# read back with --config ("schedule": the resolved learning-rate set-up; "resume"/"overwrite":
# how that run was started, not its recipe)
RUN_RECORDS = ("schedule", "resume", "overwrite")


# ------------------------------------------------------------------------ text forms of tuples
def parse_hw(flag: str, value: str) -> tuple[int, int]:
    """``224x416`` -> (224, 224) ... (H, W); ConfigError naming the option otherwise."""
    try:
        h, w = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected HxW, e.g. 224x416") from None
    return h, w  # positive multiples of the patch: TeacherConfig / load_teacher


def parse_window(flag: str, value: str) -> tuple[int, int]:
    """--window / --stride: ``N`` (square) or ``HxW`` pixels."""
    try:
        parts = [int(v) for v in str(value).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"{flag} {value!r}: expected a positive size in pixels, N or HxW (e.g. 448 or 448x896)")
    return parts[0], parts[1]


def parse_widths(flag: str, value: str) -> tuple[int, ...]:
    """``32,32,64,...`` -> a tuple of ints (ModelConfig checks there are 9)."""
    try:
        return tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected 9 comma-separated integers") from None


PARSERS: dict[str, Callable[[str, str], tuple]] = {"hw": parse_hw, "window": parse_window, "widths": parse_widths}
FORMATS: dict[str, Callable[[tuple], str]] = {"hw": lambda v: "x".join(map(str, v)),
                                              "window": lambda v: "x".join(map(str, v)),
                                              "widths": lambda v: ",".join(map(str, v))}


# ------------------------------------------------------------------------ fields -> options
@dataclass(frozen=True)
class Opt:
    """One command-line option made from a config field."""

    param: str  # Python name in the command's signature (clip_model, storage_option)
    path: tuple[str, ...]  # field path in the config: ("teacher", "model")
    flag: str  # --clip-model
    annotation: Any  # the type typer parses
    default: Any  # what --help shows (the field's default, in its text form)
    help: str
    kind: str  # "plain", "bool", "parse", "storage"
    parse: Optional[str] = None
    none: Optional[str] = None

    def typer_option(self, required: bool = False):
        decls = [f"{self.flag}/--no-{self.flag[2:]}"] if self.kind == "bool" else [self.flag]
        if required:
            return typer.Option(None, *decls, help=self.help + " [required]", show_default=False)
        return typer.Option(self.default, *decls, help=self.help)

    def value(self, text):
        """The field value of what the command line gave (ConfigError for bad text)."""
        if self.none is not None and text == self.none:
            return None
        if self.kind == "parse" and text is not None:
            return PARSERS[self.parse](self.flag, text)
        if self.kind == "storage":
            from clip2scene.storage import parse_storage_options

            return parse_storage_options(text)
        if isinstance(text, Path):
            return str(text)
        return text


def hints(cls) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass."""
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(X, True) for ``X | None`` / Optional[X]; (tp, False) otherwise. ``Path | str`` -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return str, optional  # Path | str: the text
    return tp, False


def _default(f: dataclasses.Field, parent_default=None):
    if parent_default is not None:
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def options_for(cls, *, exclude: tuple[str, ...] = (), defaults: Optional[dict] = None, prefix: tuple = (),
                parent_default=None) -> list[Opt]:
    """The options of config dataclass `cls`: every field with metadata cli=True, nested config
    dataclasses flattened, `exclude` (field names, also nested ones) left out. `defaults`: field
    name -> the default --help shows instead of the field's (a CLI that computes it)."""
    defaults = defaults or {}
    out: list[Opt] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", bool(meta.get("help"))) or f.name in exclude:  # field(metadata={"help": ...}) too
            continue
        tp, optional = _unwrap_optional(hints(cls)[f.name])
        default = _default(f, parent_default)
        if dataclasses.is_dataclass(tp):
            nested = default if default is not dataclasses.MISSING and default is not None else None
            out += options_for(tp, exclude=exclude, defaults=defaults, prefix=prefix + (f.name,), parent_default=nested)
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        param = flag[2:].replace("-", "_")
        shown = defaults.get(f.name, default)
        if shown is dataclasses.MISSING:
            shown = None
        common = dict(param=param, path=prefix + (f.name,), flag=flag, help=meta.get("help", ""),
                      none=meta.get("none"))
        if tp is bool:
            out.append(Opt(annotation=bool, default=shown, kind="bool", **common))
        elif tp is dict:
            out.append(Opt(annotation=Optional[list[str]], default=None, kind="storage", **common))
        elif meta.get("parse"):
            text = FORMATS[meta["parse"]](shown) if shown is not None else None
            out.append(Opt(annotation=Optional[str], default=text, kind="parse", parse=meta["parse"], **common))
        else:
            if common["none"] is not None:  # --eval-split none: the word is the text of None
                shown = common["none"] if shown is None else shown
                optional = False
            ann = Optional[tp] if optional or shown is None else tp
            out.append(Opt(annotation=ann, default=shown, kind="plain", **common))
    return out


def lazy_options(make: Callable[[], list[Opt]], required: tuple[str, ...] = ()):
    """Decorator: the typer command gets the options `make()` returns (after its own parameters;
    its own parameter of the same name wins) and takes them as ``**options``. `make` imports the
    config dataclasses (torch, spconv: seconds), so it runs only when :class:`LazyGroup` builds
    the command to run it or show its --help, never for ``clip2scene --help`` or another command.
    `required`: params that must be given, on the command line or in --config (:func:`build`)."""

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=own)

        def complete() -> None:
            names = {p.name for p in own}
            opts = [o for o in make() if o.param not in names]
            extra = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                                       default=o.typer_option(required=o.param in required)) for o in opts]
            fn.__signature__ = sig.replace(parameters=own + extra)
            fn.__options__ = opts
            fn.__required__ = required
            fn.__complete__ = None

        fn.__complete__ = complete
        return fn

    return deco


class _OneLineUsageError(UsageError):
    """A command-line value click cannot parse (``--epochs x``), shown as the one ``error:`` line
    every other failure prints (click's own shows usage + hint + error), exit code 2."""

    def show(self, file=None) -> None:
        typer.echo(f"error: {self.format_message()}", err=True)


class LazyGroup(TyperGroup):
    """A typer group whose commands made with :func:`lazy_options` get their generated options
    when they are looked up to run (or to show their own --help). Usage errors of its commands
    (a bad value, an unknown option or command) are one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (NoArgsIsHelpError, _OneLineUsageError):
            raise
        except UsageError as e:
            raise _OneLineUsageError(e.format_message(), ctx=e.ctx) from None

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        fn = getattr(getattr(cmd, "callback", None), "__wrapped__", None)
        if getattr(fn, "__complete__", None) is not None:
            fn.__complete__()
            from typer.main import get_command_from_info
            from typer.models import CommandInfo

            cmd = get_command_from_info(CommandInfo(name=name, callback=fn), pretty_exceptions_short=False,
                                        rich_markup_mode=None)
            self.commands[name] = cmd
        return cmd

    def format_commands(self, ctx, formatter) -> None:
        """The command list of --help from the unbuilt commands (their docstrings): no imports."""
        rows = [(name, self.commands[name]) for name in self.list_commands(ctx) if not self.commands[name].hidden]
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


# ------------------------------------------------------------------------ config files
def resolve_config_path(name: str) -> Path:
    """A --config value -> the file: a path, or a bare preset name (``demo``) of clip2scene/configs/
    (a folder of that name, e.g. the ``demo/`` that `make demo` writes, does not hide the preset)."""
    path = Path(name)
    if not path.is_file() and path.suffix == "" and os.sep not in name and (PRESETS / f"{name}.toml").is_file():
        return PRESETS / f"{name}.toml"
    return path


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def read_file(path: Path) -> dict:
    """The table in a TOML or JSON file (ConfigError naming the file when it cannot be read)."""
    import tomllib

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(presets())
        raise ConfigError(f"--config {path}: file not found (or a preset name: {known})") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected TOML, or a run's config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options, got {type(data).__name__}")
    return data


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}


def _check_value(path: Path, key: str, tp, value, meta):
    """A file value -> the field value, or ConfigError naming file and key for a wrong type."""
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:  # JSON null
        return None
    if meta.get("none") is not None and value == meta["none"]:
        return None
    if meta.get("parse") and isinstance(value, str):
        try:
            return PARSERS[meta["parse"]](key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    origin = typing.get_origin(tp)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp in (str, Path):
        ok = isinstance(value, str)
    elif tp is dict:
        ok = isinstance(value, dict)
    elif origin is tuple or tp is tuple:
        ok = isinstance(value, list)
        if ok:
            return _to_tuple(value)
    else:
        ok = True  # anything else: the dataclass checks it
    if not ok:
        want = _TYPE_WORDS.get(tp) or ("a list" if origin is tuple else str(tp))
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        raise ConfigError(f"{path}: {key} = {shown}: expected {want}")
    return value


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _to_tuple(value):
    return tuple(_to_tuple(v) if isinstance(v, list) else v for v in value)


def check_table(path: Path, cls, data: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> dict:
    """Check a file's table against config dataclass `cls`: known keys (nested tables for nested
    configs), values of the field's type. Returns {field: value} with nested dicts for nested
    configs. `skip`: keys ignored (run records of a config.json)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = hints(cls)
    out: dict = {}
    for key, value in data.items():
        name = prefix + key
        if key in skip:
            continue
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {name!r} (keys are the option names with _ for -, "
                              f"e.g. {prefix}{next(iter(fields))})")
        tp, _ = _unwrap_optional(types_[key])
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {name} = {value!r}: expected a table ([{name}])")
            out[key] = check_table(path, tp, value, prefix=name + ".")
        else:
            out[key] = _check_value(path, name, types_[key], value, fields[key].metadata)
    return out


def read_config(name: Optional[str], cls) -> tuple[Optional[Path], dict]:
    """(path, nested field values) of a --config FILE for config dataclass `cls`; (None, {}) without one."""
    if name is None:
        return None, {}
    path = resolve_config_path(name)
    data = read_file(path)
    skip = RUN_RECORDS if path.suffix.lower() == ".json" else ()
    return path, check_table(path, cls, data, skip=skip)


# ------------------------------------------------------------------------ merging
def given_params(ctx: typer.Context) -> set[str]:
    """Names of the command's parameters that the user gave (command line or environment)."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def build(opts: list[Opt], values: dict, given: set[str], file_values: dict, required: tuple[str, ...] = (),
          config_path: Optional[Path] = None) -> dict:
    """Nested field values: the file's, then every option given on the command line (parsed).
    Options given nowhere are left out (the dataclass default applies). ConfigError for a
    `required` option given nowhere."""
    tree = _copy(file_values)
    for o in opts:
        if o.param in given:
            _set(tree, o.path, o.value(values[o.param]))
    for o in opts:
        if o.param in required and not _has(tree, o.path):
            key = ".".join(o.path)
            where = f" or set {key} in {config_path}" if config_path else f" (or set {key} in a --config file)"
            raise ConfigError(f"missing option {o.flag}: give it{where}")
    return tree


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def given_fields(tree: dict) -> set[str]:
    """Field names set in a nested tree, nested ones by their own name (for `resumed_config`)."""
    out = set()
    for key, value in tree.items():
        out.add(key)
        if isinstance(value, dict) and key != "storage_options":
            out |= given_fields(value)
    return out


def make_config(cls, tree: dict):
    """`cls(**tree)` where a nested config given as a dict of some of its fields (model, teacher,
    simulated) starts from the field's default (TrainConfig's model is an SPVCNN)."""
    kwargs = dict(tree)
    for f in dataclasses.fields(cls):
        value = kwargs.get(f.name)
        if isinstance(value, dict) and f.name != "storage_options" and f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = dataclasses.replace(f.default_factory(), **value)
    return cls(**kwargs)


def blame_file(err: ConfigError, config_path: Optional[Path], file_values: dict, opts: list[Opt],
               given: set[str]) -> ConfigError:
    """A dataclass's ConfigError about a value that came from the --config file (not the command
    line) -> the same line naming the file."""
    if config_path is None:
        return err
    message = str(err)
    first = message.split(" ", 1)[0].rstrip(":")
    typed = {o.flag for o in opts if o.param in given}
    if first in typed:
        return err

    def leaves(tree: dict, prefix: tuple = ()):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "storage_options":
                yield from leaves(value, prefix + (key,))
            else:
                yield prefix + (key,)

    flags = {o.path: o.flag for o in opts}
    for path in leaves(file_values):
        name = path[-1]
        if first in (flags.get(path), "--" + name.replace("_", "-"), name):
            return ConfigError(f"{message} (set by {'.'.join(path)} in {config_path})")
    return err
