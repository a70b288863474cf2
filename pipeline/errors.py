"""The one base class of every error arra-pipe raises on purpose: bad input, options or files.

The CLI prints such an error as one line (no traceback); anything else is a bug and keeps its
traceback. It is a ValueError so that callers of the library that catch ValueError still work."""


class ArraError(ValueError):
    """An input, option or file that cannot be used, with a message that names it."""
