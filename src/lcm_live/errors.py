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


# Optional packages that diffusers or torch import whenever they are installed: a broken one (built for another
# CUDA, too old for this torch) takes the whole engine down at `import diffusers`, far from its own name.
BROKEN_PACKAGE_FIXES = {
    "bitsandbytes": "pip install -U 'bitsandbytes>=0.45', or pip uninstall bitsandbytes (lcm-live needs it only for "
                    "--quantize int8|nf4 on CUDA)",
    "xformers": "reinstall xformers for this torch, or pip uninstall xformers (lcm-live uses torch's SDPA)",
}


def broken_optional_package(exc: BaseException) -> tuple[str, BaseException] | None:
    """The optional package (of :data:`BROKEN_PACKAGE_FIXES`) whose import raised ``exc`` or one of its causes (in
    the package's module-level code), with that cause; or None: an error raised by a call into the package (an
    out-of-memory in a kernel) is not a broken install. diffusers wraps an import failure in "Failed to import
    diffusers.loaders..."."""
    import traceback
    from pathlib import PurePath

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.name != "<module>":  # raised while importing (module-level code), not by a call into it
                continue
            parts = PurePath(frame.filename).parts
            for name in BROKEN_PACKAGE_FIXES:
                if name in parts:
                    return name, exc
        exc = exc.__cause__ or exc.__context__
    return None


def broken_package_message(exc: BaseException) -> str | None:
    """One line naming the broken optional package behind ``exc`` and its fix, or None when it is not one."""
    broken = broken_optional_package(exc)
    if broken is None:
        return None
    package, cause = broken
    return (f"the installed {package} fails to import ({first_line(cause)}), and diffusers imports it whenever it "
            f"is installed. Fix: {BROKEN_PACKAGE_FIXES[package]}")
