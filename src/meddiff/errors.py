"""User-facing errors: raised anywhere, printed as one line by the CLI (no traceback)."""


class MeddiffError(Exception):
    """A problem the user can fix; the message names the problem and what to do."""
