"""The command line: ``python -m retino <verb>``. Bad arguments or data exit 2 with one line on stderr."""
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


# ----------------------------------------------------------------------------- verbs

def cmd_synth(args) -> int:
    from .data.synthetic import make_dataset
    try:
        out = make_dataset(args.out_dir, n=args.n, size=args.size, seed=args.seed, progress=not args.quiet)
    except ValueError as e:
        raise UserError(str(e))
    print(f"wrote {args.n} synthetic fundus images to {out}", file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    from .data import read_dataset, stats
    from .fileio import resolve_data_path
    report = stats(read_dataset(resolve_data_path(args.data_dir)), deep=args.deep)
    if args.json:
        _print_json(report)
        return 0
    print(f"{report['path']}: layout {report['layout']} (split: {report['split'].get('method')})")
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
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from . import runs
    from .config import TrainConfig, config_from_args
    from .models import WeightsUnavailable
    from .train import fit
    if args.resume:
        run_dir = Path(args.resume)
        try:
            saved = runs.read_json(run_dir / "config.json")["train"]
        except (runs.RunError, KeyError) as e:
            raise UserError(f"cannot resume {run_dir}: {e}")
        cfg = config_from_args(args, TrainConfig.from_dict(saved))
        if not (run_dir / "last.pt").is_file():  # killed before its first epoch ended: start it over
            args.resume = None
    else:
        cfg = config_from_args(args)
        run_dir = Path(args.run_dir) if args.run_dir else None
    if not Path(cfg.data).is_dir():  # checked before any process, folder or cache is made
        from .data import read_dataset
        read_dataset(cfg.data)
    if run_dir is None:
        import os
        if int(os.environ.get("RANK", "0")) != 0:
            raise UserError("under torchrun, pass --run-dir so every process writes to the same run")
        run_dir = runs.create_run_dir(None, cfg.display_name())
    try:
        best = fit(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    except WeightsUnavailable as e:
        raise UserError(str(e))
    if "stopped_at" in best:
        print(f"stopped at epoch {best['stopped_at']['epoch']}, step {best['stopped_at']['step']}; "
              f"resume with: python -m retino train --resume {run_dir}", file=sys.stderr)
    elif best:
        print(f"{run_dir}: best epoch {best['epoch']}: test_qwk {best['test_qwk']:.4f}, "
              f"test_acc {best['test_acc']:.4f}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run
    from .grades import GRADES, grade_label
    result = evaluate_run(args.run_dir, data=args.data, checkpoint=args.checkpoint)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['run']}: {result['checkpoint']} (epoch {result['epoch']}) on {result['data']}")
    for k, v in result.items():
        if k not in ("run", "checkpoint", "epoch", "data") and not isinstance(v, (list, dict)):
            print(f"{k:>28}: {_num(v)}")
    base = result["majority_baseline"]
    print(f"{'majority_baseline':>28}: always grade {base['grade']}: acc {_num(base['acc'])}, QWK {_num(base['qwk'])}")
    confusion = result["test_confusion"]
    print("per grade:            recall  precision      n")
    for g in GRADES:
        print(f"  {grade_label(g):<16} {_num(result['test_recall'][g], 3):>8} "
              f"{_num(result['test_precision'][g], 3):>10} {sum(confusion[g]):>6}")
    print("confusion (rows = true grade, columns = predicted):")
    for row in confusion:
        print("   " + " ".join(f"{c:6d}" for c in row))
    return 0


def cmd_check_run(args) -> int:
    from .runs import check_run
    problems = check_run(Path(args.run_dir))
    if args.json:
        _print_json({"run": args.run_dir, "whole": not problems, "problems": problems})
    else:
        print(f"{args.run_dir}: " + ("whole" if not problems else "NOT whole"))
        for p in problems:
            print(f"  {p}")
    return 0 if not problems else 1


def _check_cam_method(method: str, flag: str) -> None:
    from .explain import list_cam_methods
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


def _write_cams(trained, preds, cam_dir: Path, method: str) -> dict[int, str]:
    """Each graded photo's map over the photo itself, at its own size: ``{index: path}``."""
    import numpy as np
    from PIL import Image
    from .explain import explain, overlay_on_photo
    from .inference import decode
    cam_dir.mkdir(parents=True, exist_ok=True)
    cams, used = {}, set()
    for i, p in enumerate(preds):
        if p.ok:
            heat = explain(trained, p, method=method).heatmap
            photo = np.asarray(decode(p.image, p.image))  # full size (the model's copy may be draft-decoded)
            path = _cam_path(cam_dir, p.image, used)
            Image.fromarray(overlay_on_photo(photo, heat, p.crop)).save(path)
            cams[i] = str(path)
    return cams


def cmd_predict(args) -> int:
    """Exit 0 when every image was graded, 2 when any was rejected."""
    from .inference import load_trained
    from .predict import predict
    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    if cam_dir:
        _check_cam_method(args.cam_method, "--cam-method")
        if cam_dir.exists() and not cam_dir.is_dir():  # found now, not after grading everything
            raise UserError(f"--cam-dir {cam_dir}: exists and is not a folder")
    trained = load_trained(args.run_dir)
    preds = predict(trained, args.images, tta=args.tta)
    cams = _write_cams(trained, preds, cam_dir, args.cam_method) if cam_dir else {}
    source = {"run": str(trained.run_dir), "checkpoint": trained.checkpoint, "epoch": trained.epoch}
    if args.json:
        _print_json([{**p.as_dict(), **source, "cam": cams.get(i)} if p.ok else p.as_dict()
                     for i, p in enumerate(preds)])
    else:
        print(f"{source['run']}: {source['checkpoint']} (epoch {source['epoch']})", file=sys.stderr)
        for i, p in enumerate(preds):
            if not p.ok:
                print(f"{p.image}: rejected: {p.error.removeprefix(f'{p.image}: ')}")
                continue
            detail = (f"score {p.score:.2f}" if p.score is not None
                      else "p = " + " ".join(f"{q:.2f}" for q in p.probs))
            cam = f"  cam: {cams[i]}" if i in cams else ""
            print(f"{p.image}: grade {p.grade} ({p.grade_name})  {detail}{cam}")
    return 0 if all(p.ok for p in preds) else EXIT_BAD_INPUT


def cmd_cam_score(args) -> int:
    """One JSON object with ``--json``, else three readable lines."""
    from .pointing import cam_score
    _check_cam_method(args.method, "--method")
    result = cam_score(args.run_dir, data=args.data, method=args.method, limit=args.limit, contrast=args.contrast)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['method']} on {result['n']} test images of grade >= 2:")
    print(f"  pointing game hit rate  {result['hit_rate']:.3f}   (random map {result['random_hit_rate']:.3f})")
    print(f"  heat-map mass in lesions {result['mass_in_mask']:.3f}   (random map {result['random_mass_in_mask']:.3f})")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig
    parser = _Parser(prog="python -m retino", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)  # subparsers are _Parser too

    p = sub.add_parser("synth", help="write the synthetic fundus data set")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="grade counts, majority baseline and problems of a data set")
    p.add_argument("data_dir", nargs="?", default=TrainConfig().data,
                   help=f"data-set folder (default: {TrainConfig().data}, as for train)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--deep", action="store_true", help="decode every image (slow), not just headers and ends")
    p.set_defaults(func=cmd_stats)

    _train_parser(sub)

    p = sub.add_parser("evaluate", help="metrics of a run's best checkpoint on its test split or another set")
    p.add_argument("run_dir")
    p.add_argument("--data", help="data-set folder (default: the run's own)")
    p.add_argument("--checkpoint", default="best.pt", type=str.lower, choices=["best.pt", "last.pt"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="grade photographs with a run's best checkpoint")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list: grade, grade_name, probs (or score), run, checkpoint, epoch, cam")
    p.add_argument("--cam-dir", help="write <stem>_cam.png Grad-CAM overlays here, at each photo's own size")
    p.add_argument("--cam-method", default="gradcam", type=str.lower,
                   help="gradcam, gradcam++, hirescam, eigencam or layercam (default: gradcam)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips and small rotations)")
    p.set_defaults(func=cmd_predict)

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
    """A launched run that cannot start says why in its status, instead of looking interrupted."""
    folder = getattr(args, "run_dir", None) if args.verb == "train" else None
    folder = folder or (getattr(args, "resume", None) if args.verb == "train" else None)
    if folder and (Path(folder) / "status.json").is_file():
        from .runs import write_status
        write_status(Path(folder), state="failed", error=str(error), error_type=type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
