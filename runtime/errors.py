"""The one exception type users see: its message is a single line naming the file and the problem."""


class UnskillError(Exception):
    """Bad input or a broken artifact. The CLI prints `error: <message>` and exits 2."""
