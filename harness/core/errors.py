"""Error kinds and their exit codes: the CLI turns these into one-line messages."""


class HarnessError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(HarnessError):
    """Bad input: unknown system/variant, invalid data or config, missing prerequisite."""

    exit_code = 2


class RunFailed(HarnessError):
    """A run started but did not complete (training crashed, was killed, ran out of memory)."""

    exit_code = 3
