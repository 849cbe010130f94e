"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user (unknown name, missing file, bad config): reported as one line, no traceback."""


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """An exception's message cut to its first line (and to `limit` characters), for one-line errors; its type's
    name when it has no message."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if limit is None or len(line) <= limit else line[:limit] + "..."
