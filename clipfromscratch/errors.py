"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user (unknown name, missing file, bad config): reported as one line, no traceback."""
