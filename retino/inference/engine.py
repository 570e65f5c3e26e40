"""What runs a run's network on a batch: ONNX Runtime on a CPU, PyTorch on a GPU and for Grad-CAM.

Clinics grade on CPUs, and on one ONNX Runtime's CPU provider ran the checkpoint Retino already
exports 1.1-1.5x faster than the fastest PyTorch path measured (BatchNorm folded, channels_last)
and 1.6-2.5x faster than PyTorch as it comes (bench/inference.py, a 2-core CPU at 512 px). So the
grading path (:mod:`retino.inference.grading`) asks :func:`get` for an engine and hands it
normalised batches; an engine gives back the outputs and the penultimate
features (the out-of-distribution view) from one pass.

The ONNX model is made from the checkpoint on first use and kept in the run folder's ``cache/``
(``<checkpoint stem>-<sha256 prefix>.onnx``: a changed checkpoint, a still-training run's new best
epoch, gets a new file and the old one is removed). Where the run folder cannot be written, the
file goes under :func:`retino.paths.cache_root`. A fresh export is checked against PyTorch on a
test batch before it is used; one that disagrees is not used (PyTorch grades, and the note says why).

``auto`` is ONNX Runtime where the model runs on the CPU and onnxruntime imports, else PyTorch.
Grad-CAM always runs in PyTorch: it needs gradients.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data._workers import usable_cores
from ..paths import cache_root
from .export import write_onnx

ENGINES = ("auto", "torch", "onnx")
PARITY_ATOL = 1e-3        # a fresh ONNX model whose outputs differ from PyTorch's by more is not used
_GUARD = threading.Lock()


class EngineError(ValueError):
    """An engine that cannot run here (one line naming it and what to do)."""


# ----------------------------------------------------------------------------- the engines

class TorchEngine:
    """The run's PyTorch model; ``fast``: a copy with BatchNorm folded into the convolutions, channels_last
    (Screen's batches: 2-3x a plain model's forward at 512 px on a 2-core CPU, bench/screen.py)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, *, fast: bool = False):
        self.model = fast_copy(model) if fast else model
        self.fast = fast
        self.device = next(self.model.parameters()).device
        self._lock = threading.Lock()  # a forward hook catches the features: one batch at a time

    def run(self, x: torch.Tensor, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Outputs (N, K) float64 and, with ``features``, the penultimate features (N, d) of normalised ``x``."""
        from .trained import model_lock
        model, caught = self.model, []
        x = x.to(self.device)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with model_lock(model), self._lock, torch.inference_mode():
            model.eval()
            hook = model.fc.register_forward_pre_hook(lambda _m, inp: caught.append(inp[0])) if features else None
            try:
                out = model(x).float()
            finally:
                if hook is not None:
                    hook.remove()
        feats = torch.flatten(caught[0], 1).float().cpu().numpy() if features else None
        return out.cpu().numpy().astype(np.float64), feats

    def info(self) -> dict:
        return {"engine": "torch", "version": torch.__version__, "device": str(self.device),
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                "bn_folded": self.fast}


class OnnxEngine:
    """An ONNX Runtime CPU session over a file made by :func:`export_onnx` (outputs and features)."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, path: Path, *, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        # every core this process may use: ONNX Runtime's default counts the machine's, not the affinity mask's
        opts.intra_op_num_threads = int(threads or usable_cores())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initialisers are not the user's business
        self.path = Path(path)
        self.threads = opts.intra_op_num_threads
        self.version = ort.__version__
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x: torch.Tensor, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {"image": np.ascontiguousarray(x.detach().float().cpu().numpy())}
        # session.run is thread-safe: Streamlit sessions sharing one run share the session
        out, feats = self.session.run(None, feed)
        return out.astype(np.float64), (feats.astype(np.float32) if features else None)

    def info(self) -> dict:
        return {"engine": "onnx", "version": f"onnxruntime {self.version}", "device": "cpu",
                "threads": self.threads, "model_file": str(self.path)}


def fast_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy for batched inference: BatchNorm folded into the convolutions, channels_last.

    Same outputs to float rounding; the shared model is not touched.
    """
    model = model if not model.training else copy.deepcopy(model).eval()
    try:
        from torch.fx.experimental.optimization import fuse
        fast = fuse(model)  # a copy (inplace=False)
    except Exception:  # noqa: BLE001 - fx cannot trace every model; the fusion is only a speed-up
        fast = copy.deepcopy(model)
    return fast.to(memory_format=torch.channels_last).eval()


# ----------------------------------------------------------------------------- choosing one

def onnxruntime_available() -> bool:
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        return False
    return True


def resolve(name: str, device: torch.device | str) -> str:
    """``auto``/``torch``/``onnx`` -> the engine that runs: ONNX Runtime on a CPU where it imports.

    Raises:
        EngineError: an unknown name, or ``onnx`` where onnxruntime does not import.
    """
    if name not in ENGINES:
        raise EngineError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
    on_cpu = torch.device(device).type == "cpu"
    if name == "auto":
        return "onnx" if on_cpu and onnxruntime_available() else "torch"
    if name == "onnx" and not onnxruntime_available():
        raise EngineError("engine onnx: onnxruntime does not import here; install it (pip install onnxruntime) "
                          "or use --engine torch")
    return name


def get(trained, name: str = "auto", *, fast: bool = False):
    """The engine ``name`` for a ``Trained``, made once and kept on it (sessions and folded copies are costly).

    ``fast``: PyTorch's folded channels_last copy (Screen's batches) rather than the model itself.
    Where a fresh ONNX model fails its check, PyTorch is returned and ``trained.notes`` says why.

    Raises:
        EngineError: as :func:`resolve`.
    """
    from .trained import device_of
    which = resolve(name, device_of(trained))
    key = f"{which}-fast" if which == "torch" and fast else which
    with _GUARD:
        lock = trained.engines.setdefault(f"{key}.lock", threading.Lock())
    with lock:  # one export per run and checkpoint, however many Streamlit sessions ask at once
        if key not in trained.engines:
            trained.engines[key] = _make(trained, which, fast)
        return trained.engines[key]


def _make(trained, which: str, fast: bool):
    if which == "torch":
        return TorchEngine(trained.model, fast=fast)
    try:
        path = onnx_model(trained)
        try:
            return OnnxEngine(path)
        except Exception:  # noqa: BLE001 - a cached file cut short (a crash, a full disk): made again, once
            path.unlink(missing_ok=True)
            return OnnxEngine(onnx_model(trained))
    except EngineMismatch as e:
        trained.notes.append(str(e))
    except Exception as e:  # noqa: BLE001 - the ONNX model is a speed-up: a disk that cannot take it,
        # or an exporter that cannot convert, leaves PyTorch grading, said in the run's notes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        trained.notes.append(f"no ONNX model could be made for this checkpoint ({first}); PyTorch grades instead")
    return TorchEngine(trained.model, fast=True)


def describe(info: dict) -> str:
    """``ONNX Runtime 1.23.2 (CPU, 2 threads)`` or ``PyTorch 2.14.1 (cuda:0)``: what ran the network."""
    name = ("ONNX Runtime " + info["version"].split()[-1] if info["engine"] == "onnx"
            else f"PyTorch {info['version']}")
    device = "CPU" if info["device"] == "cpu" else info["device"]
    threads = f", {info['threads']} threads" if info.get("threads") else ""
    return f"{name} ({device}{threads})"


# ----------------------------------------------------------------------------- the cached ONNX model

class EngineMismatch(RuntimeError):
    """A fresh ONNX model's outputs differ from PyTorch's: it is not used."""


class _WithFeatures(torch.nn.Module):
    """A Retino ResNet giving ``(output, penultimate features)``: the OOD view costs no second pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        feats = torch.flatten(m.avgpool(h), 1)
        return m.fc(feats), feats


def checkpoint_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_path(trained) -> Path:
    """Where the checkpoint's ONNX model is kept: ``<run>/cache/<stem>-<sha256[:16]>.onnx``, or under
    the cache root when the run folder cannot be written."""
    run_dir = Path(trained.run_dir)
    ckpt = run_dir / trained.checkpoint
    name = f"{Path(trained.checkpoint).stem}-{checkpoint_sha256(ckpt)[:16]}.onnx"
    here = run_dir / "cache"
    # Only a cache/ folder Retino could have made: not a link leading elsewhere, not a file in its place.
    ours = here.is_dir() and not here.is_symlink() if os.path.lexists(here) else True
    if ours and os.access(here if here.is_dir() else run_dir, os.W_OK):
        return here / name
    tag = hashlib.sha1(os.fsencode(str(run_dir.resolve()))).hexdigest()[:8]
    return cache_root() / "engines" / f"{run_dir.name}-{tag}" / name


def onnx_model(trained) -> Path:
    """The checkpoint's ONNX model (outputs and features), exported and checked on first use.

    Raises:
        EngineMismatch: the fresh export's outputs differ from PyTorch's by more than PARITY_ATOL.
        OSError: neither the run folder nor the cache root can be written.
    """
    path = cache_path(trained)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = trained.model
    size = int(trained.config.image_size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        export_onnx(model, size, tmp)
        _check(model, tmp, size)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    stem = Path(trained.checkpoint).stem
    for old in path.parent.glob(f"{stem}-*.onnx"):  # the same checkpoint's earlier versions
        if old != path:
            old.unlink(missing_ok=True)
    return path


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> None:
    """Write ``model`` (with its features output) as ONNX: input ``image`` (B, 3, S, S) normalised,
    outputs ``output`` (B, K) and ``features`` (B, d), the batch dimension free."""
    was_training = model.training
    model.eval()
    example = torch.zeros(2, 3, size, size, device=next(model.parameters()).device)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")   # the tracer's remarks on the wrapper are not the user's business
            write_onnx(_WithFeatures(model), example, ("output", "features"), path)
    finally:
        model.train(was_training)


def _check(model: torch.nn.Module, path: Path, size: int) -> None:
    """Run the fresh file on a test batch beside PyTorch; refuse it when they part."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    from .trained import model_lock
    with model_lock(model), torch.inference_mode():
        model.eval()
        want = model(x.to(next(model.parameters()).device)).float().cpu().numpy()
    got, _ = OnnxEngine(path, threads=1).run(x, features=False)
    diff = float(np.abs(got - want).max())
    if not np.isfinite(diff) or diff > PARITY_ATOL:
        raise EngineMismatch(f"the ONNX model made from this checkpoint differs from PyTorch by {diff:.2g} "
                             f"(more than {PARITY_ATOL:g}); PyTorch grades instead")
