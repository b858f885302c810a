"""cltrace's cache folder, where the default model's dequantised copy, the default corpus and the
default transcoder are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CLTRACE_CACHE, else $XDG_CACHE_HOME/cltrace, else ~/.cache/cltrace."""
    if os.environ.get("CLTRACE_CACHE"):
        return Path(os.environ["CLTRACE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cltrace"
