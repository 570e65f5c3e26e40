"""The decode-once cache gives what on-the-fly decoding gives, and notices changed sources."""
import os
import threading

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from retino.data import read_dataset
from retino.data.cache import build_cache, cache_key
from retino.data.loaders import CachedImages, DecodedImages, EpochSampler
from retino.data import augment as aug


def test_cached_and_uncached_give_the_same_tensors(tiny_data, tmp_path):
    df = read_dataset(tiny_data).splits["test"]
    paths, labels = df["path"].tolist(), df["grade"].to_numpy()
    for bg in (False, True):
        cache = build_cache(paths, 48, ben_graham=bg, workers=2, progress=False, root=tmp_path)
        cached = CachedImages(cache.path, np.arange(len(paths)), labels)
        direct = DecodedImages(paths, labels, 48, ben_graham=bg)
        for i in range(len(paths)):
            a, ya = cached[i]
            b, yb = direct[i]
            assert ya == yb and a.dtype == torch.uint8 and a.shape == (48, 48, 3)
            assert torch.equal(a, b)


def test_changed_source_file_invalidates(tiny_data, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    paths = []
    for i in range(3):
        p = src / f"{i}_left.png"
        Image.new("RGB", (80, 60), (100 + 40 * i, 50, 20)).save(p)
        paths.append(str(p))
    first = build_cache(paths, 32, workers=0, progress=False, root=tmp_path / "c")
    again = build_cache(paths, 32, workers=0, progress=False, root=tmp_path / "c")
    assert again.path == first.path  # reused, not rebuilt
    Image.new("RGB", (80, 60), (10, 200, 10)).save(paths[1])
    os.utime(paths[1], ns=(1, 1_000_000_000))  # a different mtime even on coarse file systems
    changed = build_cache(paths, 32, workers=0, progress=False, root=tmp_path / "c")
    assert changed.path != first.path
    green = changed.array()[1].mean(axis=(0, 1))
    assert green[1] > 120 and green[0] < 20  # the new, green picture
    assert cache_key(paths, 32, False) != cache_key(paths, 64, False) != cache_key(paths, 64, True)


def test_undecodable_images_are_left_out_not_fatal(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 50), (200, 100, 50)).save(good)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not a jpeg at all")
    cache = build_cache([str(good), str(bad)], 32, workers=0, progress=False, root=tmp_path / "c")
    assert cache.ok.tolist() == [True, False]
    assert "bad.jpeg" in cache.errors[1]


def test_two_builders_at_once_build_one_cache(tiny_data, tmp_path):
    paths = read_dataset(tiny_data).splits["test"]["path"].tolist()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        build_cache(paths, 40, workers=0, progress=False, root=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].path == results[1].path
    assert np.array_equal(results[0].array(), results[1].array())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sampler_is_deterministic_per_epoch_and_shards():
    labels = np.array([0] * 30 + [1] * 5 + [4] * 5)
    s = EpochSampler(labels, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2)
    assert list(s) == a and sorted(a) == list(range(40))
    s.set_epoch(3)
    assert list(s) != a
    s.set_epoch(2, start=10)
    assert list(s) == a[10:]
    shards = [EpochSampler(labels, seed=3, rank=r, world=3) for r in range(3)]
    for sh in shards:
        sh.set_epoch(2)
    together = sorted(i for sh in shards for i in sh)
    assert len(together) == 42 and set(together) == set(range(40))  # padded to equal shares
    bal = EpochSampler(labels, balanced=True, seed=0)
    drawn = labels[list(bal)]
    assert (drawn == 4).mean() > 0.2  # a 12% grade drawn about a third of the time


def test_augment_flip_and_rotation_on_batches():
    x = torch.zeros(64, 3, 32, 32)
    x[:, :, :4, :] = 1.0  # a bright band on top
    g = torch.Generator().manual_seed(0)
    out = aug.augment(x, "lab", g)
    top = out[:, :, :6, 8:24].mean(dim=(1, 2, 3))
    bottom = out[:, :, -6:, 8:24].mean(dim=(1, 2, 3))
    flipped = bottom > top
    assert 15 < int(flipped.sum()) < 49  # vertical flip p=0.5, per image
    assert not torch.equal(aug.augment(x, "lab", torch.Generator().manual_seed(1)), out)
    assert torch.equal(aug.augment(x, "none", g), x)
    col = aug.augment(torch.full((8, 3, 16, 16), 0.5), "lab+color", g)
    assert col.min() >= 0 and col.max() <= 1


@pytest.mark.parametrize("mode", ["none", "lab", "lab+color"])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_cpu_path_equals_the_tensor_path(mode, interpolation):
    """OpenCV on uint8 (CPU) and grid_sample on floats (GPU): same draws, same geometry, same colour."""
    rng = np.random.default_rng(0)
    smooth = [cv2.resize(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (48, 48), interpolation=cv2.INTER_CUBIC)
              for _ in range(6)]
    u8 = torch.from_numpy(np.stack(smooth))  # (6, 48, 48, 3)
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cpu = aug.cpu_input(u8, norm, mode=mode, gen=torch.Generator().manual_seed(3), interpolation=interpolation)
    ref = aug.normalize(aug.augment(aug.to_float(u8, "cpu"), mode, torch.Generator().manual_seed(3),
                                            interpolation), *norm)
    assert cpu.shape == ref.shape == (6, 3, 48, 48)
    assert cpu.is_contiguous(memory_format=torch.channels_last)
    diff = (cpu - ref).abs()
    if interpolation == "nearest" or mode == "none":
        assert float(diff.max()) < 1e-5
    else:  # the uint8 warp rounds once: half a grey level, over the smallest std
        assert float(diff.max()) < 0.6 / 255 / 0.224 + 1e-4
    rows = aug.cpu_input(list(u8.numpy()), norm, mode=mode, gen=torch.Generator().manual_seed(3),
                             interpolation=interpolation)
    assert torch.equal(rows, cpu)  # rows handed over one by one (the CPU loader) give the same batch


def test_cpu_output_buffers_are_reused_only_when_free():
    shape = (2, 8, 8, 3)
    first = aug.cpu_input(torch.zeros(shape, dtype=torch.uint8), ((0.5,) * 3, (0.5,) * 3))
    second = aug.cpu_input(torch.full(shape, 255, dtype=torch.uint8), ((0.5,) * 3, (0.5,) * 3))
    assert float(first.max()) == -1.0 and float(second.min()) == 1.0  # the first batch was not overwritten
    view = second[:, :1]
    del first, second
    third = aug.cpu_input(torch.zeros(shape, dtype=torch.uint8), ((0.5,) * 3, (0.5,) * 3))
    assert float(view.min()) == 1.0  # a live view keeps its buffer out of the pool
    assert float(third.max()) == -1.0
