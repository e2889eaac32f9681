"""Exceptions whose message is one line naming the cause and the fix.

The command-line entry points catch :class:`OODError`, print ``error: <message>`` and exit
with status 2, so a user never sees a traceback for bad input.
"""

from __future__ import annotations


class OODError(Exception):
    """Base class of every error the plugin raises for bad input or bad state."""


class OODStateError(OODError):
    """Fitted OOD state is missing, corrupt or belongs to another model."""


class OODInputError(OODError):
    """Input images or arguments cannot be processed."""
