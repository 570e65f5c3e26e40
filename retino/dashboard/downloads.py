"""What the dashboard's download buttons hand over, as bytes: where the CLI has a verb, a button.

Each function is called only when its button is pressed (Streamlit's deferred download), so a page
showing ten runs builds no zip and exports no model until one is asked for.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from .. import runs

# last.pt holds the optimizer's moments for a resume (3x best.pt): not a result, and ~0.4 GB for a ResNet-50
LEFT_OUT = ("last.pt",)
_STORED = (".pt", ".npz", ".onnx")  # already dense: deflating them costs seconds and saves nothing


def run_files(run_dir) -> list[Path]:
    """The files of a run worth handing over: all but resume state, locks and half-written temporaries."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise runs.RunError(f"{run_dir}: not a Retino run folder (no config.json)")
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name not in LEFT_OUT
                  and not any(part.startswith(".") for part in p.relative_to(run_dir).parts))


def run_zip(run_dir) -> bytes:
    """A run's files as a zip, under a folder named after the run (what unzipping should give)."""
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in run_files(run_dir):
            arc = f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}"
            z.write(path, arc, compress_type=zipfile.ZIP_STORED if path.suffix in _STORED else None)
    return buf.getvalue()


def exported_model(run_dir, fmt: str) -> bytes:
    """The run's chosen model as an ONNX or TorchScript file (``retino.inference.export``), written nowhere else."""
    from ..inference.export import export_run
    with tempfile.TemporaryDirectory(prefix="retino-export-") as tmp:
        model_path, _ = export_run(run_dir, fmt, Path(tmp))
        return model_path.read_bytes()


def export_file_name(run_id: str, fmt: str) -> str:
    from ..inference.export import FORMATS
    return f"{runs.safe_name(run_id)}{FORMATS[fmt]}"


def report_html(run_dirs: Sequence) -> bytes:
    """The self-contained HTML report of these runs (:mod:`retino.dashboard.html_report`)."""
    from .html_report import build_report
    return build_report([Path(d) for d in run_dirs]).encode("utf-8")
