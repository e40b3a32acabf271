"""The one exception a user can cause."""


class UserError(Exception):
    """An error the user can fix (bad flag, missing data, unreachable handle).

    The CLI prints its message as one line and exits non-zero, without a traceback.
    The message must say what to do.
    """
