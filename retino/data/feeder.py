"""Feeding a GPU from the cache without worker processes: a thread reads whole batches ahead.

On an H200 box (16 cores; bench/feed.py, BENCHMARKS.md "Feed") DataLoader worker processes fed
1,700-2,400 images/s at 512 px whether they read rows or batches: each batch (25 MB) crosses to
the training process through freshly allocated shared memory and is then copied again into pinned
memory, and ResNet-18 trained at 0.69 of the model's own speed for want of images. Read in the
training process instead, a batch is one multi-threaded ``index_select`` from the memory-mapped
cache straight into pinned memory (torch releases the GIL while it copies): ~16,000 images/s
there, done by one background thread a few batches ahead while the main thread launches the GPU's work.
"""
from __future__ import annotations

import queue
import threading

import torch

_END = object()


class CacheFeeder:
    """An iterable of (images, labels) batches like a DataLoader's, read by a background thread.

    Args:
        dataset: a ``CachedImages``; each batch comes from its ``read_batch``.
        batch_sampler: an ``EpochBatchSampler`` (``loader.batch_sampler``: ``set_epoch``, ``steps``).
        pin: read into pinned (page-locked) memory, for ``.to(device, non_blocking=True)``. torch's
            pinned-memory cache keeps a block out of reuse until the copies issued from it have
            finished, so a batch is never overwritten while the GPU is still reading it.
        prefetch: batches read ahead of the one being trained on.
    """

    def __init__(self, dataset, batch_sampler, *, pin: bool = False, prefetch: int = 3):
        self.dataset, self.batch_sampler, self.pin, self.prefetch = dataset, batch_sampler, pin, max(1, prefetch)
        self.num_workers = 0  # read as DataLoader's by code that reports the loader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        batches = list(self.batch_sampler)  # this epoch's, as set_epoch left it, fixed before reading starts
        ready: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for positions in batches:
                    if not offer(self.dataset.read_batch(positions, pin=self.pin)):
                        return
                offer(_END)
            except BaseException as e:  # handed to the training thread, raised there
                offer(e)

        thread = threading.Thread(target=read, name="retino-feed", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the loop stops early (a stop request): end the thread, drop what it read
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()


def pinned_empty(shape: tuple, pin: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor, page-locked when ``pin`` (from torch's pinned-memory cache)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
