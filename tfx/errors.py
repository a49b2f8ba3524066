"""Named tfx exceptions. The CLI prints one line for these and a traceback for anything else."""


class TfxError(Exception):
    """Base of every error the user can fix; the CLI prints `ClassName: message` and exits 2."""

    exit_code = 2


class ConfigError(TfxError):
    """A config key is missing, unknown, of the wrong type or out of range."""


class DataError(TfxError):
    """Shards are missing, empty, unevenly split or too corrupt to continue."""


class CheckpointError(TfxError):
    """A checkpoint is missing, incomplete, damaged, or was made by a different model config."""


class SetupError(TfxError):
    """The machine lacks something tfx needs (a C++ compiler, a package, a device)."""
