"""Feeding the model: batched cache reads, the batch sampler, workers, and the cache build under
torchrun, on a full disk, and with unreadable images (issues 12 and 15)."""
import errno
import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import feed_ranks  # tests/feed_ranks.py
from retino.data import read_dataset
from retino.data.cache import CacheError, CacheStopped, build_cache
from retino.data.feeder import CacheFeeder
from retino.data.loaders import (CachedImages, DecodedImages, EpochBatchSampler, EpochSampler, epoch_seed,
                                 make_loader)
from retino.data._workers import resolve_workers
from retino.data import augment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cached(tiny_data, tmp_path_factory):
    """The tiny set's training split in a 32 px cache: (CachedImages over every row, paths, labels)."""
    df = read_dataset(tiny_data).splits["train"]
    paths, labels = df["path"].tolist(), df["grade"].to_numpy(dtype=np.int64)
    cache = build_cache(paths, 32, workers=0, progress=False, root=tmp_path_factory.mktemp("feed-cache"))
    return CachedImages(cache.path, np.arange(len(paths)), labels), paths, labels


def per_row_batches(ds, labels, batch, *, seed, epoch, rank=0, world=1, balanced=False, shuffle=True):
    """Today's path: EpochSampler + DataLoader(batch_size) + default collate, one row at a time."""
    s = EpochSampler(labels, balanced=balanced, shuffle=shuffle, seed=seed, rank=rank, world=world)
    s.set_epoch(epoch)
    rows = CachedImages(ds.npy_path, ds.indices, ds.labels)  # indexed one row at a time below
    order = list(s)
    out = []
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        items = [rows[i] for i in idx]
        out.append((idx, torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_batched_reads_give_the_per_row_batches(cached, balanced, world):
    ds, _, labels = cached
    for rank in range(world):
        ref = per_row_batches(ds, labels, 7, seed=5, epoch=3, rank=rank, world=world, balanced=balanced)
        loader = make_loader(ds, batch_size=7, train=True, balanced=balanced, seed=5, rank=rank, world=world,
                             device_type="cuda", workers=0, pin_memory=False, drop_single=False)
        loader.batch_sampler.set_epoch(3)
        got = list(loader)
        assert len(got) == len(ref) == loader.batch_sampler.steps
        for (idx, images, y), (b_images, b_y) in zip(ref, got):
            order = np.argsort(idx, kind="stable")  # the batch sampler sorts each batch
            assert b_images.dtype == torch.uint8 and b_images.shape == (len(idx), 32, 32, 3)
            assert torch.equal(b_images, images[order]) and torch.equal(b_y, y[order])
            assert torch.equal(b_y, torch.from_numpy(labels[np.sort(idx)]))


def test_batch_sampler_order_shards_and_resume(cached):
    _, _, labels = cached
    n = len(labels)
    flat = EpochSampler(labels, seed=2, rank=1, world=3)
    flat.set_epoch(4)
    bs = EpochBatchSampler(labels, 5, seed=2, rank=1, world=3)
    bs.set_epoch(4)
    batches = list(bs)
    expect = list(flat)
    assert [sorted(expect[lo:lo + 5]) for lo in range(0, len(expect), 5)] == batches
    assert all(b == sorted(b) for b in batches)
    bs.set_epoch(4, start=2 * 5)
    assert list(bs) == batches[2:] and len(bs) == len(batches) - 2
    with pytest.raises(ValueError, match="whole number of batches"):
        bs.set_epoch(4, start=3)
    bs.set_epoch(5)
    assert list(bs) != batches
    # evaluation: in order, no padding, every image in exactly one rank's share
    shares = [EpochBatchSampler(labels, 4, shuffle=False, rank=r, world=3, pad=False) for r in range(3)]
    seen = sorted(i for s in shares for b in s for i in b)
    assert seen == list(range(n))
    assert epoch_seed(2, 4) != epoch_seed(2, 5) != epoch_seed(3, 4)


def test_last_training_batch_of_one_is_merged_deterministically(cached):
    """--image-size 32 --batch-size 127 failed after an epoch on a last batch of one (issue 15)."""
    ds, _, labels = cached
    n = len(labels)
    batch = n - 1  # n images: one full batch, then one image left over
    loader = make_loader(ds, batch_size=batch, train=True, seed=1, device_type="cpu")
    sampler = loader.batch_sampler
    sampler.set_epoch(1)
    sizes = [len(y) for _, y in loader]
    assert sizes == [n] and sampler.steps == 1
    plain = make_loader(ds, batch_size=batch, train=True, seed=1, device_type="cpu", drop_single=False)
    plain.batch_sampler.set_epoch(1)
    assert [len(y) for _, y in plain] == [batch, 1]  # what it would have been
    twice = [list(make_loader(ds, batch_size=batch, train=True, seed=1, device_type="cpu").batch_sampler)
             for _ in range(2)]
    assert twice[0] == twice[1]
    # the merged batch trains: BatchNorm in train mode gets n images, not one
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    images, _ = next(iter(loader))
    model(augment.cpu_input(images, ((0.5,) * 3, (0.5,) * 3)))
    evaluation = make_loader(ds, batch_size=batch, train=False, device_type="cpu")
    assert [len(y) for _, y in evaluation] == [batch, 1]  # evaluation keeps every image, in order


def test_cpu_views_gpu_feeder_and_worker_processes_give_the_same_batches(cached):
    ds, _, labels = cached
    cpu = make_loader(ds, batch_size=8, train=True, seed=0, device_type="cpu", workers=2)
    assert cpu.num_workers == 0  # the CPU reads the cache in the training process
    cpu.batch_sampler.set_epoch(2)
    views = list(cpu)
    assert isinstance(views[0][0], list) and views[0][0][0].shape == (32, 32, 3)
    feeder = make_loader(ds, batch_size=8, train=True, seed=0, device_type="cuda", pin_memory=False)
    assert isinstance(feeder, CacheFeeder)  # workers "auto" on a GPU: a thread reads ahead
    procs = make_loader(ds, batch_size=8, train=True, seed=0, device_type="cuda", workers=2, pin_memory=False)
    assert procs.num_workers == 2
    for loader in (feeder, procs):
        loader.batch_sampler.set_epoch(2)
        assert len(loader) == len(views)
        for (rows, y1), (images, y2) in zip(views, loader, strict=True):
            assert images.dtype == torch.uint8 and torch.equal(torch.stack(rows), images) and torch.equal(y1, y2)
    # the same batch as CPU input either way
    norm = ((0.4,) * 3, (0.2,) * 3)
    a = augment.cpu_input(views[0][0], norm, mode="lab", gen=torch.Generator().manual_seed(0))
    b = augment.cpu_input(torch.stack(views[0][0]), norm, mode="lab", gen=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_feeder_thread_ends_with_the_loop_and_passes_errors_on(cached, tmp_path):
    ds, _, labels = cached
    feeder = make_loader(ds, batch_size=4, train=True, seed=0, device_type="cuda", pin_memory=False)
    feeder.batch_sampler.set_epoch(1, start=8)  # resumed after two steps
    first = list(feeder)
    assert len(first) == feeder.batch_sampler.steps - 2
    before = threading.active_count()
    for i, _ in enumerate(feeder):  # a stop request mid-epoch: the loop breaks
        if i == 1:
            break
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name == "retino-feed"]
    gone = CachedImages(tmp_path / "missing.npy", ds.indices, ds.labels)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        list(make_loader(gone, batch_size=4, train=False, device_type="cuda", pin_memory=False))


def test_getitems_keeps_the_asked_order_and_the_default_collate_still_works(cached):
    ds, _, labels = cached
    pos = [9, 2, 2, 30, 0]
    as_array = CachedImages(ds.npy_path, ds.indices, ds.labels, batch_as="array")
    images, y = as_array.__getitems__(pos)
    assert torch.equal(images, torch.stack([ds[i][0] for i in pos]))
    assert y.tolist() == [int(labels[i]) for i in pos]
    reversed_rows = CachedImages(ds.npy_path, np.arange(len(labels))[::-1].copy(), labels[::-1].copy(),
                                 batch_as="array")
    images, y = reversed_rows.__getitems__([0, 1, 5])
    assert torch.equal(images, torch.stack([reversed_rows[i][0] for i in (0, 1, 5)]))
    # a plain CachedImages in a plain DataLoader batches as before (torch calls __getitems__ there too)
    images, y = next(iter(DataLoader(ds, batch_size=4)))
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(4)])) and y.tolist() == labels[:4].tolist()
    with pytest.raises(ValueError, match="Invalid batch_as 'rows'"):
        CachedImages(ds.npy_path, ds.indices, ds.labels, batch_as="rows")


# ----------------------------------------------------------------------------- workers

def test_workers_auto_and_upper_bound(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", purpose="cache") == 16
    assert resolve_workers("auto", purpose="cache", local_world=4) == 4
    assert resolve_workers("auto", purpose="loader", device_type="cpu") == 0
    assert resolve_workers("auto", purpose="loader", device_type="cuda") == 0  # a reading thread instead
    assert resolve_workers("auto", purpose="loader", device_type="cuda", cached=False) == 15
    assert resolve_workers(3, purpose="loader", device_type="cuda") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with caplog.at_level(logging.WARNING, logger="retino.data"):
        assert resolve_workers(32, purpose="loader", device_type="cuda") == 4  # issue 15: 32 took 3 GB
    assert "32 asked for, using 4" in caplog.text and len(caplog.records) == 1
    assert resolve_workers("auto", purpose="cache") == 2
    for bad in (-1, "many", "2.5"):
        with pytest.raises(ValueError, match="whole number >= 0 or 'auto'"):
            resolve_workers(bad, purpose="loader")


# ----------------------------------------------------------------------------- cache build

def _run_ranks(paths, root, world=2):
    """``world`` spawned processes each building the cache as one rank, twice: [(attempt, rank, path, ok, pid,
    (inode, mtime))], sorted."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(world, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=feed_ranks.build_twice, args=(paths, root, r, world, barrier, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in range(2 * world)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return sorted(results)


def test_cache_built_once_by_two_ranks_equals_one_process(tiny_data, tmp_path):
    paths = read_dataset(tiny_data).splits["train"]["path"].tolist()
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = paths[:20] + [str(bad)] + paths[20:]
    results = _run_ranks(paths, tmp_path / "shared")
    (_, _, path0, ok0, pid0, file0), (_, _, path1, ok1, pid1, _) = results[:2]
    assert path0 == path1 and ok0 == ok1 and pid0 != pid1
    meta = json.loads(Path(path0).with_suffix(".json").read_text())
    (a0, a1), (b0, b1) = sorted(tuple(s["rows"]) for s in meta["shards"])
    assert a0 == 0 and a1 == b0 and b1 == len(paths) and abs((a1 - a0) - (b1 - b0)) <= 1  # each row by one rank
    assert {s["pid"] for s in meta["shards"]} == {pid0, pid1}
    single = build_cache(paths, 40, workers=0, progress=False, root=tmp_path / "single")
    assert np.array_equal(np.load(path0), single.array())
    assert ok0 == single.ok.tolist() and ok0[20] is False
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(
        [Path(path0).name, Path(path0).with_suffix(".json").name, Path(path0).with_suffix(".lock").name])
    assert [(r[2], r[5]) for r in results[2:]] == [(path0, file0)] * 2  # asked again: found, not rebuilt


def test_cache_under_torchrun_two_nodes_each_build_their_own_by_local_shards(tiny_data, tmp_path):
    """Two "nodes" of two ranks (gloo), each node with its own cache folder: LOCAL_RANK and
    LOCAL_WORLD_SIZE differ from RANK and WORLD_SIZE; each node's two ranks build one share each."""
    paths = read_dataset(tiny_data).splits["test"]["path"].tolist()
    roots = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=feed_ranks.torchrun_rank, args=(r, 4, 2, port, roots, paths, out)) for r in range(4)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    pids = {rank: pid for rank, _, pid in got}
    single = build_cache(paths, 40, workers=0, progress=False, root=tmp_path / "single")
    for node, root in enumerate(roots):
        (r0, path0, _), (r1, path1, _) = got[2 * node:2 * node + 2]
        assert path0 == path1 and Path(path0).parent == Path(root)
        meta = json.loads(Path(path0).with_suffix(".json").read_text())
        assert {s["pid"] for s in meta["shards"]} == {pids[r0], pids[r1]}  # this node's two ranks, one share each
        assert np.array_equal(np.load(path0), single.array())


def test_cache_build_stops_when_asked(tiny_data, tmp_path):
    paths = read_dataset(tiny_data).splits["train"]["path"].tolist()
    stop = threading.Event()
    stop.set()
    with pytest.raises(CacheStopped):
        build_cache(paths, 32, workers=0, progress=False, root=tmp_path, stop=stop)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # nothing half-built is kept


def _usage(free):
    return lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free)


def test_cache_on_a_full_disk_fails_at_once_injected_free_space(tiny_data, tmp_path, monkeypatch):
    """Issue 15: a cache build on a 1 MB tmpfs hung for 11 minutes; it must fail at once, named."""
    paths = read_dataset(tiny_data).splits["train"]["path"].tolist()
    monkeypatch.setattr(shutil, "disk_usage", _usage(1_000_000))
    t0 = time.monotonic()
    with pytest.raises(CacheError, match=r"no space left in .*: [\d,]+ MB needed, 1 MB free") as e:
        build_cache(paths, 128, workers=2, progress=False, root=tmp_path)
    assert e.value.errno == errno.ENOSPC and str(tmp_path) in str(e.value)
    assert time.monotonic() - t0 < 30  # no workers were started (a loose bound: never minutes)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_cache_on_a_full_disk_fails_at_once_injected_fallocate(tiny_data, tmp_path, monkeypatch):
    """The free-space figure can be wrong (quotas, other writers): the allocation itself must fail cleanly."""
    paths = read_dataset(tiny_data).splits["train"]["path"].tolist()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CacheError, match="no space left in"):
        build_cache(paths, 64, workers=2, progress=False, root=tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def _tiny_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tiny_tmpfs_works(), reason="cannot mount a private tmpfs here (needs user namespaces)")
@pytest.mark.parametrize("check_free_space", [True, False])
def test_cache_on_a_real_1mb_tmpfs_fails_within_seconds(tiny_data, tmp_path, check_free_space):
    """The issue's reproduction: RETINO_CACHE on a 1 MB tmpfs. Without the free-space check (a file
    system that reports free space wrongly) the reserved allocation must still fail up front."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    paths = read_dataset(tiny_data).splits["train"]["path"].tolist()
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    lie = "" if check_free_space else (
        "import shutil; shutil.disk_usage = lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12)\n")
    script = (f"{lie}import json, sys\nfrom retino.data.cache import build_cache, CacheError\n"
              f"try:\n    build_cache(json.load(open({str(tmp_path / 'paths.json')!r})), 128, workers=2, "
              f"progress=False, root={str(mnt / 'cache')!r})\nexcept CacheError as e:\n    print(e)\n    sys.exit(3)\n")
    (tmp_path / "build.py").write_text(script)
    cmd = f"mount -t tmpfs -o size=1m none {mnt} && PYTHONPATH={REPO} {sys.executable} {tmp_path / 'build.py'}"
    t0 = time.monotonic()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"no space left in {mnt / 'cache'}: " in done.stdout and "MB free" in done.stdout
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- --cache false

def test_uncached_run_leaves_unreadable_images_out(tiny_data, tmp_path, caplog):
    """Issue 15: --cache false with one unreadable image killed the run at step 0 (a multi-line
    worker traceback with --workers 2); it must go on without it and name it."""
    df = read_dataset(tiny_data).splits["train"]
    paths, labels = df["path"].tolist()[:12], df["grade"].to_numpy(dtype=np.int64)[:12]
    garbage, truncated = tmp_path / "garbage.jpeg", tmp_path / "truncated.jpeg"
    garbage.write_bytes(b"not an image")
    truncated.write_bytes(Path(paths[0]).read_bytes()[:300])
    gone = tmp_path / "gone.png"  # readable when the run starts, deleted before it is decoded
    Image.new("RGB", (40, 40), (90, 40, 20)).save(gone)
    all_paths = paths[:4] + [str(garbage)] + paths[4:8] + [str(truncated), str(gone)] + paths[8:]
    all_labels = np.concatenate([labels[:4], [1], labels[4:8], [2, 3], labels[8:]])
    ds = DecodedImages(all_paths, all_labels, 32)
    assert [Path(p).name for p, _ in ds.skipped] == ["garbage.jpeg", "truncated.jpeg"]
    assert "truncated" in ds.skipped[1][1] and len(ds) == 13 and len(ds.labels) == 13
    gone.unlink()
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=5, train=True, seed=0, device_type="cpu", workers=workers)
        loader.batch_sampler.set_epoch(1)
        with caplog.at_level(logging.WARNING, logger="retino.data"):
            batches = list(loader)
        assert sum(len(y) for _, y in batches) == 12  # 12 readable images, each once
        assert all(x.shape[1:] == (32, 32, 3) and len(x) == len(y) for x, y in batches)
    assert f"left out {gone}: cannot be read" in caplog.text  # the in-process pass names it (workers log to stderr)
