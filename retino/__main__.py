"""The command line: ``python -m retino <verb>``. Bad arguments or data exit 2 with one line on stderr."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad arguments or data: printed as one line, exit status 2, no traceback."""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


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
    report = stats(read_dataset(args.data_dir), deep=args.deep)
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
    from .config import add_config_arguments
    # each config flag's help already states its default (the flags' own default is None: "not given")
    p = sub.add_parser("train", help="train a model; every TrainConfig field has a flag")
    add_config_arguments(p)
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
    result = evaluate_run(args.run_dir, data=args.data, checkpoint=args.checkpoint)
    if args.json:
        _print_json(result)
    else:
        for k, v in result.items():
            if not isinstance(v, (list, dict)):
                print(f"{k:>28}: {v}")
        print("confusion (rows = true grade):")
        for row in result["test_confusion"]:
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


def cmd_predict(args) -> int:
    from .explain import predict_cli
    return predict_cli(args)


def cmd_cam_score(args) -> int:
    from .explain import cam_score_cli
    return cam_score_cli(args)


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
    parser = argparse.ArgumentParser(prog="python -m retino", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("synth", help="write the synthetic fundus data set")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="grade counts, majority baseline and problems of a data set")
    p.add_argument("data_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--deep", action="store_true", help="decode every image (slow), not just headers and ends")
    p.set_defaults(func=cmd_stats)

    _train_parser(sub)

    p = sub.add_parser("evaluate", help="metrics of a run's best checkpoint on its test split or another set")
    p.add_argument("run_dir")
    p.add_argument("--data", help="data-set folder (default: the run's own)")
    p.add_argument("--checkpoint", default="best.pt", choices=["best.pt", "last.pt"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="grade photographs with a run's best checkpoint")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cam-dir", help="write <stem>_cam.png Grad-CAM overlays here")
    p.add_argument("--cam-method", default="gradcam")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips and small rotations)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("cam-score", help="how well Grad-CAM points at the synthetic lesions")
    p.add_argument("run_dir")
    p.add_argument("--data", help="synthetic data set with masks/ (default: the run's own)")
    p.add_argument("--method", default="gradcam", help="gradcam, gradcam++, hirescam, eigencam or layercam")
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


def main(argv=None) -> int:
    from . import _signals
    _signals.install()  # first thing: a Stop pressed while torch loads is not lost
    from .config import ConfigError
    from .data import DatasetError, ImageError
    from .runs import RunError
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a usage line for bad flags
    try:
        return args.func(args)
    except (UserError, ConfigError, DatasetError, ImageError, RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        _mark_failed(args, str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _mark_failed(args, message: str) -> None:
    """A launched run that cannot start says why in its status, instead of looking interrupted."""
    folder = getattr(args, "run_dir", None) if args.verb == "train" else None
    folder = folder or (getattr(args, "resume", None) if args.verb == "train" else None)
    if folder and (Path(folder) / "status.json").is_file():
        from .runs import write_status
        write_status(Path(folder), state="failed", error=message)


if __name__ == "__main__":
    sys.exit(main())
