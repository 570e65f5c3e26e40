"""Export a trained run for deployment: ONNX or TorchScript, and a JSON with its preprocessing.

The exported network takes what Retino's own model takes, a normalised batch ``(B, 3, S, S)``
float32 RGB at the run's image size ``S`` (the batch dimension is free), and gives what it gives:
logits ``(B, 5)`` for a classify head, the score ``(B, 1)`` for a regress head. Everything before
and after (the fundus crop, Ben Graham's normalisation and its boundary mask, mean/std, the
temperature, the regression thresholds, the operating point, the grade names) is written to a
JSON beside the model, so that a deployment can reproduce Retino's predictions to 1e-4.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch

from .. import runs
from ..data.preprocess import MASK_FRACTION
from ..grades import GRADE_NAMES, REFERABLE_GRADE
from .trained import load_trained, referral
from .. import fileio

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17                  # ONNX opset: onnxruntime >= 1.14 runs it; every op of a ResNet is in it
BOUNDARY_FRACTION = MASK_FRACTION  # Ben Graham's mask: 90% of the fundus radius (retino.data.preprocess, issue 11)


def _inside_run(path: Path) -> Path | None:
    """The run folder ``path`` lies in (a folder with status.json or best.pt above it), else None."""
    for folder in [path.parent, *path.parent.parents]:
        if (folder / "status.json").is_file() or (folder / "best.pt").is_file():
            return folder
    return None


def _paths(run_dir: Path, fmt: str, out, force: bool) -> tuple[Path, Path]:
    """The model's path and its JSON's (``<model file>.json``: never the same path, one per format).

    Default ``exports/<run name>/`` in the working folder. Refused: a path inside a run folder, and
    (without ``force``) one that would replace an existing file.
    """
    suffix = FORMATS[fmt]
    if out is None:
        model_path = Path("exports") / run_dir.name / f"model{suffix}"
    else:
        out = Path(out)
        model_path = out / f"model{suffix}" if out.is_dir() or not out.suffix else out
    json_path = model_path.with_name(model_path.name + ".json")
    if model_path.suffix == ".json":
        raise runs.RunError(f"--out {model_path}: a model file must not end in .json (its JSON is written beside "
                            f"it as {json_path.name})")
    run = _inside_run(model_path.resolve())
    if run is not None:
        raise runs.RunError(f"--out {model_path}: inside the run folder {run}; export writes outside run "
                            f"folders, so it cannot replace a run's own files")
    if not force:
        for path in (model_path, json_path):
            if path.exists():
                raise runs.RunError(f"{path}: exists; pass --force to replace it")
    return model_path, json_path


def _check_state(run_dir: Path, unfinished: bool) -> None:
    """A running or failed run has no final choices for its checkpoint: refused unless ``unfinished``."""
    try:
        status = runs.read_status(run_dir)
    except runs.RunError:
        return
    state = status.get("state")
    if not unfinished and (state in runs.ACTIVE or state == "failed"):
        why = "is still training" if state in runs.ACTIVE else f"failed ({status.get('error') or 'no reason'})"
        raise runs.RunError(f"{run_dir.name}: {why}; its best.pt may change and its choices (temperature, "
                            f"operating point) may not be made; pass --unfinished to export it anyway")


def write_onnx(model: torch.nn.Module, example: torch.Tensor, outputs: tuple[str, ...], path: Path) -> None:
    """``model`` as ONNX at ``path`` (written whole or not at all): input ``image`` shaped like
    ``example``, the named ``outputs``, the batch dimension free on all of them."""
    # The TorchScript-based exporter: for a plain CNN it gives the same graph as the torch.export
    # one (dynamo=True), in 4 s instead of 30 s on this project's 2-core machine, without needing
    # onnxscript. It is deprecated from torch 2.9 but present in the pinned 2.14; when it goes,
    # pass dynamo=True with dynamic_shapes=({0: torch.export.Dim("batch")},) instead.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["image"],
                              output_names=list(outputs), opset_version=OPSET, do_constant_folding=True,
                              dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _torchscript_bytes(model: torch.nn.Module) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated; the issue asks for it
        scripted = torch.jit.script(model)               # scripted, not traced: no shape is baked in
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def _extras(trained) -> dict:
    """Temperature, operating point and the referral rule, as ``predict`` applies them: what
    ``load_trained`` read from the run's ``evaluation.json`` (chosen on val), else 1.0 and the default cut."""
    cut, rule = referral(trained)
    score = ("the score" if trained.config.head == "regress"
             else f"P(grade >= {REFERABLE_GRADE}): the sum of softmax(logits / temperature) over grades "
                  f"{REFERABLE_GRADE}-4")
    return {"temperature": float(trained.temperature or 1.0), "operating_point": trained.operating_point,
            "selected_on": trained.selected_on,
            "referral": {"threshold": cut, "rule": rule, "referable_when": f"{score} >= threshold"},
            "notes": list(trained.notes)}


def deployment_info(trained, fmt: str, model_file: str, checkpoint: str = "best.pt") -> dict:
    """What a deployment needs beside the network to reproduce Retino's predictions (JSON-safe)."""
    cfg = trained.config
    size = int(cfg.image_size)
    head = cfg.head
    output = "logits" if head == "classify" else "score"
    n_out = int(trained.model.fc.out_features)
    extras = _extras(trained)
    return {
        "format": fmt, "model_file": model_file, "run": Path(trained.run_dir).name, "checkpoint": checkpoint,
        "epoch": int(trained.epoch), "arch": cfg.arch, "head": head,
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "layout": "NCHW, RGB", "values": "(pixel / 255 - mean) / std"},
        "output": {"name": output, "shape": ["batch", n_out],
                   "meaning": "logits: softmax(logits / temperature) gives P(grade 0..4)" if head == "classify"
                   else "score: the grade is the number of thresholds it exceeds"},
        "preprocessing": {
            "steps": [f"decode to RGB (EXIF orientation applied, alpha on black); a JPEG is decoded at reduced "
                      f"scale as libjpeg's DCT scaling allows (PIL: img.draft('RGB', ({size}, {size})) before "
                      f"load: the smallest of 1/8, 1/4, 1/2 or full scale whose both sides stay >= {size} px)",
                      "crop to the fundus: rows and columns where more than 2% of pixels have "
                      "max(R, G, B) > 12",
                      f"resize the crop so its long side is {size} px (area interpolation when shrinking, "
                      "bilinear when enlarging)",
                      f"pad with black to a centred {size} x {size} square",
                      *(["Ben Graham: 4 * img - 4 * GaussianBlur(img, sigma = size / 60) + 128, then 128 "
                         f"outside {BOUNDARY_FRACTION} x the fundus radius (size / 2) and within "
                         f"{1 - BOUNDARY_FRACTION:.1f} x that radius of the crop's edges in the square "
                         "(a clipped edge)"] if cfg.ben_graham else []),
                      "scale to [0, 1], subtract mean, divide by std (per channel)"],
            "image_size": size, "jpeg_draft_target": size, "ben_graham": bool(cfg.ben_graham), "boundary_mask_fraction": BOUNDARY_FRACTION,
            "mean": [float(m) for m in trained.norm[0]], "std": [float(s) for s in trained.norm[1]]},
        "postprocessing": {"temperature": extras["temperature"],
                           "thresholds": [float(t) for t in trained.thresholds],
                           "operating_point": extras["operating_point"], "selected_on": extras["selected_on"],
                           "referral": extras["referral"], "grade_names": list(GRADE_NAMES),
                           "notes": extras["notes"]},
    }


def export_run(run_dir, fmt: str = "onnx", out=None, *, checkpoint: str = "best.pt", force: bool = False,
               unfinished: bool = False) -> tuple[Path, Path]:
    """Write a run's model as ONNX or TorchScript and its deployment JSON beside it.

    Args:
        run_dir: the run folder; its ``checkpoint`` (best.pt) is exported.
        fmt: "onnx" or "torchscript".
        out: the model file, or a folder for ``model.onnx``/``model.pt``; default
            ``exports/<run name>/``. The JSON is the model's name plus ``.json``. Never inside a
            run folder; an existing file is replaced only with ``force``.
        unfinished: export a run that is still training or failed (refused otherwise).

    Returns:
        ``(model_path, json_path)``.

    Raises:
        ValueError: an unknown format. RunError: no such run folder or checkpoint, an unfinished run,
            or a destination that is refused.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Invalid export format {fmt!r}. Choose one of: {', '.join(FORMATS)}.")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: no such run folder")
    if not (run_dir / checkpoint).is_file():
        raise runs.RunError(f"{run_dir / checkpoint}: missing; export needs a run that finished at "
                            f"least one epoch")
    _check_state(run_dir, unfinished)
    model_path, json_path = _paths(run_dir, fmt, out, force)
    trained = load_trained(run_dir, checkpoint)
    model = trained.model.cpu().eval()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    size = int(trained.config.image_size)
    example = torch.zeros(2, 3, size, size)                  # (B, 3, S, S): B = 2 keeps the batch free
    if fmt == "onnx":
        write_onnx(model, example, ("logits" if trained.config.head == "classify" else "score",), model_path)
    else:
        fileio.write_atomic(model_path, _torchscript_bytes(model))
    fileio.write_json(json_path, deployment_info(trained, fmt, model_path.name, checkpoint))
    return model_path, json_path
