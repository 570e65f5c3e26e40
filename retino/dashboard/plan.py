"""Before runs start: which need ImageNet weights that are not on disk, and how long they take on this CPU.

The Train page asks here before it launches a preset (and ``train --preset`` may too), so a run that
would fail seconds later for want of a weights file, or take a day on a laptop, is known up front.
"""
from __future__ import annotations

from ..config import TrainConfig
from ..models import weights_available

# Training images/s of Retino's own loop on a 2-core x86_64 CPU (fp32, cache warm), measured on
# 2026-11-27 and recorded in BENCHMARKS.md: 512 px from "2. Training throughput"
# (bench/train_throughput.py), 224 px from "Training time per epoch on this CPU".
CPU_TRAIN_IMAGES_PER_S = {
    ("resnet18", 224): 19.6, ("resnet50", 224): 6.2,
    ("resnet18", 512): 3.9, ("resnet50", 512): 1.3,
}
# Evaluation (forward only) runs this many times faster than training: the same BENCHMARKS.md rows
# give 400 test images in 11.4 s (ResNet-18) and 34 s (ResNet-50) after 1,600 training images at
# 19.6 and 6.2 images/s, i.e. 1.8x and 1.9x.
EVAL_SPEEDUP = 1.8
SOURCE = "images/s measured on a 2-core CPU (BENCHMARKS.md); more cores train faster"


def missing_weights(configs: list[TrainConfig]) -> dict[str, str]:
    """Architectures whose ImageNet weights some of ``configs`` need but the hub cache lacks: arch -> path.

    A run with its own ``weights`` file needs none. Never touches the network.
    """
    out = {}
    for cfg in configs:
        if cfg.pretrained and not cfg.weights:
            ok, path = weights_available(cfg.arch)
            if not ok:
                out[cfg.arch] = path
    return out


def needs_missing_weights(cfg: TrainConfig, missing: dict[str, str]) -> bool:
    return cfg.pretrained and not cfg.weights and cfg.arch in missing


def trains_on_cpu(cfg: TrainConfig) -> bool:
    """True when ``cfg`` will train on the CPU (``device`` cpu, or auto without a CUDA GPU)."""
    if cfg.device == "cpu":
        return True
    import torch
    return cfg.device == "auto" and not torch.cuda.is_available()


def cpu_images_per_s(arch: str, image_size: int) -> float:
    """Training images/s on the measured CPU, scaled from the nearest measured size by pixel count.

    The scaling holds to 4-9% between the measured sizes (ResNet-18: 19.6 at 224 px predicts 3.75
    at 512 against 3.9 measured; ResNet-50: 1.19 against 1.3).
    """
    sizes = sorted(s for a, s in CPU_TRAIN_IMAGES_PER_S if a == arch)
    if not sizes:
        raise ValueError(f"no CPU figure for {arch!r}; measured: {sorted({a for a, _ in CPU_TRAIN_IMAGES_PER_S})}")
    ref = min(sizes, key=lambda s: abs(s - image_size))
    return CPU_TRAIN_IMAGES_PER_S[(arch, ref)] * (ref / image_size) ** 2


def measured_images_per_s(arch: str, image_size: int, infos) -> tuple[float, str] | None:
    """Training images/s this machine reached lately: the newest finished CPU run of ``arch`` that
    recorded a rate, scaled to ``image_size`` by pixel count; with the run it came from. None: no such run.

    What this machine does now (its cores, its load, other sessions on it) decides a run's time far
    more than the reference CPU: a demo estimated at 3 min from BENCHMARKS.md took 50 on a loaded
    machine, while the trainer's own rate was right. ``infos``: ``runs.list_runs()``, newest first.
    """
    for run in infos:
        rate, size = run.status.get("images_per_s"), run.config.get("train", {}).get("image_size")
        if (run.state in ("completed", "stopped") and run.config.get("device") == "cpu"
                and run.config.get("train", {}).get("arch") == arch
                and isinstance(rate, (int, float)) and rate > 0 and isinstance(size, int) and size > 0):
            return rate * (size / image_size) ** 2, run.id
    return None


PROBE_SIZE = 128   # px: the probe's images; its rate is scaled to the run's size by pixel count


def probe_images_per_s(arch: str, image_size: int, *, steps: int = 3, batch: int = 4) -> float:
    """Training images/s of ``arch`` on this CPU now: ``steps`` timed forward-backward-update steps on
    random ``PROBE_SIZE`` images (after one untimed), scaled to ``image_size`` by pixel count.

    A fresh machine has no finished run to learn from, and the reference CPU's figures say nothing of
    this machine's cores or of what else runs on it (a demo estimated at 3 min from them took 50 on a
    loaded machine). The median step is used, so one stall does not decide it. Decoding and
    augmentation are not in it: the live ETA, once the run starts, counts them too.
    """
    import time

    import torch

    from ..models import build_model

    torch.manual_seed(0)
    model = build_model(arch).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, PROBE_SIZE, PROBE_SIZE), torch.randint(0, 5, (batch,))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:   # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    return batch / step * (PROBE_SIZE / image_size) ** 2


def cpu_seconds(cfg: TrainConfig, n_train: int, n_eval: int, rate: float | None = None) -> float:
    """Seconds ``cfg`` takes on a CPU: every epoch trains on ``n_train`` images and evaluates ``n_eval``
    (val and test; the trainer evaluates both each epoch). ``rate``: training images/s, measured on this
    machine (:func:`measured_images_per_s`); the reference CPU's when None. The cache build is not included."""
    rate = rate or cpu_images_per_s(cfg.arch, cfg.image_size)
    return cfg.epochs * (n_train / rate + n_eval / (EVAL_SPEEDUP * rate))


def estimate(configs: list[TrainConfig], n_train: int, n_eval: int, infos, probe=None) -> tuple[float, str]:
    """Seconds ``configs`` take one after another on this CPU, and where the rates come from, in words.

    A rate comes from, in order: the newest finished CPU run of the model here (its whole loop, decoding
    included); ``probe(arch, image_size)`` (:func:`probe_images_per_s`, or a cached wrapper of it)
    measuring this machine now; the reference CPU's figures where there is no probe or it fails.
    """
    seconds, measured, probed, reference = 0.0, set(), set(), False
    for cfg in configs:
        found = measured_images_per_s(cfg.arch, cfg.image_size, infos)
        rate = found[0] if found else None
        if found:
            measured.add(found[1])
        elif probe is not None:
            try:
                rate = float(probe(cfg.arch, cfg.image_size))
                probed.add(cfg.arch)
            except Exception:  # noqa: BLE001 - an estimate must never stop the form; the reference stands in
                rate = None
        if rate is None:
            reference = True
        seconds += cpu_seconds(cfg, n_train, n_eval, rate)
    parts = []
    if measured:
        parts.append(f"the images/s this machine reached in {', '.join(f'`{m}`' for m in sorted(measured))}")
    if probed:
        parts.append(f"a few training steps of {', '.join(sorted(probed))} timed on this machine just now "
                     "(image decoding not included, so the real run is somewhat slower)")
    if reference:
        parts.append(f"the {SOURCE} (no finished run of that model here yet; a loaded machine is slower)")
    return seconds, " and ".join(parts)


def runs_to_start(configs: list[TrainConfig], missing: dict[str, str], without_weights: str = "scratch"
                  ) -> list[TrainConfig]:
    """The runs Start launches: all of ``configs``, less those needing missing weights (or none at all
    when the user chose to start nothing without them), so the button and the estimate count the same."""
    if not missing:
        return list(configs)
    if without_weights == "none":
        return []
    return [c for c in configs if not needs_missing_weights(c, missing)]


def duration_text(seconds: float) -> str:
    """``about 9 h 40 min``, ``about 25 min``, ``under a minute``."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        return f"about {round(hours / 24)} days"
    return f"about {hours} h {minutes:02d} min"
