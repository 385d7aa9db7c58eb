"""The one exception type for user errors.

A `VitkitError` carries a message that names what is wrong and what to do about it. The CLI prints
it on one line and exits with status 2, without a traceback; anything else is a bug and keeps its
traceback.
"""


class VitkitError(Exception):
    """A problem with the user's input (path, file, option, data), explained in its message."""
