"""Datasets, the epoch sampler, and batched augmentation on the training device.

Workers only hand over uint8 arrays (from the cache, or decoded on the fly); flips, rotations and
colour changes run as tensor ops on whole batches on the device. Every random draw comes from a
generator seeded by (seed, epoch), so an epoch is the same whether run straight through or resumed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from .preprocess import load_and_preprocess


class CachedImages(TorchDataset):
    """Rows of a cache array; the memmap is opened lazily in each worker (never pickled whole)."""

    def __init__(self, npy_path, indices, labels):
        self.npy_path, self.indices, self.labels = str(npy_path), np.asarray(indices), np.asarray(labels)
        self._arr = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self._arr is None:
            # copy-on-write, so the row can be handed to torch without a copy (nothing writes to it):
            # the collate's stack is then the only copy, 1.6-2x the images/s of copying each row first
            self._arr = np.load(self.npy_path, mmap_mode="c")
        return torch.from_numpy(self._arr[self.indices[i]]), int(self.labels[i])  # (H, W, 3) uint8

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}


class DecodedImages(TorchDataset):
    """Decode and preprocess per item (the uncached path; same output as the cache)."""

    def __init__(self, paths, labels, size: int, ben_graham: bool = False):
        self.paths, self.labels, self.size, self.bg = list(paths), np.asarray(labels), size, ben_graham

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        arr = load_and_preprocess(self.paths[i], self.size, ben_graham_norm=self.bg)
        return torch.from_numpy(arr), int(self.labels[i])


class EpochSampler(Sampler):
    """Indices for one epoch, drawn from (seed, epoch): shuffled or class-balanced, sharded by rank.

    ``start`` skips the first indices of this rank's share (resuming mid-epoch).
    """

    def __init__(self, labels, *, balanced=False, shuffle=True, seed=0, rank=0, world=1):
        self.labels = np.asarray(labels)
        self.balanced, self.shuffle, self.seed, self.rank, self.world = balanced, shuffle, seed, rank, world
        self.epoch, self.start = 1, 0
        self.per_rank = math.ceil(len(self.labels) / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _all_indices(self) -> np.ndarray:
        n = len(self.labels)
        if not self.shuffle:
            return np.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balanced:  # each grade equally likely; rare images repeat within an epoch
            counts = np.bincount(self.labels, minlength=5).astype(float)
            w = 1.0 / counts[self.labels]
            return torch.multinomial(torch.as_tensor(w), n, replacement=True, generator=g).numpy()
        return torch.randperm(n, generator=g).numpy()

    def __iter__(self):
        idx = self._all_indices()
        pad = self.per_rank * self.world - len(idx)
        if pad > 0:  # every rank takes the same number of steps
            idx = np.concatenate([idx, idx[:pad]])
        mine = idx[self.rank::self.world]
        return iter(mine[self.start:].tolist())

    def __len__(self):
        return self.per_rank - self.start


def to_float(batch: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``."""
    src = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W) view, NHWC strides
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Convert and reorder in one copy: `.float().contiguous()` made a channels-last float copy first
    # and then transposed it, 1.6x slower on a CPU (bench/data_pipeline.py). Same values.
    x = torch.empty(src.shape, dtype=torch.float32, device=src.device, memory_format=fmt)
    return x.copy_(src).div_(255)


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Batched augmentation of (B, 3, H, W) floats in [0, 1].

    ``lab``: vertical flip p=0.5 and rotation in +-30 deg (the lab report; no horizontal flip, left
    and right eyes are mirror images). ``lab+color`` adds brightness and contrast in [0.8, 1.2].
    """
    if mode == "none":
        return x
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(30)
    if mode == "lab+color":
        bright = 0.8 + 0.4 * torch.rand(b, generator=gen)
        contrast = 0.8 + 0.4 * torch.rand(b, generator=gen)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)  # output (u, v) samples the input at theta @ (u, v, 1), normalised
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[flip, 1] *= -1  # flip, then rotate: the input's y is negated (no separate flip pass)
    grid = _affine_grid(theta.to(x.device, x.dtype), x.shape[2], x.shape[3])
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # black corners
    dev = x.device
    if mode == "lab+color":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast.to(dev)[:, None, None, None] + mean) * bright.to(dev)[:, None, None, None]
        x = x.clamp_(0, 1)
    return x


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
