"""The one exception type a user should ever see: it carries a message, never a traceback."""


class RecsysError(Exception):
    """A problem with the user's input or environment, explained in plain words.

    The CLI prints ``str(error)`` and exits non-zero; everything else is a bug.
    """
