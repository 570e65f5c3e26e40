"""How many worker processes: every core for the cache build, what the feed rate needs for a loader.

Re-exported by :mod:`retino.data.loaders`; a module of its own to keep that one readable.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("retino.data")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a container sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Feeding a GPU from the cache: worker processes fed 1,700-2,400 images/s at 512 px on an H200 box,
# rows or batches, 2 or 4 of them (bench/feed.py: each batch crosses processes through fresh shared
# memory and is pinned again), where one process read 16,000-19,000 (BENCHMARKS.md, "Feed"). So
# "auto" is none: a thread of the training process reads ahead into pinned memory (data/feeder.py).
LOADER_WORKERS_CACHED = 0


def resolve_workers(requested: int | str | None, *, purpose: str, device_type: str = "cpu", cached: bool = True,
                    local_world: int = 1) -> int:
    """Worker processes for building the cache (``purpose="cache"``) or for a loader (``"loader"``).

    ``"auto"``: the cache build gets every usable core (its share of them when ``local_world`` ranks
    build on one machine). A loader reading the cache gets none: on a CPU device it is read in the
    training process, and feeding a GPU a thread of that process reads ahead into pinned memory
    (:data:`LOADER_WORKERS_CACHED`, a rule from bench/feed.py's figures rather than a measurement
    at start-up, which would cost seconds and vary with the machine's load). Decoding per image
    (no cache) needs many: every core but the training process's on a GPU, half of them on a CPU
    device (the model needs the rest). An explicit number above twice the usable cores is lowered
    to that, with one warning line (32 workers took 3 GB on 2 cores and fed nothing faster; issue 15).

    Raises:
        ValueError: not a whole number >= 0 or "auto".
    """
    if purpose not in ("cache", "loader"):
        raise ValueError(f"Invalid purpose {purpose!r}. Choose one of: cache, loader.")
    cores = usable_cores()
    mine = max(1, cores // max(1, local_world))
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        if purpose == "cache":
            return mine
        if device_type == "cpu":
            return 0 if cached else max(1, mine // 2)
        return LOADER_WORKERS_CACHED if cached else max(1, mine - 1)
    try:
        n = int(str(requested).strip()) if not isinstance(requested, bool) else None
    except ValueError:
        n = None
    if n is None or n < 0:
        raise ValueError(f"Invalid workers {requested!r}: expected a whole number >= 0 or 'auto'")
    limit = 2 * cores
    if n > limit:
        log.warning("workers: %d asked for, using %d (twice the %d usable cores)", n, limit, cores)
        return limit
    return n
