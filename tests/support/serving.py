"""Reading what a model server answers."""

from __future__ import annotations

import json


def strict_json(text: str | bytes):
    """JSON as the standard defines it: Python's json module would otherwise accept bare NaN and Infinity."""
    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)
