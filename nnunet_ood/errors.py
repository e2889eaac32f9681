"""Exceptions whose message is one line naming the cause and the fix.

The command-line entry points catch :class:`OODError`, print ``error: <message>`` and exit
with status 2, so a user never sees a traceback for bad input.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class OODError(Exception):
    """Base class of every error the plugin raises for bad input or bad state."""


class OODStateError(OODError):
    """Fitted OOD state is missing, corrupt or belongs to another model."""


class OODInputError(OODError):
    """Input images or arguments cannot be processed."""


def one_line_errors(main: F) -> F:
    """Run a command-line main so that bad input ends with ``error: <one line>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OODError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
