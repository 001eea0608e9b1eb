"""Where unskill keeps what it can rebuild: assembled GGUF models, per-item eval results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$UNSKILL_CACHE, else ~/.cache/unskill."""
    return Path(os.environ.get("UNSKILL_CACHE", Path.home() / ".cache" / "unskill"))
