"""How much memory the machine has free now: the default size of the target's memory budget."""

from __future__ import annotations

import os
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def available_memory_bytes() -> int:
    """Memory a new allocation can take without swapping: Linux's MemAvailable (free memory plus
    reclaimable caches), else the physical memory where /proc is absent."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
