"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class FaceclsError(Exception):
    """A mistake the user can fix (bad path, bad recipe, missing weights, ...).

    The message must say what is wrong and what to do about it.
    """


def list_for_error(names: list[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are: a list inside a one-line
    message."""
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): a library's failure, in one
    line of a log or an error message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class Stopped(FaceclsError):
    """A run stopped on request (SIGINT, SIGTERM) with its progress saved: the CLI prints the message
    (how to resume) on one line and exits with 128 + the signal number (130, 143), as a shell does."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
