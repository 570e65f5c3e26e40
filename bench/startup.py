"""Whole-process start-up: ``python -m retino predict RUN photo`` as a user runs it, this checkout
(AFTER) against a baseline commit (BEFORE), in the same run, interleaved.

Each command is started as a fresh process from its checkout (``cwd`` and ``PYTHONPATH`` pointed at
it, the same interpreter and venv), and timed from the start to its exit:

  predict      ``python -m retino predict RUN photo``: one photo, the run's ONNX model already cached
               (made by the warm-up round), so grading never builds the PyTorch network
  --help       ``python -m retino --help``
  screen 5     ``python -m retino screen RUN folder --out NEW.csv --quiet`` on 5 photos

BEFORE is a temporary ``git worktree add --detach`` of ``--baseline-rev`` (default: the merge-base of
HEAD and main), removed at the end. Both sides grade the same run: a freshly initialised ResNet-18
at ``--size`` px saved as a completed run (the time does not depend on the weights), and must give
the same answers (checked on predict's ``--json``). Round 0 warms the file cache and makes the ONNX
model; it is not counted. Medians of the other rounds, and BEFORE / AFTER of the wall time (of the
medians, and the median of each round's own ratio, its two sides run back to back); the
processes' CPU time (user + system, children included) is printed beside it, as it moves less than
the wall time when other work shares the machine.

Photos: the real EyePACS sample (``../shared/real_fundus_sample/train``) where it exists, else
synthetic 1024 px JPEGs. Usage::

    python bench/startup.py [--rounds 5] [--baseline-rev REV] [--size 512] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The run and photos bench/screen.py makes (bench/ is on sys.path when a bench script runs); they are
# built with this checkout's retino, and only the processes timed below differ between the two sides.
from screen import fresh_run, photo_folder  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


class Side:
    """One checkout's ``python -m retino``."""

    def __init__(self, name: str, root: Path, tmp: Path):
        self.name, self.root = name, root
        self.env = {**os.environ, "PYTHONPATH": str(root), "RETINO_RUNS": str(tmp / "runs"),
                    "RETINO_CACHE": str(tmp / "cache"), "RETINO_SETTINGS": str(tmp / "settings.json")}

    def run(self, args: list[str], *, flags: tuple[str, ...] = ()) -> tuple[tuple[float, float], subprocess.CompletedProcess]:
        """(wall seconds, CPU seconds of the process and its children), and the finished process."""
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *flags, "-m", "retino", *map(str, args)], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=600)
        took = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if done.returncode not in (0, 2) or "Traceback" in done.stderr:
            raise SystemExit(f"{self.name}: python -m retino {' '.join(map(str, args))} failed "
                             f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
        return (took, cpu), done


def heaviest_imports(stderr: str, n: int = 6) -> list[tuple[str, float]]:
    """Top-level packages by the import time spent in their own modules (``-X importtime``), seconds."""
    own: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            top = m[2].split(".")[0]
            own[top] = own.get(top, 0.0) + int(m[1]) / 1e6
    return sorted(own.items(), key=lambda kv: -kv[1])[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="counted rounds (round 0, the warm-up, comes on top)")
    p.add_argument("--baseline-rev", help="BEFORE (default: git merge-base HEAD main)")
    p.add_argument("--size", type=int, default=512, help="the run's image size in pixels")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    rev = args.baseline_rev or git("merge-base", "HEAD", "main")
    before_commit, after_commit = git("rev-parse", "--short", rev), git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if before_commit == after_commit and not dirty:
        print(f"warning: the baseline {rev} is this checkout's HEAD: both sides run the same code "
              f"(pass --baseline-rev)", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="retino-startup-"))
    before_root = tmp / "before"
    git("worktree", "add", "--detach", str(before_root), rev)
    try:
        run = fresh_run(tmp / "run", size=args.size, arch="resnet18")
        folder, source = photo_folder(tmp, 5, False)
        photo = sorted(folder.iterdir())[0]
        sides = [Side("BEFORE", before_root, tmp), Side("AFTER", REPO, tmp)]
        cases = {
            "predict": lambda side, i: ["predict", run, photo],
            "--help": lambda side, i: ["--help"],
            "screen 5": lambda side, i: ["screen", run, folder, "--out", tmp / "screens" / f"{side.name}-{i}" / "s.csv",
                                         "--quiet"],
        }
        times: dict[str, dict[str, list[float]]] = {c: {s.name: [] for s in sides} for c in cases}
        cpus: dict[str, dict[str, list[float]]] = {c: {s.name: [] for s in sides} for c in cases}
        for i in range(args.rounds + 1):
            order = sides if i % 2 == 0 else sides[::-1]  # neither side always runs first
            for case, make in cases.items():
                for side in order:
                    (took, cpu), done = side.run(make(side, i))
                    if case == "predict" and "ONNX Runtime" not in done.stderr:
                        raise SystemExit(f"{side.name}: predict did not grade with the cached ONNX model:\n"
                                         f"{done.stderr[-2000:]}")
                    if i:  # round 0 warms the file cache and exports the ONNX model
                        times[case][side.name].append(took)
                        cpus[case][side.name].append(cpu)
                    print(f"round {i} {case:<9} {side.name:<6} {took:6.2f} s (CPU {cpu:.2f} s)", file=sys.stderr)

        answers = {s.name: json.loads(s.run(["predict", run, photo, "--json"])[1].stdout) for s in sides}
        a, b = answers["BEFORE"][0], answers["AFTER"][0]
        diff = max((abs(x - y) for x, y in zip(a.get("probs") or [], b.get("probs") or [])), default=0.0)
        same = (a.get("grade"), a.get("status")) == (b.get("grade"), b.get("status")) and diff <= 1e-6
        imports = {s.name: heaviest_imports(s.run(["predict", run, photo], flags=("-X", "importtime"))[1].stderr)
                   for s in sides}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_root)], cwd=REPO, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for case, by in times.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        cpu = {k: statistics.median(v) for k, v in cpus[case].items()}
        rows.append({"case": case, "before_s": med["BEFORE"], "after_s": med["AFTER"],
                     "before_cpu_s": cpu["BEFORE"], "after_cpu_s": cpu["AFTER"],
                     "before_range": [min(by["BEFORE"]), max(by["BEFORE"])],
                     "after_range": [min(by["AFTER"]), max(by["AFTER"])],
                     "ratio": med["BEFORE"] / med["AFTER"],
                     # the two sides of a round ran back to back, under much the same load
                     "ratio_of_rounds": statistics.median(b / a for b, a in zip(by["BEFORE"], by["AFTER"])),
                     "cpu_ratio": cpu["BEFORE"] / cpu["AFTER"]})
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "before": f"{rev} ({before_commit})", "after": f"HEAD ({after_commit}{', with changes' if dirty else ''})",
           "photos": source, "size": args.size, "rounds": args.rounds, "same_answer": same, "max_prob_diff": diff, "rows": rows,
           "heaviest_imports_predict": {k: [[n, round(t, 3)] for n, t in v] for k, v in imports.items()}}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['machine']}; BEFORE {out['before']}, AFTER {out['after']}; {source}; run at {args.size} px; "
          f"medians of {args.rounds} rounds (round 0 not counted)")
    print(f"{'':<10} {'BEFORE s':>9} {'AFTER s':>9} {'BEFORE/AFTER':>13} {'by round':>9}   {'wall ranges':<25} "
          f"CPU s BEFORE / AFTER")
    for r in rows:
        ranges = (f"{r['before_range'][0]:.2f}-{r['before_range'][1]:.2f} / "
                  f"{r['after_range'][0]:.2f}-{r['after_range'][1]:.2f}")
        print(f"{r['case']:<10} {r['before_s']:9.2f} {r['after_s']:9.2f} {r['ratio']:12.2f}x {r['ratio_of_rounds']:8.2f}x   "
              f"{ranges:<25} {r['before_cpu_s']:.2f} / {r['after_cpu_s']:.2f} = {r['cpu_ratio']:.2f}x")
    print(f"same answer on predict --json (grade, status; probabilities differ by {diff:.1g} at most): "
          f"{'yes' if same else 'NO'}")
    for name, top in imports.items():
        print(f"{name} predict, own import time by package (s): " + ", ".join(f"{n} {t:.2f}" for n, t in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
