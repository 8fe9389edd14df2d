"""The one exception type that the command line turns into `error: ...` and exit code 2."""


class ScmmError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


EXIT_STOPPED = 3  # a training launch that stopped early on request, with a complete checkpoint: rerun with --resume


class TrainingStopped(Exception):
    """A trainer stopped on SIGUSR1/SIGTERM or ``train.max_wall_time`` after a complete checkpoint; the command
    line reports it in one line and exits with :data:`EXIT_STOPPED` (a scheduler resubmits with ``--resume``)."""


class Terminated(BaseException):
    """SIGTERM, raised where the command runs so that, as with Ctrl-C, its temporary output is removed on the way
    out (a BaseException: no ``except Exception`` of the command swallows it)."""
