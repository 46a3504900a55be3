"""What went wrong, in one line: the telling message of an exception chain (a bad input, a bad model
file, else the root cause). Stored in a failed volume's record and sent in HTTP errors."""

from __future__ import annotations

from lib.networks import CheckpointError
from lib.transforms.checks import InputError


def exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_error(exc: BaseException) -> str:
    """The most telling message in an exception chain: an input problem first, else the root cause.

    MONAI's Compose wraps every failure in "applying transform ..."; the cause underneath is what a
    user needs to read.
    """
    chain = list(exception_chain(exc))
    for e in chain:
        if isinstance(e, (InputError, CheckpointError)):
            return str(e)
    for e in reversed(chain):
        if str(e):
            return f"{type(e).__name__}: {e}"
    return type(exc).__name__
