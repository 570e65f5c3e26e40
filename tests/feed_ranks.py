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


def torchrun_rank(rank, world, local_world, port, roots, paths, out):
    """One rank of a torchrun-like launch on "nodes" of ``local_world`` ranks, each node with its own
    cache folder (``roots[node]``), over torch.distributed (gloo)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                      LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from retino.data.cache import local_group, node_barrier
    dist.init_process_group("gloo")
    try:
        barrier = node_barrier()
        local_rank, local_size = local_group()
        cache = build_cache(paths, 40, workers=0, progress=False, root=roots[rank // local_world],
                            rank=local_rank, world=local_size, barrier=barrier)
        dist.barrier()  # as training would, once every node has its cache
        out.put((rank, str(cache.path), os.getpid()))
    finally:
        dist.destroy_process_group()
