"""The command line: ``python -m retino <verb>``. Bad arguments or data exit 2 with one line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from .cli import (EXIT_BAD_INPUT, UserError, _num, _Parser, _print_json, cmd_cam_score, cmd_export, cmd_predict,
                  cmd_screen)


# ----------------------------------------------------------------------------- verbs

def cmd_report(args) -> int:
    from .dashboard.html_report import write_report
    out = write_report(args.run_dirs, args.out, n_worst=max(0, args.worst))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    from .data.synthetic import make_dataset
    try:
        out = make_dataset(args.out_dir, n=args.n, size=args.size, seed=args.seed, progress=not args.quiet,
                           degraded=args.degraded)
    except ValueError as e:
        raise UserError(str(e))
    counts = json.loads((out / "synth.json").read_text()).get("degraded_counts") or {}
    degraded = (f", {sum(counts.values())} of them degraded ({', '.join(f'{n} {k}' for k, n in counts.items())}; "
                f"listed in {out / 'quality.csv'})" if counts else "")
    print(f"wrote {args.n} synthetic fundus images to {out}{degraded}", file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    from .data import read_dataset, stats
    from .dashboard import settings
    from .fileio import resolve_data_path
    report = stats(read_dataset(resolve_data_path(args.data_dir)), deep=args.deep)
    if args.json:
        _print_json(report)
        return 0
    print(f"{report['path']}: layout {report['layout']} ({settings.split_text(report['split'])})")
    for split, s in report["splits"].items():
        cells = "  ".join(f"{g}: {c:>6} ({100 * sh:4.1f}%)" for g, (c, sh) in enumerate(zip(s["counts"], s["shares"])))
        print(f"  {split:<5} n={s['n']:<6} {cells}")
        print(f"        always predicting grade {s['majority_grade']} scores {100 * s['majority_acc']:.1f}% accuracy"
              f" (QWK 0); eyes left {s['eyes']['left']} / right {s['eyes']['right']}")
    print(f"  problems: {len(report['problems'])}")
    for p in report["problems"][:50]:
        print(f"    {p['error']}")
    return 0


def _train_parser(sub) -> None:
    from .config import PRESETS, add_config_arguments
    # each config flag's help already states its default (the flags' own default is None: "not given")
    p = sub.add_parser("train", help="train a model; every TrainConfig field has a flag")
    add_config_arguments(p)
    p.add_argument("--preset", type=str.lower, choices=list(PRESETS),
                   help="queue a preset's runs (flags given override its settings): "
                        + "; ".join(f"{k}: {v.label}" for k, v in PRESETS.items()))
    p.add_argument("--run-dir", help="run folder to write (default: checkpoints/<date>-<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or interrupted run from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--mlflow", metavar="URI", help="also log to this MLflow tracking server (default: "
                                                   "$MLFLOW_TRACKING_URI; a failure warns and training goes on)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    if getattr(args, "mlflow", None):  # the trainer (this process or its children) reads the environment
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow
    from .training import admission
    from . import runs
    from .config import config_from_args
    from .models import WeightsUnavailable, check_weights
    from .training.train import fit
    from .training.loop import TrainingError
    if args.resume:
        run_dir = admission.user_path(args.resume, "--resume")
        saved, cfg, changed = admission.resume_config(run_dir, args)
        trained = len(runs.read_metrics(run_dir)) >= saved.epochs
        if trained and not (run_dir / "last.pt").is_file() and cfg.epochs > saved.epochs:
            raise admission.RunRefused(f"cannot extend {run_dir} to {cfg.epochs} epochs: its last.pt was deleted when it "
                                       f"completed (train with --keep-last true to extend runs later)")
        # complete = every epoch and every file of the final evaluation (ood.npz included); otherwise
        # fit() finishes what is missing, from last.pt or, once that is gone, from best.pt
        if trained and cfg.epochs <= saved.epochs and not runs.final_missing(run_dir):
            if not cfg.keep_last:  # killed between the last file and last.pt's removal
                (run_dir / "last.pt").unlink(missing_ok=True)
            runs.write_status(run_dir, state="completed", error=None)
            print(f"{run_dir}: nothing to resume: the run completed all {saved.epochs} epochs", file=sys.stderr)
            return 0
    else:
        if getattr(args, "preset", None):
            return _train_preset(args)
        cfg, changed = config_from_args(args), {}
        try:  # found (or fetched) before a folder is made or an image cached
            check_weights(cfg.arch, pretrained=cfg.pretrained, weights_path=cfg.weights or None)
        except WeightsUnavailable as e:
            raise UserError(str(e))
        _check_device_and_data(cfg)  # before the run folder is made: a bad data set leaves no empty folder
        run_dir = admission.fresh_run_dir(args, cfg)
    if args.resume:
        _check_device_and_data(cfg)
    if changed:
        runs.update_config(run_dir, cfg.to_dict(), changed)
    try:
        best = fit(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    except WeightsUnavailable as e:
        raise UserError(str(e))
    except (TrainingError, OSError) as e:
        from .training.lifecycle import failure_message
        print(f"error: {failure_message(e, batch_size=cfg.batch_size, image_size=cfg.image_size)}", file=sys.stderr)
        return 1
    if "stopped_at" in best:
        print(f"stopped at epoch {best['stopped_at']['epoch']}, step {best['stopped_at']['step']}; "
              f"resume with: python -m retino train --resume {run_dir}", file=sys.stderr)
    elif best:
        print(f"{run_dir}: best epoch {best['epoch']} by val QWK {best['val_qwk']:.4f}; "
              f"test: python -m retino evaluate {run_dir}", file=sys.stderr)
    return 0


def _check_device_and_data(cfg) -> None:
    """A missing GPU or a bad data set is one line before any process, folder write or cache."""
    import torch
    from .data import read_dataset
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    read_dataset(cfg.data)


def _train_preset(args) -> int:
    """``train --preset NAME``: each of the preset's runs in turn, in its own folder."""
    from .config import config_from_args, expand_preset, preset_base
    base = config_from_args(args, preset_base(args.preset))  # the preset's settings, then the flags given
    for cfg in expand_preset(args.preset, base):
        sub = argparse.Namespace(**{**vars(args), "preset": None, "run_dir": None})
        for k, v in cfg.to_dict().items():
            setattr(sub, k, v)
        code = cmd_train(sub)
        if code:
            return code
    return 0


def cmd_evaluate(args) -> int:
    from .dashboard import runs_view as dashboard
    from .evaluation.evaluate import evaluate_run
    from .grades import GRADES, grade_label
    from .evaluation.stats import format_interval
    r = evaluate_run(args.run_dir, data=args.data, split=args.split)
    if args.json:
        _print_json(r)
        return 0
    where = f" of {r['data']}" if r.get("data") else ""
    print(f"{args.run_dir}: epoch {r['epoch']}, {r['split']} split{where} ({r['n_images']} images, "
          f"{r['n_patients']} patients); choices made on {r['selected_on']}")
    print(f"  95% patient-level bootstrap intervals, {r['n_boot']} resamples:")
    for name, entry in r["metrics"].items():
        print(f"  {name:<16} {format_interval(entry)}")
    for name, entry in (r.get("patient") or {}).items():
        print(f"  {'patient ' + name:<16} {format_interval(entry)}")
    op, cal = r["operating_point"], r["calibration"]
    if op.get("threshold") is not None:
        print(f"  operating point  referable score >= {_num(op['threshold'], 3)} (chosen for sensitivity "
              f"{_num(op['target_sensitivity'], 2)})")
    worse = dashboard.calibration_note(cal)
    print(f"  calibration      temperature {_num(cal['temperature'], 3)}, ECE {_num(cal['ece'], 3)} "
          f"(before temperature {_num(cal['ece_before_temperature'], 3)})" + (f": {worse}" if worse else ""))
    base = r["majority_baseline"]
    print(f"  majority         always grade {base['grade']}: accuracy {_num(base['acc'], 3)}, QWK {_num(base['qwk'], 3)}")
    confusion = r["confusion"]
    print("per grade:            recall  precision      n")
    precision = [row[g] / max(sum(col[g] for col in confusion), 1) for g, row in enumerate(confusion)]
    for g in GRADES:
        print(f"  {grade_label(g):<16} {_num(r['per_grade_recall'][g], 3):>8} {_num(precision[g], 3):>10} "
              f"{sum(confusion[g]):>6}")
    print("confusion (rows = true grade, columns = predicted):")
    for row in confusion:
        print("   " + " ".join(f"{c:6d}" for c in row))
    return 0


def cmd_compare(args) -> int:
    """B minus A on the same test images; exit 2 (one line) when they were not evaluated on the same ones."""
    from .evaluation.evaluate import compare_runs
    from .evaluation.stats import format_interval
    r = compare_runs(args.run_a, args.run_b, data=args.data)
    if args.json:
        _print_json(r)
        return 0
    print(f"B minus A on {r['n_images']} test images of {r['n_patients']} patients (95% paired patient bootstrap)")
    print(f"  A: {r['a']}\n  B: {r['b']}")
    for name, d in r["diff"].items():
        print(f"  {name:<16} {format_interval(d):<28} {r['verdict'].get(name, '')}")
    return 0


def cmd_check_run(args) -> int:
    """Whole or not (exit 1), and in either case the run's state, epochs and missing checkpoints."""
    from .inference.choices import run_problems
    from .runs import check_run, run_summary
    folder = Path(args.run_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder")
    problems = check_run(folder) + run_problems(folder)
    summary = run_summary(folder)
    if args.json:
        _print_json({"run": args.run_dir, "whole": not problems, "problems": problems, **summary})
    else:
        print(f"{args.run_dir}: " + ("whole" if not problems else "NOT whole"))
        epochs = f"{summary['epochs_done']}/{summary['epochs']}" if summary["epochs"] else str(summary["epochs_done"])
        error = f" ({summary['error']})" if summary["state"] == "failed" and summary["error"] else ""
        print(f"  state {summary['state']}{error}; epochs {epochs}; "
              f"{'missing ' + ', '.join(summary['missing']) if summary['missing'] else 'both checkpoints present'}; "
              f"{summary['resume']}")
        for p in problems:
            print(f"  {p}")
    return 0 if not problems else 1


# ----------------------------------------------------------------------------- parser

def _contrast(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        grade = int(text)
    except ValueError:
        grade = -1
    if not 0 <= grade <= 4:
        raise argparse.ArgumentTypeError(f"expected a grade 0-4 or 'none', got {text!r}")
    return grade


# What --help prints: plain words (the module docstring is written for Sphinx, its ``backticks`` are not).
DESCRIPTION = ("Retino: train, compare and explain diabetic-retinopathy grading models, and screen folders of "
               "fundus photos. Bad arguments or data exit with status 2 and a one-line message.")
EPILOG = "Run python -m retino VERB --help for a verb's options; the dashboard is started with make run."


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig
    parser = _Parser(prog="python -m retino", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="verb", required=True)  # subparsers are _Parser too

    p = sub.add_parser("synth", help="write the synthetic fundus data set")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--degraded", type=float, default=0.0, metavar="FRACTION",
                   help="share of photos made dark, blurred, over-exposed or cut off, listed in quality.csv "
                        "(default: 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="grade counts, majority baseline and problems of a data set")
    p.add_argument("data_dir", nargs="?", default=TrainConfig().data,
                   help=f"data-set folder (default: {TrainConfig().data}, as for train)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--deep", action="store_true", help="decode every image (slow), not just headers and ends")
    p.set_defaults(func=cmd_stats)

    _train_parser(sub)

    p = sub.add_parser("evaluate", help="a run's chosen checkpoint on its test split (or val, or another set), "
                                        "with patient-level intervals")
    p.add_argument("run_dir")
    p.add_argument("--data", help="data-set folder (default: the run's own)")
    p.add_argument("--split", default="test", type=str.lower, choices=["test", "val"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="two runs on the same test images: B minus A with paired intervals")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--data", help="evaluate both on this data set's test split (default: their own)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="grade photographs with a run's best checkpoint")
    p.add_argument("run_dir", help="the run folder (checkpoints/<run>) whose best checkpoint grades the photos")
    p.add_argument("images", nargs="+", help="fundus photographs (.jpeg, .jpg, .png), one or more")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list: grade, grade_name, probs (or score), run, checkpoint, epoch, cam")
    p.add_argument("--cam-dir", help="write <stem>_cam.png Grad-CAM overlays here, at each photo's own size")
    p.add_argument("--cam-method", default="gradcam", type=str.lower,
                   help="gradcam, gradcam++, hirescam, eigencam or layercam (default: gradcam)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips and small rotations)")
    p.add_argument("--no-quality-gate", action="store_true",
                   help="grade every readable photo, also those the quality gate finds not to be a fundus "
                        "(their verdict is still reported)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="what runs the network: auto (default) is ONNX Runtime on a CPU, PyTorch on a GPU; "
                        "Grad-CAM maps are always PyTorch's")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a run's best model as ONNX or TorchScript, with a JSON of its "
                                      "preprocessing")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, type=str.lower, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="the model file, or a folder for model.onnx / model.pt "
                                 "(default: exports/RUN_NAME/); its JSON is the model's name plus .json; "
                                 "never inside a run folder")
    p.add_argument("--force", action="store_true", help="replace an existing model or JSON file")
    p.add_argument("--unfinished", action="store_true",
                   help="export a run that is still training or failed (its choices may not be made)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cam-score", help="how well Grad-CAM points at the synthetic lesions")
    p.add_argument("run_dir")
    p.add_argument("--data", help="synthetic data set with masks/ (default: the run's own)")
    p.add_argument("--method", default="gradcam", type=str.lower,
                   help="gradcam, gradcam++, hirescam, eigencam or layercam")
    p.add_argument("--contrast", default="0", type=_contrast, metavar="GRADE|none",
                   help="explain logit(true grade) minus logit(GRADE) (default: 0, as the Predict page does); "
                        "'none' explains the plain logit")
    p.add_argument("--limit", type=int, default=0, help="score at most this many images (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cam_score)

    p = sub.add_parser("screen", help="grade every photo under a folder: one row per photo and per patient")
    p.add_argument("run_dir")
    p.add_argument("folder", help="searched recursively for photos (JPEG, PNG, TIFF, BMP, DICOM .dcm)")
    p.add_argument("--out", help="photo report (.csv); <name>.patients.csv and <name>.json are written beside it "
                                 "(default: RUNS/screens/<folder>-<hash>/screen-<run id>.csv). Photos already in "
                                 "it are skipped; never a run folder or a file a screen did not write. Under "
                                 "torchrun each rank writes <name>.rank<r>-of-<N>.csv beside it, merged at the end")
    p.add_argument("--max-files", type=int, default=None, metavar="N",
                   help="refuse a folder of more than N photos (default: 5000)")
    p.add_argument("--yes", action="store_true", help="screen however many photos the folder holds")
    p.add_argument("--batch-size", type=int, default=16, help="photos a forward pass (default: 16)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips and small rotations, 4x the work)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: CPU cores - 2, none for under 32 photos; 0: none)")
    p.add_argument("--no-quality-gate", action="store_true", help="grade photos the quality gate calls not a fundus")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="what runs the network: auto (default) is ONNX Runtime on the CPU, PyTorch on a GPU")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("report", help="one self-contained HTML file of runs' figures, to hand in or share")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one or more runs; with two, B vs A is B = the second")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--worst", type=int, default=4, help="most-wrong test photos per run, with Grad-CAM (0: none)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-run", help="is a run folder whole? exit 1 if not")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_run)
    return parser


def _named_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (one line, exit 2); anything else is a bug and keeps its traceback."""
    from .config import ConfigError
    from .data import DatasetError, ImageError
    from .models import WeightsUnavailable
    from .runs import RunError
    return UserError, ConfigError, DatasetError, ImageError, RunError, WeightsUnavailable


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from . import _signals
        _signals.install()  # first thing for a trainer: a Stop pressed while torch loads is not lost
    # Every other verb keeps Python's own Ctrl-C (KeyboardInterrupt, exit 130) and SIGTERM (exit).
    args = build_parser().parse_args(argv)  # a bad flag exits 2 with one line (_Parser.error)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, _named_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        _mark_failed(args, e)
        return EXIT_BAD_INPUT


def _mark_failed(args, error: Exception) -> None:
    """A run the dashboard started that cannot start says why in its status (not "interrupted").

    A fresh launch becomes ``failed``; a refused Resume goes back to the state it had, with a note.
    A busy folder (another trainer holds it) is never touched: its status is that trainer's.
    """
    from .training import admission
    from .training import lifecycle
    from . import runs
    folder = getattr(args, "run_dir", None) or getattr(args, "resume", None) if args.verb == "train" else None
    if not folder or isinstance(error, lifecycle.RunBusy):
        return
    folder = Path(os.path.expanduser(str(folder)))
    try:
        status = runs.read_json(folder / "status.json")
    except (runs.RunError, OSError):
        return
    if status.get("state") != "starting":  # only the dashboard writes "starting" before the trainer runs
        return
    if getattr(args, "resume", None):
        runs.write_status(folder, state=status.get("resume_from") or "stopped", note=f"resume refused: {error}")
    elif not isinstance(error, admission.RunRefused):
        runs.write_status(folder, state="failed", error=str(error), error_type=type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
