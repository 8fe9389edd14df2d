"""The one exception type that the command line turns into `error: ...` and exit code 2."""


class ScmmError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
