"""Byte counts: read from text such as "12GiB", and written for people."""

from __future__ import annotations

import re

from .errors import FeatCalError

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {f"{u}b": v for u, v in list(_UNITS.items()) if u not in ("", "b")}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | float | None) -> int | None:
    """A memory size: a number of bytes, or a string like '12GiB', '12GB', '500MiB' (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise FeatCalError(f"cannot read memory size {value!r}: use bytes or a unit, e.g. 12GiB, 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: int) -> str:
    """A byte count for people: 1.50 GiB, 12.0 MiB, 300 B."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"
