"""The one exception type that user-facing code turns into a one-line error message."""


class CtwinError(Exception):
    """Bad input or an impossible request. The message is one line, meant for the user."""
