"""The one exception type a user is meant to read."""


class UserError(Exception):
    """Bad input or a state the user can fix.

    The CLIs print the message as a single line and exit with code 2, without a
    traceback. The message names the problem and the fix.
    """
