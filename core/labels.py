"""Labels and hashes of settings: what names a variant (``prob_l2d[estep=meanfield]``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_value(value: Any) -> str:
    """A compact text form of a setting's value for labels."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def variant_label(name: str, settings: Mapping[str, Any]) -> str:
    """``name`` or ``name[key=value,...]`` (keys sorted)."""
    if not settings:
        return name
    return f"{name}[{','.join(f'{k}={format_value(v)}' for k, v in sorted(settings.items()))}]"
