"""The one exception type users see: a sentence that says what was wrong and what to do."""


class BtDeployError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits 2, with no traceback."""
