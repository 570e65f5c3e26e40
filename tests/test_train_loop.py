"""Issue 12, the training loop's GPU readiness measured on the CPU: host syncs per step, sharded evaluation."""
import functools
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from retino.training import train
from retino.config import TrainConfig
from retino.models import build_model
from retino.training import loop
from retino.training import splits

PACKAGE = str(Path(train.__file__).parent)


def _split(n: int, size: int = 32, seed: int = 0) -> splits.Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    frame = pd.DataFrame({"image": [f"{i}" for i in range(n)], "path": "", "grade": labels.numpy(),
                          "patient": [f"{i // 2}" for i in range(n)], "eye": None})
    return splits.Split(TensorDataset(images, labels), frame, [])


class _SyncCounter:
    """Counts calls of host-syncing Tensor methods made from Retino's own code (torch's are not ours)."""

    NAMES = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, method))
        return self

    def _wrap(self, name, method):
        @functools.wraps(method)
        def wrapper(t, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                self.calls.append((name, caller, sys._getframe(1).f_lineno))
            return method(t, *a, **k)
        return wrapper

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("head", ["classify", "regress"])
def test_training_step_makes_no_host_sync_between_log_points(head):
    steps, log_every = 40, 20
    cfg = TrainConfig(image_size=32, batch_size=2, log_every=log_every, head=head,
                      loss="mse" if head == "regress" else "ce", augment="lab")
    split = _split(steps * cfg.batch_size)
    ctx = loop.Context(torch.device("cpu"))
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=cfg.batch_size)
    torch.manual_seed(0)
    model = build_model("resnet18", head=head)
    optimizer = train.build_optimizer(model, cfg)
    logged = []
    with _SyncCounter() as counter:
        state = loop.train_one_epoch(
            model, loader, optimizer=optimizer, scheduler=train.build_scheduler(optimizer, cfg, steps),
            criterion=train.make_criterion(cfg, split.labels), cfg=cfg, ctx=ctx, norm=((0.5,) * 3, (0.25,) * 3),
            gen=torch.Generator().manual_seed(0), state=loop.EpochState(), thresholds=(0.5, 1.5, 2.5, 3.5),
            on_log=lambda s: logged.append((s.step, float(s.loss_sum) / s.seen)))
    assert state.step == steps and [s for s, _ in logged] == [20, 40]
    # before this change: two per step (loss.item() and the outputs' .cpu()), 80 here
    assert len(counter.calls) <= 3 * (steps // log_every) + 2, counter.calls
    assert all(np.isfinite(loss) for _, loss in logged)


def test_log_every_zero_adapts_to_the_step_time():
    cadence = loop.Cadence(0, target_s=0.5)
    cadence.schedule(10, seconds_per_step=0.01)  # a fast GPU: every 50 steps
    assert cadence.next == 60
    cadence.schedule(60, seconds_per_step=2.0)  # this CPU: every step
    assert cadence.next == 61
    fixed = loop.Cadence(7)
    fixed.schedule(7, seconds_per_step=0.0001)
    assert fixed.next == 14


def _shard_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model("resnet18").eval()
        cfg = TrainConfig(image_size=32, batch_size=4)
        ctx = loop.Context(torch.device("cpu"), rank=rank, world=world)
        split = _split(23)  # not a multiple of the world size: shards of 12 and 11
        loader = splits.make_loader(split, cfg, ctx, train=False)
        out = loop.validate(model, loader, cfg=cfg, ctx=ctx, norm=((0.5,) * 3, (0.25,) * 3))
        if rank == 0:
            np.save(os.path.join(out_dir, "sharded.npy"), out)
        else:
            assert out is None
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_over_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    sharded = np.load(tmp_path / "sharded.npy")
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    cfg = TrainConfig(image_size=32, batch_size=4)
    ctx = loop.Context(torch.device("cpu"))
    split = _split(23)
    single = loop.validate(model, splits.make_loader(split, cfg, ctx, train=False), cfg=cfg, ctx=ctx,
                            norm=((0.5,) * 3, (0.25,) * 3))
    assert sharded.shape == single.shape == (23, 5)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    crit = train.make_criterion(cfg, split.labels)
    a = loop.split_metrics(sharded, split.labels, head="classify", thresholds=None, criterion=crit, prefix="")
    b = loop.split_metrics(single, split.labels, head="classify", thresholds=None, criterion=crit, prefix="")
    assert {k: v for k, v in a.items() if k != "loss"} == {k: v for k, v in b.items() if k != "loss"}
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_two_nodes_on_localhost_through_torchruns_rendezvous(tiny_data, tmp_path):
    """Two torchrun launches with --nnodes 2 on 127.0.0.1 (gloo), each node with its own image cache."""
    import socket
    import subprocess

    from conftest import REPO, TINY_TRAIN
    from retino import runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    procs = []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RETINO_CACHE": str(tmp_path / f"cache-node{node}")}
        cmd = [str(torchrun), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "retino-test",
               "-m", "retino", "train", "--data", str(tiny_data), "--run-dir", str(run), "--device", "cpu",
               *TINY_TRAIN]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert [r["epoch"] for r in runs.read_metrics(run)] == [1, 2]  # global rank 0 alone wrote
    assert runs.read_json(run / "config.json")["world_size"] == 2
    assert runs.check_run(run) == [] and runs.read_status(run)["state"] == "completed"
    for node in (0, 1):  # each node built (or reused) its own local cache
        assert list((tmp_path / f"cache-node{node}").glob("*.npy"))
