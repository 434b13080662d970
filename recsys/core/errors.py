"""The one exception type a user should ever see: it carries a message, never a traceback."""


class RecsysError(Exception):
    """A problem with the user's input or environment, explained in plain words.

    The CLI prints ``str(error)`` and exits non-zero; everything else is a bug.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of a library's exception for a one-line ``RecsysError``: its first line, cut at
    ``limit`` characters (polars and MLflow put whole query plans and stack dumps below it)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
