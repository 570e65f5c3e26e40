"""Datasets, the epoch samplers, the loader, and augmentation of whole batches where the model runs.

Workers only hand over uint8 arrays (from the cache, or decoded on the fly); flips, rotations and
colour changes are applied to the batch by :func:`to_input`: on a GPU as tensor ops on the device
(``grid_sample``), on a CPU with OpenCV on the uint8 images, with conversion and normalisation in the
same pass through a lookup table (the float ops cost 4x as much there, bench/data_pipeline.py).
Both paths take the same random draws from a generator seeded by (seed, epoch), so an epoch is the
same whether run straight through or resumed.

The cache is read a batch at a time (:class:`EpochBatchSampler` + ``CachedImages.__getitems__``):
one sorted fancy index on the memory map instead of one read and one Python call per image
(bench/feed.py). :func:`make_loader` puts the pieces together for a training or evaluation split.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from ._workers import resolve_workers, usable_cores  # noqa: F401  (part of this module's API)
from .feeder import CacheFeeder, pinned_empty
from .preprocess import ImageError, load_and_preprocess

log = logging.getLogger("retino.data")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws (sampling order, augmentation), the same on every resume."""
    return seed * 1_000_003 + epoch


class CachedImages(TorchDataset):
    """Rows of a cache array; the memmap is opened lazily in each worker (never pickled whole).

    ``dataset[i]`` is one row. ``dataset.__getitems__(positions)``, what a DataLoader calls for a
    batch, gives what ``batch_as`` says: ``"samples"``, a list of (row, label) as torch's default
    collate expects; ``"array"``, the batch read at once as ((B, S, S, 3) uint8, (B,) labels) for
    :func:`batch_collate`; ``"views"``, (a list of B row views into the memory map, labels), for
    the CPU path, where :func:`cpu_input` warps straight out of them. :func:`make_loader` sets it.
    """

    BATCH_AS = ("samples", "array", "views")

    def __init__(self, npy_path, indices, labels, *, batch_as: str = "samples"):
        if batch_as not in self.BATCH_AS:
            raise ValueError(f"Invalid batch_as {batch_as!r}. Choose one of: {', '.join(self.BATCH_AS)}.")
        self.npy_path, self.indices, self.labels = str(npy_path), np.asarray(indices), np.asarray(labels)
        self.batch_as = batch_as
        self._arr = None

    def __len__(self):
        return len(self.indices)

    def _array(self) -> np.ndarray:
        if self._arr is None:
            # copy-on-write, so the row can be handed to torch without a copy (nothing writes to it):
            # the collate's stack is then the only copy, 1.6-2x the images/s of copying each row first
            self._arr = np.load(self.npy_path, mmap_mode="c")
        return self._arr

    def __getitem__(self, i):
        return torch.from_numpy(self._array()[self.indices[i]]), int(self.labels[i])  # (H, W, 3) uint8

    def __getitems__(self, positions) -> tuple:
        """A batch, as ``batch_as`` says; images in the order of ``positions``.

        ``"array"``: one fancy index reads them all (an :class:`EpochBatchSampler` batch is sorted,
        so the memory map is read front to back), into shared memory when in a worker process, so
        handing the batch to the main process copies nothing more.
        """
        if self.batch_as == "samples":
            return [self[i] for i in positions]
        pos = np.asarray(positions, dtype=np.int64)
        rows = self.indices[pos]
        labels = torch.from_numpy(self.labels[pos].astype(np.int64))
        arr = self._array()
        if self.batch_as == "views":
            return [torch.from_numpy(arr[r]) for r in rows], labels
        out = _batch_tensor((len(rows), *arr.shape[1:]))
        # np.take, not torch: single-threaded and steady from a fresh mapping, where torch's
        # multi-threaded copy ran 1.3-20x slower here (page faults on one mapping from two threads).
        # mode="clip" writes straight into ``out`` (the default buffers a copy); the rows are valid.
        np.take(arr, rows, axis=0, out=out.numpy(), mode="clip")
        return out, labels

    def read_batch(self, positions, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, S, S, 3) uint8, (B,) int64) for ``positions``, read in this process by one
        ``index_select`` (multi-threaded, GIL released) into pinned memory when ``pin``: the
        :class:`~retino.data.feeder.CacheFeeder`'s read.
        """
        pos = np.asarray(positions, dtype=np.int64)
        src = torch.from_numpy(self._array())  # (N, S, S, 3), the memory map (copy-on-write: writable)
        out = pinned_empty((len(pos), *src.shape[1:]), pin)
        torch.index_select(src, 0, torch.from_numpy(self.indices[pos].astype(np.int64)), out=out)
        return out, torch.from_numpy(self.labels[pos].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}


def _batch_tensor(shape: tuple) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a DataLoader worker (as default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


def batch_collate(batch):
    """The collate of ``CachedImages.__getitems__``: the batch is already one array."""
    return batch


class DecodedImages(TorchDataset):
    """Decode and preprocess per item (the uncached path; same output as the cache).

    Unreadable images are left out when the data set is made: every file's header and end marker
    are checked (``retino.data.validate.scan_image``, what ``retino stats`` does, ~0.1 ms a file) and
    the bad ones listed in ``skipped`` as (path, error), as the cache lists its own. An image that
    passes the check but fails to decode later is left out of its batch by :func:`decoded_collate`,
    with one warning line naming it. ``paths`` and ``labels`` hold the images kept.
    """

    def __init__(self, paths, labels, size: int, ben_graham: bool = False, *, scan: bool = True):
        paths, labels = list(paths), np.asarray(labels)
        self.skipped: list[tuple[str, str]] = []
        if scan and paths:
            from .validate import scan_image
            with ThreadPoolExecutor(8) as pool:  # I/O bound: threads overlap the header reads
                errors = [row["error"] for row in pool.map(scan_image, paths)]
            keep = [i for i, e in enumerate(errors) if e is None]
            self.skipped = [(paths[i], errors[i]) for i in range(len(paths)) if errors[i] is not None]
            paths, labels = [paths[i] for i in keep], labels[keep]
        self.paths, self.labels, self.size, self.bg = paths, labels, size, ben_graham

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image (H, W, 3) uint8, label), or an :class:`Unreadable` marker for a file that broke since."""
        try:
            arr = load_and_preprocess(self.paths[i], self.size, ben_graham_norm=self.bg)
        except ImageError as e:
            return Unreadable(self.paths[i], str(e), self.size)
        except Exception as e:  # passed the header scan but breaks the decoder (as in the cache build)
            name = os.path.basename(self.paths[i])
            return Unreadable(self.paths[i], f"{name}: cannot be decoded ({type(e).__name__}: {e})", self.size)
        return torch.from_numpy(arr), int(self.labels[i])


class Unreadable(tuple):
    """What :class:`DecodedImages` gives for an image that cannot be decoded: (path, error, size)."""

    def __new__(cls, path: str, error: str, size: int):
        return super().__new__(cls, (path, error, size))


_WARNED: set[str] = set()


def decoded_collate(samples):
    """``default_collate`` of the images that decoded; each one that did not is named once on stderr.

    A batch can come out smaller than asked for (empty, (0, S, S, 3), if none decoded).
    """
    good = [s for s in samples if not isinstance(s, Unreadable)]
    for path, error, _ in (s for s in samples if isinstance(s, Unreadable)):
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("left out %s", error.splitlines()[0] if error else path)
    if good:
        return default_collate(good)
    size = samples[0][2]
    return torch.empty((0, size, size, 3), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


class EpochSampler(Sampler):
    """Indices for one epoch, drawn from (seed, epoch): shuffled or class-balanced, sharded by rank.

    ``start`` skips the first indices of this rank's share (resuming mid-epoch). ``pad`` (training)
    repeats the first indices so every rank gets the same number; without it (evaluation) every
    index is in exactly one rank's share.
    """

    def __init__(self, labels, *, balanced=False, shuffle=True, seed=0, rank=0, world=1, pad=True):
        self.labels = np.asarray(labels)
        self.balanced, self.shuffle, self.seed, self.rank, self.world = balanced, shuffle, seed, rank, world
        self.pad = pad
        self.epoch, self.start = 1, 0
        n = len(self.labels)
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _all_indices(self) -> np.ndarray:
        n = len(self.labels)
        if not self.shuffle:
            return np.arange(n)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.balanced:  # each grade equally likely; rare images repeat within an epoch
            counts = np.bincount(self.labels, minlength=5).astype(float)
            w = 1.0 / counts[self.labels]
            return torch.multinomial(torch.as_tensor(w), n, replacement=True, generator=g).numpy()
        return torch.randperm(n, generator=g).numpy()

    def share(self) -> np.ndarray:
        """This rank's indices for the whole epoch (``start`` not applied)."""
        idx = self._all_indices()
        pad = self.per_rank * self.world - len(idx) if self.pad else 0
        if pad > 0:  # every rank takes the same number of steps
            idx = np.concatenate([idx, idx[:pad]])
        return idx[self.rank::self.world]

    def __iter__(self):
        return iter(self.share()[self.start:].tolist())

    def __len__(self):
        return self.per_rank - self.start


class EpochBatchSampler(Sampler):
    """:class:`EpochSampler`'s indices in whole batches: this rank's share cut into ``batch_size``
    runs, in the same order, each batch sorted (the memory map is then read front to back).

    ``merge_single`` (training) merges a last batch of one image into the one before, so that batch
    holds ``batch_size + 1`` (BatchNorm in train mode cannot take a batch of one; issue 15).
    ``set_epoch(epoch, start)``: ``start`` counts this rank's images already trained, a whole number
    of batches (``step * batch_size``), as for :class:`EpochSampler`. ``steps`` is a full epoch's
    number of batches; ``len()`` what is left of it after ``start``.
    """

    def __init__(self, labels, batch_size: int, *, balanced=False, shuffle=True, seed=0, rank=0, world=1,
                 pad=True, merge_single=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = EpochSampler(labels, balanced=balanced, shuffle=shuffle, seed=seed, rank=rank, world=world,
                                    pad=pad)
        self.batch_size, self.merge_single = batch_size, merge_single
        self.per_rank = self.sampler.per_rank
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.batch_size:
            raise ValueError(f"start {start} is not a whole number of batches of {self.batch_size}")
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def _bounds(self) -> list[tuple[int, int]]:
        n, b = self.per_rank, self.batch_size
        bounds = [(lo, min(lo + b, n)) for lo in range(0, n, b)]
        if self.merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    @property
    def steps(self) -> int:
        return len(self._bounds())

    def __iter__(self):
        share = self.sampler.share()
        for lo, hi in self._bounds():
            if lo >= self.start:
                yield np.sort(share[lo:hi]).tolist()

    def __len__(self):
        return sum(lo >= self.start for lo, _ in self._bounds())


def make_loader(dataset, *, batch_size: int, train: bool, labels=None, balanced: bool = False, seed: int = 0,
                rank: int = 0, world: int = 1, device_type: str = "cpu", workers: int | str = "auto",
                drop_single: bool = True, pin_memory: bool | None = None):
    """The loader of a split: whole batches from an :class:`EpochBatchSampler`, this rank's share.

    Args:
        dataset: :class:`CachedImages` (read a batch at a time) or :class:`DecodedImages`.
        train: shuffled (``balanced``: class-balanced), padded to equal shares across ranks, a last
            batch of one merged into the one before (``drop_single``); else in order, each image in
            exactly one rank's share (sharded evaluation gathers them back).
        labels: the dataset's labels (default ``dataset.labels``).
        device_type: ``"cuda"`` pins the batches' memory (copy them with ``non_blocking=True``). On
            ``"cpu"`` the cache is read in this process, as row views (a row is a memory-mapped read,
            cheaper than handing it between processes, and workers would take cores from the model).
        workers: a number or ``"auto"``, see :func:`resolve_workers`. Feeding a GPU from the cache,
            0 (what "auto" gives) means a :class:`~retino.data.feeder.CacheFeeder`: a thread of this
            process reads batches ahead straight into pinned memory; a number > 0, DataLoader worker
            processes (slower there: retino/data/feeder.py).

    The result iterates like a DataLoader over (images, labels): images (B, S, S, 3) uint8 (on a CPU
    from the cache: a list of B row views, see :func:`cpu_input`), labels (B,) int64. Its
    ``batch_sampler``: ``set_epoch(epoch, start=step * batch_size)`` before each epoch, ``steps``
    batches in a full one.
    """
    labels = dataset.labels if labels is None else labels
    cached = isinstance(dataset, CachedImages)
    in_process = device_type == "cpu" and cached
    n_workers = 0 if in_process else resolve_workers(workers, purpose="loader", device_type=device_type,
                                                      cached=cached)
    pin = device_type == "cuda" if pin_memory is None else pin_memory
    sampler = EpochBatchSampler(labels, batch_size, balanced=train and balanced, shuffle=train, seed=seed,
                                rank=rank, world=world, pad=train, merge_single=train and drop_single)
    if cached and not in_process and n_workers == 0:
        return CacheFeeder(dataset, sampler, pin=pin)
    if cached:
        dataset = CachedImages(dataset.npy_path, dataset.indices, dataset.labels,
                               batch_as="views" if in_process else "array")
    collate = batch_collate if cached else decoded_collate if isinstance(dataset, DecodedImages) else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=n_workers, collate_fn=collate,
                      pin_memory=pin, persistent_workers=n_workers > 0, prefetch_factor=4 if n_workers > 0 else None)


def to_float(batch: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``."""
    src = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W) view, NHWC strides
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Convert and reorder in one copy: `.float().contiguous()` made a channels-last float copy first
    # and then transposed it, 1.6x slower on a CPU (bench/data_pipeline.py). Same values.
    x = torch.empty(src.shape, dtype=torch.float32, device=src.device, memory_format=fmt)
    return x.copy_(src).div_(255)


def _draws(b: int, mode: str, gen: torch.Generator):
    """One batch's random draws, always in this order: (theta (B, 2, 3), brightness, contrast).

    ``theta`` maps each output pixel (u, v, 1), in grid_sample's normalised coordinates, to where it
    samples the input: a vertical flip with p=0.5, then a rotation in +-30 deg.
    """
    flip = torch.rand(b, generator=gen) < 0.5
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(30)
    bright = contrast = None
    if mode == "lab+color":
        bright = 0.8 + 0.4 * torch.rand(b, generator=gen)
        contrast = 0.8 + 0.4 * torch.rand(b, generator=gen)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[flip, 1] *= -1  # flip, then rotate: the input's y is negated (no separate flip pass)
    return theta, bright, contrast


def augment(x: torch.Tensor, mode: str, gen: torch.Generator, interpolation: str = "bilinear") -> torch.Tensor:
    """Batched augmentation of (B, 3, H, W) floats in [0, 1] on their device.

    ``lab``: vertical flip p=0.5 and rotation in +-30 deg (the lab report; no horizontal flip, left
    and right eyes are mirror images). ``lab+color`` adds brightness and contrast in [0.8, 1.2].
    ``interpolation``: the rotation's resampling, ``bilinear`` or ``nearest`` (the lab's RandomRotation).
    """
    if mode == "none":
        return x
    theta, bright, contrast = _draws(x.shape[0], mode, gen)
    grid = _affine_grid(theta.to(x.device, x.dtype), x.shape[2], x.shape[3])
    x = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)  # black corners
    dev = x.device
    if mode == "lab+color":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast.to(dev)[:, None, None, None] + mean) * bright.to(dev)[:, None, None, None]
        x = x.clamp_(0, 1)
    return x


def _pixel_matrix(theta: np.ndarray, h: int, w: int) -> np.ndarray:
    """A normalised-coordinate ``theta`` (2, 3) as the pixel matrix of cv2.warpAffine(WARP_INVERSE_MAP).

    grid_sample (align_corners=False) reads pixel centres: x_n = (2 x + 1) / w - 1.
    """
    d = np.array([w / 2.0, h / 2.0])
    a = theta[:, :2] * d[:, None] / d[None, :]  # D A D^-1
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.hstack([a, (c + d * theta[:, 2] - a @ c)[:, None]])


def _lut(mean, std, center: float | None = None, contrast: float = 1.0, bright: float = 1.0) -> np.ndarray:
    """uint8 value -> normalised float per channel (1, 256, 3), colour change folded in as augment's."""
    v = np.arange(256, dtype=np.float64) / 255.0
    if center is not None:
        v = np.clip(((v - center) * contrast + center) * bright, 0.0, 1.0)
    return ((v[:, None] - np.asarray(mean)) / np.asarray(std)).astype(np.float32).reshape(1, 256, 3)


_SPARE: dict[tuple, list[np.ndarray]] = {}


def _output(shape: tuple) -> np.ndarray:
    """A float32 array of ``shape`` that no tensor uses any more, else a new one (at most two kept per shape).

    A fresh 100 MB batch is paid in page faults on first touch, which cost twice what filling it does.
    ``torch.from_numpy`` holds a reference to the array for as long as any tensor or view of it lives,
    so an array only this pool refers to is free for the next batch.
    """
    pool = _SPARE.setdefault(shape, [])
    for buf in pool:
        if sys.getrefcount(buf) == 3:  # the pool's list, ``buf`` and getrefcount's own argument
            return buf
    buf = np.empty(shape, np.float32)
    if len(pool) < 2:
        pool.append(buf)
    return buf


def rows_collate(samples):
    """A CPU batch without the stacked copy: (list of (H, W, 3) uint8 rows, (B,) labels).

    The rows are views of the memory-mapped cache; :func:`cpu_input` warps straight out of them.
    """
    return [image for image, _ in samples], torch.tensor([label for _, label in samples])


def cpu_input(images, norm, *, mode: str = "none", gen: torch.Generator | None = None,
              interpolation: str = "bilinear") -> torch.Tensor:
    """(B, H, W, 3) uint8 (a tensor, or a list of B images) -> normalised (B, 3, H, W) float32
    (channels_last) on the CPU.

    The same draws and geometry as :func:`augment` + :func:`normalize`, done per image with
    ``cv2.warpAffine`` on uint8 and one ``cv2.LUT`` pass that converts, applies brightness/contrast
    and normalises. Values agree with the tensor path to uint8 rounding.
    """
    src = [im.numpy() if torch.is_tensor(im) else im for im in images]  # a batch tensor, or rows
    b, (h, w, _) = len(src), src[0].shape
    out = _output((b, h, w, 3))
    plain = _lut(*norm)
    if mode != "none":
        theta, bright, contrast = _draws(b, mode, gen)
        matrices = [_pixel_matrix(t, h, w) for t in theta.double().numpy()]
        flags = (cv2.INTER_NEAREST if interpolation == "nearest" else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP

    def work(lo: int, hi: int) -> None:  # images lo..hi-1, each warped and converted while in cache
        warped = np.empty((h, w, 3), np.uint8)
        for i in range(lo, hi):
            if mode == "none":
                cv2.LUT(src[i], plain, dst=out[i])
                continue
            cv2.warpAffine(src[i], matrices[i], (w, h), dst=warped, flags=flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            lut = plain
            if mode == "lab+color":
                center = sum(cv2.mean(warped)[:3]) / (3 * 255.0)
                lut = _lut(*norm, center, float(contrast[i]), float(bright[i]))
            cv2.LUT(warped, lut, dst=out[i])

    # One thread per core, each on its share of the images with OpenCV single-threaded inside:
    # 1.2x the images/s of OpenCV splitting every single call across the cores (per-call sync).
    # Each image's result depends only on its own draws, so the output is the same either way.
    pool, n = _pool()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        bounds = np.linspace(0, b, min(n, b) + 1).astype(int)
        for f in [pool.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
            f.result()
    finally:
        cv2.setNumThreads(previous)
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # NHWC memory: a channels_last view, no copy


@functools.cache
def _pool() -> tuple[ThreadPoolExecutor, int]:
    """The augmentation threads, one per usable core (at most 8), made on first use."""
    n = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    return ThreadPoolExecutor(n, thread_name_prefix="retino-augment"), n


def to_input(images: torch.Tensor, device: torch.device, norm, *, mode: str = "none",
             gen: torch.Generator | None = None, interpolation: str = "bilinear",
             channels_last: bool = False) -> torch.Tensor:
    """A loader's uint8 batch as the model's input: augmented (``mode``), normalised, on ``device``.

    ``channels_last`` applies on a GPU; a CPU batch is channels_last always (see :func:`cpu_input`).
    """
    if device.type == "cpu":
        return cpu_input(images, norm, mode=mode, gen=gen, interpolation=interpolation)
    x = normalize(augment(to_float(images, device), mode, gen, interpolation), *norm)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` as one broadcast add.

    Same grid (to 1e-7); affine_grid fills a (B, h, w, 3) base grid and multiplies it, 3.5x slower
    on a CPU.
    """
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1  # pixel centres
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    along_x = theta[:, None, None, :, 0] * xs[None, None, :, None]  # (B, 1, w, 2)
    along_y = theta[:, None, None, :, 1] * ys[None, :, None, None] + theta[:, None, None, :, 2]  # (B, h, 1, 2)
    return along_x + along_y  # (B, h, w, 2)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
