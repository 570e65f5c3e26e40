"""One "torchrun rank" of tests/test_feed.py's two-process cache build, in a spawned process.

A module of its own, importing only the cache: a spawned child imports the module of its target,
and importing the test module (torch, pytest) would cost each child seconds.
"""
import os

from retino.data.cache import build_cache


def build_twice(paths, root, rank, world, barrier, out):
    """Build (or find) the cache as ``rank`` of ``world``, then ask again: the second time it is found."""
    for attempt in range(2):
        cache = build_cache(paths, 40, workers=0, progress=False, root=root, rank=rank, world=world,
                            barrier=barrier.wait)
        st = os.stat(cache.path)  # a rebuild would put a new file (inode) in place
        out.put((attempt, rank, str(cache.path), cache.ok.tolist(), os.getpid(), (st.st_ino, st.st_mtime_ns)))
