"""Errors the CLI turns into one clear line and a non-zero exit (no traceback).

Library code raises these with a message that names the offending file or value; anything
else escaping to the CLI is a bug and keeps its traceback.
"""


class Clip2SceneError(Exception):
    """Base class: a user-facing problem with input, configuration or a cache."""


class DataError(Clip2SceneError):
    """A dataset file or table is missing or malformed (the message names the file)."""


class CacheError(Clip2SceneError):
    """A cache is missing, incomplete, of another schema, or incompatible with a checkpoint."""


class ConfigError(Clip2SceneError, ValueError):
    """An option has a value we cannot use (the message names the option and value).

    Raised by the config dataclasses' `__post_init__` (every option is validated there, once);
    also a ValueError, so library callers that catch ValueError for bad arguments still do."""


class TrainingError(Clip2SceneError):
    """Training cannot go on (a non-finite loss or weights); the message names the step and says
    which checkpoint is the last good one. Nothing non-finite is ever written as a checkpoint."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long command (train, finetune); the message says how to continue, e.g. the
    checkpoint that `--resume` takes. A KeyboardInterrupt, so callers that catch that still do."""
