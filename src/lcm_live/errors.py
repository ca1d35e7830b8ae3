"""User-facing errors: one clear line that names the value and the fix, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, model that cannot be had).

    The CLI prints ``error: <message>`` and exits with status 2; the studio turns it into a JSON error.
    ``field`` names the offending parameter (diffusers' name) where there is one.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class ModelUnavailableError(UserError):
    """A hub model that cannot be had (offline, unreachable, not cached)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's name when it has no
    message): what a one-line error says about a library's failure."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
