"""retino.inference.choices: one reader of a run's choices, every file checked, one referral rule. No training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retino.inference import choices
from retino import runs
from retino.config import TrainConfig
from retino.inference.ood import save_ood

THRESHOLDS = [0.5, 1.2, 2.5, 3.5]


def fake_run(root: Path, *, head: str = "classify", epoch: int = 3, evaluation: dict | None = None) -> Path:
    """A run folder with a checkpoint holding only what the choices need (fc's shape), and evaluation.json."""
    run = root / f"run-{head}"
    run.mkdir()
    cfg = TrainConfig(head=head, loss="mse" if head == "regress" else "ce", image_size=64)
    out = 1 if head == "regress" else 5
    torch.save({"config": cfg.to_dict(), "norm": {"mean": [0.5] * 3, "std": [0.25] * 3}, "epoch": epoch,
                "thresholds": THRESHOLDS, "model": {"fc.weight": torch.zeros(out, 8)}}, run / "best.pt")
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    chosen = {"selected_on": "val", "temperature": 1.7, "epoch": epoch, "head": head, "thresholds": THRESHOLDS,
              "operating_point": {"threshold": 0.3 if head == "classify" else 1.0, "target_sensitivity": 0.9}}
    (run / "evaluation.json").write_text(json.dumps({**chosen, **(evaluation or {})}))
    return run


def edited(run: Path, **fields) -> Path:
    chosen = json.loads((run / "evaluation.json").read_text())
    for k, v in fields.items():
        if v is ...:
            chosen.pop(k, None)
        else:
            chosen[k] = v
    (run / "evaluation.json").write_text(json.dumps(chosen))
    return run


def test_read_choices_applies_evaluation_made_for_this_checkpoint(tmp_path):
    ch = choices.read_choices(fake_run(tmp_path))
    assert ch.temperature == 1.7 and ch.operating_point["threshold"] == 0.3 and ch.selected_on == "val"
    cut, rule = ch.referral()
    assert cut == 0.3 and "operating point" in rule and "0.90" in rule


@pytest.mark.parametrize("field, value, expected", [
    ("temperature", -1, "temperature is -1, expected a finite number > 0"),
    ("temperature", "abc", "temperature is 'abc'"),
    ("temperature", ..., "temperature is None"),
    ("operating_point", [0.3], "operating_point is a list"),
    ("operating_point", {"threshold": 5.0}, r"threshold is 5.0, expected a probability in \[0, 1\]"),
    ("thresholds", [3, 2, 1, 0], "thresholds is .* non-decreasing"),
])
def test_hand_edited_evaluation_is_one_line_error_naming_file_and_field(tmp_path, field, value, expected):
    run = edited(fake_run(tmp_path), **{field: value})
    with pytest.raises(runs.RunError, match=expected) as err:
        choices.read_choices(run)
    assert "evaluation.json" in str(err.value) and "\n" not in str(err.value)
    assert any(expected.split(",")[0].split(" is")[0] in p for p in choices.run_problems(run))  # check-run too


def test_non_finite_temperature_refused(tmp_path):
    run = fake_run(tmp_path)
    (run / "evaluation.json").write_text((run / "evaluation.json").read_text().replace("1.7", "Infinity"))
    with pytest.raises(runs.RunError, match="temperature is inf"):
        choices.read_choices(run)


def test_config_naming_another_arch_than_the_checkpoint_is_refused(tmp_path):
    run = fake_run(tmp_path)
    (run / "config.json").write_text(json.dumps({"train": {**TrainConfig(image_size=64).to_dict(), "arch": "resnet50"}}))
    with pytest.raises(runs.RunError, match=r"config.json: train.arch is 'resnet50', the checkpoint holds 'resnet18'"):
        choices.read_choices(run)


def test_garbage_or_infinite_ood_model_is_refused_not_dropped(tmp_path):
    run = fake_run(tmp_path)
    (run / "ood.npz").write_bytes(b"not a zip")
    with pytest.raises(runs.RunError, match="ood.npz: not an OOD model"):
        choices.read_choices(run)
    save_ood(run / "ood.npz", {"means": np.zeros((1, 8)), "precision": np.eye(8), "cutoff": np.inf, "epoch": 3})
    with pytest.raises(runs.RunError, match="ood.npz: cutoff is inf"):
        choices.read_choices(run)
    save_ood(run / "ood.npz", {"means": np.zeros((1, 8)), "precision": np.eye(8), "cutoff": 4.0, "epoch": 3})
    assert choices.read_choices(run).ood_cutoff == 4.0


def test_stale_evaluation_is_never_applied_and_the_note_says_how_to_make_it(tmp_path):
    run = edited(fake_run(tmp_path), epoch=1)
    ch = choices.read_choices(run)
    assert ch.temperature is None and ch.operating_point is None
    note = next(n for n in ch.notes if "evaluation.json" in n)
    assert "made for epoch 1" in note and "epoch 3" in note and "python -m retino evaluate" in note
    assert not any("has no evaluation.json" in n for n in ch.notes)


def test_missing_evaluation_note_names_the_command(tmp_path):
    run = fake_run(tmp_path)
    (run / "evaluation.json").unlink()
    ch = choices.read_choices(run)
    assert ch.temperature is None and any("evaluation.json is missing" in n and "evaluate" in n for n in ch.notes)


def test_regress_default_cut_is_its_own_grade_cut_point():
    cut, rule = choices.referral_cut("regress", {"threshold": None}, THRESHOLDS)
    assert cut == THRESHOLDS[1] and "between grades 1 and 2" in rule
    from retino.evaluation.metrics import apply_thresholds
    scores = np.linspace(-1, 5, 601)
    assert np.array_equal(apply_thresholds(scores, THRESHOLDS) >= 2, scores >= cut)  # one set of cut points


def test_classify_default_cut_and_probability_rule():
    cut, rule = choices.referral_cut("classify", None)
    assert cut == 0.5 and rule.startswith("P(grade >= 2) >= 0.5")
    probs = np.array([[0.1, 0.2, 0.3, 0.2, 0.2], [0.5, 0.4, 0.05, 0.05, 0.0]])
    np.testing.assert_allclose(choices.p_referable(probs), [0.7, 0.1])
    assert choices.p_referable(probs[0]) == pytest.approx(0.7)


def test_referral_reason_explains_a_low_grade_referable_photo():
    why = choices.referral_reason("classify", 1, True, 0.31, 0.2)
    assert "referable although graded 1" in why and "below 0.5" in why
    assert "not referable although graded 2" in choices.referral_reason("regress", 2, False, 1.3, 1.5)
    assert choices.referral_reason("classify", 3, True, 0.9, 0.5) is None


def test_the_test_report_uses_the_regress_runs_own_cut(tmp_path):
    import pandas as pd
    from retino.evaluation.report import report
    scores = np.array([0.2, 0.9, 1.1, 1.4, 2.2, 3.0] * 5)
    labels = np.array([0, 1, 1, 2, 2, 3] * 5)
    table = pd.DataFrame({"image": [str(i) for i in range(30)], "patient": [str(i) for i in range(30)], "eye": "left",
                          "split": "test", "label": labels, "score": scores, "referable_score": scores,
                          "grade": np.digitize(scores, THRESHOLDS)})
    chosen = {"selected_on": "val", "temperature": 1.0, "head": "regress", "thresholds": THRESHOLDS,
              "operating_point": {"threshold": None}}
    rep = report(table, chosen, n_boot=20)
    assert rep["referral"]["threshold"] == THRESHOLDS[1]
    positive = labels >= 2
    assert rep["metrics"]["sensitivity"]["value"] == pytest.approx(np.mean(scores[positive] >= THRESHOLDS[1]))


def test_check_run_lists_what_the_choices_refuse(tmp_path):
    from conftest import run_cli
    run = edited(fake_run(tmp_path), temperature=-1)
    r = run_cli("check-run", run)
    assert r.returncode == 1 and "evaluation.json: temperature is -1, expected a finite number > 0" in r.stdout
