"""Errors that reach the user as one clear line.

Every error raised on purpose by selfsup derives from :class:`SelfSupError`; the CLI prints its
message (which names the file, config key or value at fault) instead of a traceback.
"""


class SelfSupError(Exception):
    """Base class of the errors that selfsup reports to the user as one line."""


class ConfigError(SelfSupError, ValueError):
    """A config key, command-line option or value is unknown, of the wrong type or out of range."""


class DataError(SelfSupError, ValueError):
    """A dataset, file or download is missing, corrupt or not what was asked for."""


class CheckpointError(SelfSupError, ValueError):
    """A checkpoint cannot be used: missing, corrupt, unsafe, or from another method/backbone."""
