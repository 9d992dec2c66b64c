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


def whole_number(value: object, minimum: int, not_int: str, too_small: str) -> int:
    """``int(value)`` for a command-line number, or a UserError: ``not_int`` when it is no integer,
    ``too_small`` (``{n}`` is the number) when it is below ``minimum``."""
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UserError(not_int) from None
    if n < minimum:
        raise UserError(too_small.format(n=n))
    return n
