"""Where featcal keeps what it builds or trains (the C++ extension, the demo's models)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def user_cache_dir() -> Path:
    """$FEATCAL_CACHE_DIR, else the platform's user cache: $XDG_CACHE_HOME/featcal (default
    ~/.cache/featcal), ~/Library/Caches/featcal on macOS, %LOCALAPPDATA%/featcal/Cache on Windows."""
    if os.environ.get("FEATCAL_CACHE_DIR"):
        return Path(os.environ["FEATCAL_CACHE_DIR"]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "featcal" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "featcal"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "featcal"
