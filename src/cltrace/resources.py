"""What the machine has to spare, for refusing work up front that would not fit."""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """The memory the kernel says is available now (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


__all__ = ["available_memory_bytes"]
