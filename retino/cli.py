"""The CLI's shared pieces and its grading verbs (predict, cam-score, screen, export): their printing.

``retino/__main__.py`` holds the parser, ``main`` and the data/training verbs; what prints grades,
maps and reports lives here, so neither file is a grab-bag of both. Nothing heavy is imported at
module level: ``train`` installs its stop handler before torch loads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad arguments or data: printed as one line, exit status 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with every error as one line, ``error: ...`` (exit 2); the usage only with ``--help``."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see: {self.prog} --help)\n")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _num(value, digits: int = 4) -> str:
    """A metric for reading: rounded, or a dash where it is undefined."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- grading verbs

def _check_cam_method(method: str, flag: str) -> None:
    from .inference.explain import list_cam_methods
    if method not in list_cam_methods():
        raise UserError(f"Invalid {flag} {method!r}. Choose one of: {', '.join(list_cam_methods())}.")


def _cam_path(cam_dir: Path, image: str, used: set) -> Path:
    """``<stem>_cam.png``, numbered when two inputs share a stem."""
    stem = Path(image).stem or "image"
    name, i = f"{stem}_cam.png", 1
    while name in used:
        i += 1
        name = f"{stem}_{i}_cam.png"
    used.add(name)
    return cam_dir / name


def _write_cams(preds, cam_dir: Path) -> dict[int, str]:
    """Each graded photo's map (from its grading pass) over the photo, at the photo's own size: ``{index: path}``.

    Laid over the photo as decoded for grading and scaled to the size its header gives: no second decode.
    """
    import numpy as np
    from PIL import Image
    from .inference.explain import overlay_on_photo
    cam_dir.mkdir(parents=True, exist_ok=True)
    cams, used = {}, set()
    for i, p in enumerate(preds):
        if p.ok and p.heatmap is not None:
            picture = Image.fromarray(overlay_on_photo(np.asarray(p.original), p.heatmap, p.crop))
            size = _stored_size(p.image) or picture.size
            path = _cam_path(cam_dir, p.image, used)
            (picture if picture.size == size else picture.resize(size, Image.BILINEAR)).save(path)
            cams[i] = str(path)
    return cams


def _stored_size(path) -> tuple[int, int] | None:
    """(W, H) of an image file upright, from its header (nothing is decoded)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # EXIF: rotated by 90 degrees
    except (OSError, ValueError):
        return None


def _predict_header(trained) -> str:
    """The run, its checkpoint, how its probabilities are calibrated and the referral rule: once, on stderr."""
    from .inference.trained import referral
    calib = ""
    if trained.config.head == "classify":
        calib = (f"; probabilities calibrated (temperature {trained.temperature:.3g})" if trained.temperature
                 else "; probabilities not calibrated")
    notes = "".join(f"\nnote: {n}" for n in trained.notes)  # what is missing or stale, and how to make it
    return (f"{trained.run_dir}: {trained.checkpoint} (epoch {trained.epoch}){calib}\n"
            f"referable when {referral(trained)[1]}{notes}")


def _predict_line(p, cam: str | None) -> str:
    """One photo, one line: its grade, probabilities or score, referral and, if not ok, the gate's verdict."""
    if not p.ok:
        return f"{p.image}: rejected: {p.reason}  status: {p.status}"
    detail = f"score {p.score:.2f}" if p.score is not None else "p = " + " ".join(f"{q:.2f}" for q in p.probs)
    line = f"{p.image}: grade {p.grade} ({p.grade_name})  {detail}  referable: {'yes' if p.referable else 'no'}"
    if p.status != ("refer" if p.referable else "no referral"):  # an ungradable photo: its eye is referred
        line += f"  status: {p.status}"
    if p.referable_why:
        line += f" ({p.referable_why})"
    q = p.quality or {}
    if q.get("verdict", "ok") != "ok":
        line += f"  quality: {q['verdict']} ({'; '.join(q['reasons'])})"
    return line + (f"  cam: {cam}" if cam else "")


def cmd_predict(args) -> int:
    """Exit 0 when every image was graded, 2 when any was rejected (unreadable, or not a fundus photograph)."""
    from .inference.trained import load_trained
    from .inference.predict import predict
    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    if cam_dir:
        _check_cam_method(args.cam_method, "--cam-method")
        if cam_dir.exists() and not cam_dir.is_dir():  # found now, not after grading everything
            raise UserError(f"--cam-dir {cam_dir}: exists and is not a folder")
    from .inference import engine
    trained = load_trained(args.run_dir, lazy=True)  # a cached ONNX model grades without the PyTorch network
    try:
        runner = engine.get(trained, args.engine) if not cam_dir else None  # maps: PyTorch's gradients
    except engine.EngineError as e:
        raise UserError(str(e)) from None
    preds = predict(trained, args.images, tta=args.tta, quality_gate=not args.no_quality_gate,
                    cam=args.cam_method if cam_dir else None, engine=args.engine)
    cams = _write_cams(preds, cam_dir) if cam_dir else {}
    used = runner.info() if runner is not None else engine.TorchEngine(trained.model).info()
    source = {"run": str(trained.run_dir), "checkpoint": trained.checkpoint, "epoch": trained.epoch,
              "engine": used["engine"], "engine_version": used["version"]}
    if args.json:
        _print_json([{**p.as_dict(), **source, "cam": cams.get(i)} if p.ok else p.as_dict()
                     for i, p in enumerate(preds)])
    else:
        print(_predict_header(trained) + f"\ngraded with {engine.describe(used)}", file=sys.stderr)
        for i, p in enumerate(preds):
            print(_predict_line(p, cams.get(i)))
    for p in preds:  # e.g. unreadable EXIF: each line names its file
        for warning in p.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0 if all(p.ok for p in preds) else EXIT_BAD_INPUT


def cmd_export(args) -> int:
    """Write the model file and its deployment JSON; print both paths."""
    from .training import admission
    from .inference.export import export_run
    out = admission.user_path(args.out, "--out") if args.out else None
    try:
        model_path, json_path = export_run(admission.user_path(args.run_dir, "RUN_DIR"), args.format, out,
                                           force=args.force, unfinished=args.unfinished)
    except ImportError as e:  # onnx is an optional extra
        raise UserError(f"--format {args.format} needs the {e.name or 'onnx'} package: pip install onnx onnxruntime")
    except OSError as e:
        raise UserError(f"cannot write the export: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
    print(model_path)
    print(json_path)
    return 0


def cmd_cam_score(args) -> int:
    """One JSON object with ``--json``, else three readable lines."""
    from .inference.pointing import cam_score
    _check_cam_method(args.method, "--method")
    result = cam_score(args.run_dir, data=args.data, method=args.method, limit=args.limit, contrast=args.contrast)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['method']} on {result['n']} test images of grade >= 2:")
    print(f"  pointing game hit rate  {result['hit_rate']:.3f}   (random map {result['random_hit_rate']:.3f})")
    print(f"  heat-map mass in lesions {result['mass_in_mask']:.3f}   (random map {result['random_mass_in_mask']:.3f})")
    return 0


def cmd_screen(args) -> int:
    """Exit 0 when the folder was screened (unreadable files are rows of the report), 130 on Ctrl-C."""
    from .training import admission
    from .screening.screen import ScreenError, screen
    from .screening.screen_paths import MAX_FILES
    from .screening.shard import screen_sharded, sharded
    from .inference.engine import describe
    if args.max_files is not None and args.max_files < 1:
        raise UserError(f"--max-files must be a whole number >= 1, got {args.max_files}")
    limit = None if args.yes else (args.max_files if args.max_files is not None else MAX_FILES)
    try:
        run = screen_sharded if sharded() else screen  # under torchrun: this rank's share, merged by rank 0
        result = run(admission.user_path(args.run_dir, "RUN_DIR"), admission.user_path(args.folder, "FOLDER"),
                     admission.user_path(args.out, "--out") if args.out else None, batch_size=args.batch_size,
                     tta=args.tta, workers=args.workers, quality_gate=not args.no_quality_gate, device=args.device,
                     engine=args.engine, progress=not args.quiet, max_files=limit)
    except ScreenError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        print("interrupted: the photos graded so far are in the report; run the same command again to continue",
              file=sys.stderr)
        return 130
    if result is None:  # a torchrun rank other than 0: its share is in the report rank 0 merged and prints
        return 0
    s = result.summary()
    if args.json:
        _print_json(s)
        return 0
    print(f"{s['photos']} photos ({s['skipped']} already in the report): {s['graded']} graded "
          f"({s['ungradable']} ungradable), {s['errors']} not graded ({s['not_fundus']} not a fundus)")
    print(f"{s['patients']} patients, {s['patients_to_refer']} to refer: {s['referable_patients']} referable, "
          f"{s['ungraded_patients']} refer: ungraded eye (an eye not graded or ungradable)")
    print(f"referable when {s['threshold_source']}")
    ranks = f", on each of {s['world_size']} ranks" if s["world_size"] > 1 else ""
    print(f"graded with {describe(s['engine'])}{ranks}")
    print(f"photos:   {s['report']}\npatients: {s['patients_report']}")
    return 0
