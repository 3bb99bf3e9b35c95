"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class CrbpError(Exception):
    """Base class: a problem with the user's input, files or options, not a bug."""


class ConfigError(CrbpError, ValueError):
    """A configuration has unknown keys or invalid values."""


class CheckpointError(CrbpError):
    """A checkpoint file is missing, corrupt, unsafe or does not match its architecture."""


class InputError(CrbpError, ValueError):
    """Images or run options (iterations, tolerance, ...) are not acceptable."""
