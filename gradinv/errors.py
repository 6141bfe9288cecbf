"""The one exception type that means "the user's input is wrong" (CLI exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a params value, a file, a folder. The message is one sentence."""
