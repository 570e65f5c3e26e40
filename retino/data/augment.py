"""A loader's uint8 batch on its way to the model: augmented where the model runs, normalised.

Workers only hand over uint8 arrays (from the cache, or decoded on the fly); flips, rotations and
colour changes are applied to the batch by :func:`to_input`: on a GPU as tensor ops on the device
(``grid_sample``), on a CPU with OpenCV on the uint8 images, with conversion and normalisation in the
same pass through a lookup table (the float ops cost 4x as much there, bench/data_pipeline.py).
Both paths take the same random draws from a generator seeded by (seed, epoch), so an epoch is the
same whether run straight through or resumed.
"""
from __future__ import annotations

import functools
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ._workers import usable_cores


def to_float(batch: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``."""
    src = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W) view, NHWC strides
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Convert and reorder in one copy: `.float().contiguous()` made a channels-last float copy first
    # and then transposed it, 1.6x slower on a CPU (bench/data_pipeline.py). Same values.
    x = torch.empty(src.shape, dtype=torch.float32, device=src.device, memory_format=fmt)
    return x.copy_(src).div_(255)


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor on ``device`` without stalling a GPU: copied from pinned memory, asynchronously.

    ``.to("cuda")`` from pageable memory waits for the stream to drain. Done every step (the
    augmentation's draws, the normalisation's mean and std), it left the GPU idle while the host
    launched the next step's kernels: a profile of the training loop showed the main thread in
    cudaStreamSynchronize for 28% of the window and the GPU idle in gaps (bench/profile_loop.py).
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    grid = _affine_grid(_on(x.device, theta.to(x.dtype)), x.shape[2], x.shape[3])
    x = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)  # black corners
    if mode == "lab+color":
        contrast, bright = _on(x.device, torch.stack([contrast, bright]).to(x.dtype))[:, :, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
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
    n = max(1, min(8, usable_cores()))
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
    m, s = _mean_std(tuple(map(float, mean)), tuple(map(float, std)), x.device, x.dtype)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std on ``device``, made once: a new pair every batch cost a GPU sync each."""
    both = torch.tensor([mean, std], dtype=dtype).view(2, 1, 3, 1, 1)
    m, s = _on(device, both)
    return m, s
