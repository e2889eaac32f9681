"""Reading the plugin's JSON documents with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def read_json(path: str, error: Callable[[str], Exception]) -> Any:
    """The content of a JSON file; an unreadable or malformed file raises ``error(reason)``, which names the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(str(e)) from None


def read_optional_json_object(path: str) -> dict[str, Any]:
    """A JSON object from ``path`` where it is only a help: ``{}`` when the file is missing, unreadable, malformed
    or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
