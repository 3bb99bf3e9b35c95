"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class CrbpError(Exception):
    """Base class: a problem with the user's input, files or options, not a bug."""


class ConfigError(CrbpError, ValueError):
    """A configuration has unknown keys or invalid values."""


class CheckpointError(CrbpError):
    """A checkpoint file is missing, corrupt, unsafe or does not match its architecture."""


class InputError(CrbpError, ValueError):
    """Images or run options (iterations, tolerance, ...) are not acceptable."""


class RequestError(InputError):
    """A request the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class DatasetError(CrbpError):
    """A dataset file is missing, unreadable or inconsistent with its annotations."""


class ServerError(CrbpError):
    """The server answered with an error status; `status` and `body` are its answer."""

    def __init__(self, status: int, body: dict):
        import json

        message = body.get("message") or body.get("error") or json.dumps(body)[:300]
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.body = body


class Overloaded(RequestError):
    """The server refuses a request it cannot serve in time (503) or a client over its share (429);
    `retry_after_s` goes into the Retry-After header."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float = 1.0):
        super().__init__(message, status)
        self.retry_after_s = retry_after_s
