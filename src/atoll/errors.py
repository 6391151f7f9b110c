"""The one exception type for mistakes a user can fix (bad config, missing file, wrong flag).

The CLI prints its message as a single line and exits non-zero, with no traceback; every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; the message names the input and the fix."""
