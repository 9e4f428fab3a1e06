"""Option checks shared by every config dataclass (precompute, train, finetune, evaluate).

Each raises :class:`~clip2scene.errors.ConfigError` with one line that names the option as the CLI
spells it (``--lr``) and the offending value, so a dataclass's ``__post_init__`` is the single
place where an option's valid range is written down. Pure Python: both stages import it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Iterable

from clip2scene.errors import ConfigError


def option(name: str) -> str:
    """The CLI spelling of a config field: ``batch_size`` -> ``--batch-size`` (``--x`` stays)."""
    return name if name.startswith("--") else "--" + name.replace("_", "-")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, maximum: int | None = None, allow_none: bool = False,
              note: str = "") -> None:
    """`value` is an integer in [minimum, maximum] (no upper bound when None), or None when allowed;
    `note` is appended to the message (e.g. " (0 = off)")."""
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        want = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{option(name)} {value!r}: must be an integer {want}{note}")


def check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = False, allow_none: bool = False) -> None:
    """`value` is a finite number in the interval [low, high] (open ends where asked), or None
    when allowed. NaN and +-inf are always refused."""
    if value is None and allow_none:
        return
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if high is None:
            rule = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{option(name)} {value!r}: must be a finite number {rule}")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{option(name)} {value!r}: expected one of {', '.join(choices)}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{option(name)} {value!r}: expected true or false")


def paths_to_text(config, *names: str) -> None:
    """In a frozen dataclass's __post_init__: os.PathLike values of `names` become str (the
    fields are declared str; config.json and checkpoints store them as text)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))


def check_text(name: str, value, allow_none: bool = False) -> None:
    """A non-empty string (paths, split names)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option(name)} {value!r}: expected a non-empty string")


def opt(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, flag: str | None = None,
        cli: bool = True, parse: str | None = None, none: str | None = None):
    """A config dataclass field that is also a command-line option (clip2scene.options builds the
    typer options and reads --config files from these fields).

    help: the option's --help text. flag: its CLI spelling when it differs from the field name
    (``--clip-model`` for TeacherConfig.model). cli=False: settable from a --config file and the
    library only, no flag. parse: name of the text parser of a tuple field (``"hw"`` 224x416,
    ``"window"`` N or HxW, ``"widths"`` 9 comma-separated integers). none: the word that means
    None on the command line (``"none"`` for --eval-split none)."""
    metadata = {"help": help, "flag": flag, "cli": cli, "parse": parse, "none": none}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# help texts shared by the fields of several configs (train and finetune guard rails, storage)
STORAGE_HELP = "fsspec option for a cache URL, key=value (repeatable), e.g. client_kwargs.endpoint_url=http://host:9000."
WARMUP_HELP = "Linear warm-up steps before the cosine (default: half the first epoch, at most 300; 0 = off)."
CLIP_HELP = "Clip the total gradient L2 norm to this (default off; the norm is logged in metrics.jsonl every step)."
SCALING_HELP = "How learning rates follow --batch-size / --reference-batch: linear, sqrt or none."
DIV_FACTOR_HELP = "A step's loss above this x the running median is reported as a divergence."
DIV_WINDOW_HELP = "Steps in the running median of the divergence check."
STOP_HELP = "Stop (exit 2) at the first divergence, keeping the last good epoch's checkpoint."


def check_installed(name: str, value, module: str) -> None:
    """A true `value` (e.g. ``wandb=True``) needs the package `module` to be importable."""
    check_bool(name, value)
    if value:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{option(name)}: the {module} package is not installed (pip install {module}), "
                              f"or leave {option(name)} out")
