"""The one exception type users see: a message that names the problem and the fix."""


class UserError(Exception):
    """Bad input or a bad flag. The CLI prints the message (no traceback) and exits with 2."""
