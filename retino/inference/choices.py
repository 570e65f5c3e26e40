"""A run's choices, read once and checked: the one owner of what every door applies to a photo.

Every door that answers "what grade, is it referable" (Predict, Screen, ``evaluate`` and the test
report, Compare, the exported model's JSON) takes its answer's rules from here, so they cannot drift:

- :func:`read_choices` reads a run's checkpoint, ``config.json``, ``evaluation.json`` and ``ood.npz``
  once into a :class:`Choices` and validates each (a hand-edited or damaged file is a one-line
  ``RunError`` naming the file, the field and what was expected, never a silent fallback);
  :func:`run_problems` gives ``check-run`` the same checks as a list.
- The referral rule has one definition: :data:`PROB_COLS` (the probability columns),
  :func:`p_referable` (P(grade >= 2) from probabilities) and :func:`referral_cut` (the cut a
  referable score is compared with, and the rule in words).

A choice belongs to one checkpoint: an ``evaluation.json`` or ``ood.npz`` made for another epoch
than the checkpoint's is never applied; :attr:`Choices.notes` says what is missing and how to make it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ood as ood_mod
from .. import runs
from ..grades import DEFAULT_THRESHOLDS, GRADES, REFERABLE_GRADE

# What a clinic does about one eye, and so about its patient (who takes the first status any of their
# eyes has). A photo Retino did not grade (unreadable, refused as not a fundus), or graded although the
# gate found it ungradable, is no evidence that the eye is healthy: screening programmes recall or refer
# such a patient rather than pass them (NHS Diabetic Eye Screening Programme, "Diabetic eye screening:
# guidance when adequate images cannot be taken", gov.uk, 2024; Scanlon 2017, Acta Diabetologica 54:515).
REFER, REFER_UNGRADED, NO_REFERRAL = "refer", "refer: ungraded eye", "no referral"
STATUSES = (REFER, REFER_UNGRADED, NO_REFERRAL)


def eye_status(graded: bool, verdict: str | None, referable: bool | None) -> str:
    """One photo's status: ``refer`` (graded referable), ``refer: ungraded eye`` (not graded, or graded
    from an ungradable photo), else ``no referral``."""
    if graded and referable:
        return REFER
    if not graded or verdict == "ungradable":
        return REFER_UNGRADED
    return NO_REFERRAL

EVALUATION_FILE = "evaluation.json"
PROB_COLS = [f"p{g}" for g in GRADES]  # P(grade 0..4) in every table Retino writes
DEFAULT_PROB_CUT = 0.5                 # classify head without an operating point: P(grade >= 2) >= 0.5


def p_referable(probs) -> np.ndarray | float:
    """P(grade >= 2) from probabilities over grades 0-4: (..., 5) -> (...); a float for one row."""
    out = np.asarray(probs, dtype=np.float64)[..., REFERABLE_GRADE:].sum(-1)
    return float(out) if out.ndim == 0 else out


def score_name(head: str) -> str:
    """What the referable score is, in words."""
    return "score" if head == "regress" else f"P(grade >= {REFERABLE_GRADE})"


def referral_cut(head: str, operating_point: dict | None = None, thresholds=None,
                 selected_on: str | None = None) -> tuple[float, str]:
    """The cut a referable score is compared with (``score >= cut``) and the rule in words.

    The run's operating point (chosen on val for a target sensitivity) where it has one; else, for a
    classify head, P(grade >= 2) >= 0.5, and for a regress head its own fitted cut point between
    grades 1 and 2, so that without an operating point "referable" and "grade >= 2" are one rule.
    """
    what = score_name(head)
    op = operating_point or {}
    if op.get("threshold") is not None:
        cut = float(op["threshold"])
        target = op.get("target_sensitivity")
        chosen = f"chosen on {selected_on or 'val'}" + (f" for sensitivity {float(target):.2f}" if target else "")
        return cut, f"{what} >= {cut:.3g}: the run's operating point, {chosen}"
    if head == "regress":
        cut = float(list(thresholds if thresholds is not None else DEFAULT_THRESHOLDS)[REFERABLE_GRADE - 1])
        return cut, (f"{what} >= {cut:.3g}: the default, the run's own cut point between grades "
                     f"{REFERABLE_GRADE - 1} and {REFERABLE_GRADE} (no operating point"
                     + (f": {op['error']})" if op.get("error") else ")"))
    why = f" ({op['error']})" if op.get("error") else ""
    return DEFAULT_PROB_CUT, f"{what} >= {DEFAULT_PROB_CUT:g}: the default, as the run has no operating point{why}"


def referral_of(chosen: dict | None, head: str | None = None, thresholds=None) -> tuple[float, str]:
    """:func:`referral_cut` for a choices dict as ``evaluation.json`` holds it (the test report, Compare)."""
    chosen = chosen or {}
    head = head or chosen.get("head") or "classify"
    return referral_cut(head, chosen.get("operating_point"), chosen.get("thresholds") or thresholds,
                        chosen.get("selected_on"))


def referral_reason(head: str, grade: int, referable: bool, score: float, cut: float) -> str | None:
    """Why a photo's referral differs from its grade (a grade 0-1 referable, a grade >= 2 not), else None."""
    what = score_name(head)
    if referable and grade < REFERABLE_GRADE:
        return (f"referable although graded {grade}: {what} {score:.3g} is at or above the referral cut "
                f"{cut:.3g}" + (", set below 0.5 to catch more referable eyes" if head != "regress" and cut < 0.5
                                else ""))
    if not referable and grade >= REFERABLE_GRADE:
        return f"not referable although graded {grade}: {what} {score:.3g} is below the referral cut {cut:.3g}"
    return None


# ----------------------------------------------------------------------------- the object

@dataclass
class Choices:
    """Everything a run chose for one checkpoint, as every door applies it."""

    run_dir: Path
    checkpoint: str
    epoch: int
    config: object                       # retino.config.TrainConfig, from the checkpoint
    norm: tuple                          # (mean, std)
    thresholds: list                     # regress head's cut points (grades 0|1 .. 3|4)
    temperature: float | None = None     # classify head, chosen on val; None: not calibrated
    operating_point: dict | None = None  # {"threshold", "target_sensitivity", ...} chosen on val, or None
    selected_on: str | None = None       # "val", or "test" for a run made before the val split
    ood: dict | None = None              # retino.inference.ood's model for this checkpoint, or None
    notes: list = field(default_factory=list)  # what is missing or stale, and how to make it

    @property
    def head(self) -> str:
        return self.config.head

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def ben_graham(self) -> bool:
        return bool(self.config.ben_graham)

    @property
    def ood_cutoff(self) -> float | None:
        return None if self.ood is None else float(self.ood["cutoff"])

    def referral(self) -> tuple[float, str]:
        return referral_cut(self.head, self.operating_point, self.thresholds, self.selected_on)


def read_evaluation(run_dir, *, head: str | None = None) -> dict | None:
    """``evaluation.json`` checked field by field, or None where the run has none.

    The only reader of that file. Raises RunError (one line naming the file, the field and what was
    expected) for a damaged one.
    """
    path = Path(run_dir) / EVALUATION_FILE
    if not path.exists():
        return None
    chosen = runs.read_json(path)
    problems = _evaluation_problems(path, chosen, head)
    if problems:
        raise runs.RunError(problems[0])
    return chosen


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _evaluation_problems(path: Path, chosen: dict, head: str | None) -> list[str]:
    out = []
    head = head or chosen.get("head")
    if chosen.get("head") is not None and head is not None and chosen["head"] != head:
        out.append(f"{path}: head is {chosen['head']!r}, the checkpoint's is {head!r}")
    t = chosen.get("temperature")
    if not _finite(t) or t <= 0:
        out.append(f"{path}: temperature is {t!r}, expected a finite number > 0")
    op = chosen.get("operating_point")
    if op is not None and not isinstance(op, dict):
        out.append(f"{path}: operating_point is a {type(op).__name__}, expected an object with a threshold")
    elif op and op.get("threshold") is not None:
        cut = op["threshold"]
        if not _finite(cut):
            out.append(f"{path}: operating_point.threshold is {cut!r}, expected a finite number")
        elif head != "regress" and not 0.0 <= cut <= 1.0:
            out.append(f"{path}: operating_point.threshold is {cut}, expected a probability in [0, 1]")
    th = chosen.get("thresholds")
    if th is not None and (not isinstance(th, list) or len(th) != len(GRADES) - 1 or not all(map(_finite, th))
                           or any(b < a for a, b in zip(th, th[1:]))):
        out.append(f"{path}: thresholds is {th!r}, expected {len(GRADES) - 1} non-decreasing numbers")
    epoch = chosen.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        out.append(f"{path}: epoch is {epoch!r}, expected a whole number")
    if chosen.get("selected_on") not in (None, "val", "test"):
        out.append(f"{path}: selected_on is {chosen.get('selected_on')!r}, expected \"val\" or \"test\"")
    return out


def _config_problems(run_dir: Path, cfg) -> list[str]:
    """config.json must describe the model the checkpoint holds (pages and captions read it)."""
    path = run_dir / "config.json"
    if not path.exists():
        return []
    try:
        train = runs.read_json(path).get("train")
    except runs.RunError as e:
        return [str(e)]
    if not isinstance(train, dict):
        return [f"{path}: train is missing or not an object"]
    return [f"{path}: train.{k} is {train[k]!r}, the checkpoint holds {getattr(cfg, k)!r}"
            for k in ("arch", "head", "image_size", "ben_graham") if k in train and train[k] != getattr(cfg, k)]


def _read_ood(run_dir: Path, epoch: int, n_features: int | None) -> tuple[dict | None, list[str], list[str]]:
    """(model, problems, notes) for ``ood.npz``."""
    path = run_dir / ood_mod.OOD_FILE
    if not path.exists():
        return None, [], [f"{path.name} is missing: no model's view in the quality verdict"]
    try:
        params = ood_mod.load_ood(path)
    except ValueError as e:
        return None, [str(e)], []
    cutoff = params.get("cutoff")
    if not _finite(cutoff) or cutoff <= 0:
        return None, [f"{path}: cutoff is {cutoff!r}, expected a finite number > 0"], []
    means, prec = np.asarray(params["means"]), np.asarray(params["precision"])
    d = means.shape[-1] if means.ndim == 2 else None
    if d is None or prec.shape != (d, d) or (n_features is not None and d != n_features) \
            or not (np.isfinite(means).all() and np.isfinite(prec).all()):
        return None, [f"{path}: means {means.shape} / precision {prec.shape} do not fit the model's "
                      f"{n_features} features, expected finite (k, {n_features}) and ({n_features}, {n_features})"], []
    stored = int(params.get("epoch", -1))
    if stored >= 0 and stored != epoch:
        return None, [], [f"{path.name} was made for epoch {stored}, the checkpoint is epoch {epoch}: "
                          f"no model's view in the quality verdict"]
    return params, [], []


def _collect(run_dir: Path, checkpoint: str, ckpt: dict) -> tuple[Choices, list[str]]:
    from ..config import TrainConfig
    path = run_dir / checkpoint
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        norm = (tuple(ckpt["norm"]["mean"]), tuple(ckpt["norm"]["std"]))
        epoch = int(ckpt.get("epoch", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise runs.RunError(f"{path}: does not hold a model Retino can load ({e})") from None
    thresholds = list(ckpt.get("thresholds") or DEFAULT_THRESHOLDS)
    ch = Choices(run_dir, checkpoint, epoch, cfg, norm, thresholds)
    problems = _config_problems(run_dir, cfg)
    evaluate = (f"python -m retino evaluate {run_dir} (a run stopped before it finished: "
                f"python -m retino train --resume --run-dir {run_dir})")
    if checkpoint != "best.pt":  # evaluation.json and ood.npz are made for the chosen checkpoint only
        ch.notes.append(f"{checkpoint} is not the run's chosen checkpoint: no temperature, operating point "
                        f"or OOD model applies to it")
        return ch, problems
    path_e = run_dir / EVALUATION_FILE
    chosen = None
    if path_e.exists():
        try:
            chosen = runs.read_json(path_e)
            problems += _evaluation_problems(path_e, chosen, cfg.head)
        except runs.RunError as e:
            problems.append(str(e))
    if chosen is None:
        if not problems:
            ch.notes.append(f"{EVALUATION_FILE} is missing: probabilities not calibrated and the default "
                            f"referral cut; make it with {evaluate}")
    elif chosen.get("epoch") not in (None, epoch):
        ch.notes.append(f"{EVALUATION_FILE} was made for epoch {chosen['epoch']}, {checkpoint} is epoch {epoch}: "
                        f"its temperature and operating point are not applied; make them for this "
                        f"checkpoint with {evaluate}")
    elif not problems:
        if cfg.head == "classify":
            ch.temperature = float(chosen["temperature"])
        op = chosen.get("operating_point") or {}
        if op.get("threshold") is not None:
            ch.operating_point = dict(op)
        elif op.get("error"):  # why none could be chosen on val: said beside the default rule
            ch.notes.append(f"no operating point was chosen: {op['error']}")
        ch.selected_on = chosen.get("selected_on")
    n_features = int(ckpt["model"]["fc.weight"].shape[1]) if "fc.weight" in ckpt.get("model", {}) else None
    ch.ood, ood_problems, ood_notes = _read_ood(run_dir, epoch, n_features)
    problems += ood_problems
    ch.notes += ood_notes
    return ch, problems


def read_choices(run_dir, checkpoint: str = "best.pt", *, ckpt: dict | None = None) -> Choices:
    """A run's choices for ``checkpoint``, every file checked.

    ``ckpt``: the checkpoint already loaded (so a caller that builds the model reads it once).

    Raises:
        RunError: the run folder or checkpoint is missing, or a file holds what cannot be applied
            (one line: the file, the field, what was expected).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: the run folder does not exist")
    if ckpt is None:
        ckpt = runs.load_checkpoint(run_dir / checkpoint)
    ch, problems = _collect(run_dir, checkpoint, ckpt)
    if problems:
        raise runs.RunError(problems[0] + (f" (and {len(problems) - 1} more: python -m retino check-run "
                                           f"{run_dir})" if len(problems) > 1 else ""))
    return ch


def run_problems(run_dir, checkpoint: str = "best.pt") -> list[str]:
    """What :func:`read_choices` would refuse, as a list (``check-run``); empty without a checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / checkpoint).is_file():
        return []
    try:
        ckpt = runs.load_checkpoint(run_dir / checkpoint)
        return _collect(run_dir, checkpoint, ckpt)[1]
    except runs.RunError as e:
        return [str(e)]


def describe(ch: Choices) -> dict:
    """JSON-safe summary of the choices (for captions and the export JSON)."""
    cut, rule = ch.referral()
    return {"epoch": ch.epoch, "head": ch.head, "temperature": ch.temperature, "operating_point": ch.operating_point,
            "selected_on": ch.selected_on, "referral": {"threshold": cut, "rule": rule},
            "ood_cutoff": ch.ood_cutoff, "notes": list(ch.notes)}


__all__ = ["Choices", "read_choices", "run_problems", "read_evaluation", "p_referable", "referral_cut",
           "referral_reason", "referral_of", "PROB_COLS", "score_name", "describe"]
