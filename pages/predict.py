"""Predict: grade photographs with a finished run and see where the model looked (Grad-CAM).

Every number and map comes from ``retino.inference.predict`` and ``retino.inference.explain``; the model is loaded once
per (run, checkpoint stamp) and shared by every session (``explain`` locks it while a map is made),
predictions and maps are cached per photo, so moving the opacity slider only re-blends. Each photo
shows the quality gate's verdict (a photo that is not a fundus is not graded unless asked), the
referral at the run's operating point and calibrated probabilities.
"""
import hashlib
import io
from pathlib import Path

import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from retino import paths
from retino.dashboard import charts, runs_view as dashboard, settings
from retino.evaluation import compare
from retino.inference import engine, explain, predict
from retino import runs
from retino.dashboard.text import md_text
from retino.inference import choices
from retino.inference.choices import PROB_COLS
from retino.data import DatasetError, read_dataset
from retino.data.preprocess import MAX_BYTES
from retino.grades import GRADE_INFO, GRADES
from retino.inference.trained import load_trained

MAX_UPLOAD_MB = MAX_BYTES // 2**20  # the decoder's own limit; larger files would be refused anyway
FINE_MAP_CELLS = 8  # below this many cells a side, the page says why the map is coarse


@st.cache_resource(max_entries=4, show_spinner="Loading the model (a checkpoint's first use also converts it "
                                                 "for ONNX Runtime, once)…")
def load_model(run_dir: str, stamp: tuple):
    """The run's best checkpoint, shared across sessions; a rewritten checkpoint has a new stamp.

    Lazy: grading runs on the engine (ONNX Runtime on a CPU), and the PyTorch network is built
    when a Grad-CAM map first asks for it.
    """
    trained = load_trained(run_dir, lazy=True)
    engine.get(trained, "auto")
    return trained


@st.cache_data(max_entries=64, show_spinner=False)  # a Prediction holds a photo of up to 1024 px
def grade_photo(run_key: tuple, name: str, digest: str, tta: bool, gate: bool, _trained, _data: bytes):
    buf = io.BytesIO(_data)
    buf.name = name  # load_image names the file in its one-line errors
    return predict.predict(_trained, [buf], tta=tta, quality_gate=gate)[0]


@st.cache_data(max_entries=64, show_spinner=False)
def heat_map(run_key: tuple, digest: str, method: str, target, contrast, _trained, _pred):
    e = explain.explain(_trained, _pred, method=method, target=target, contrast=contrast)
    return e.heatmap, e.target, e.contrast


@st.cache_data(max_entries=8, show_spinner=False)
def sample_images(path: str) -> dict[str, tuple[str, int]]:
    """The data set's first 500 test images: path -> (file name, true grade)."""
    test = read_dataset(path).splits["test"].head(500)
    return {str(p): (Path(p).name, int(g)) for p, g in zip(test["path"], test["grade"])}


def pick_run():
    """The run picker (the best completed run first chosen) and its headline figures; None: no run yet."""
    infos = runs.list_runs()
    candidates = dashboard.predict_candidates(infos)
    if not candidates:
        st.info("No finished run with a best checkpoint yet: train a model on the Train page first. Runs are "
                f"read from `{paths.runs_root().resolve()}`.", icon=":material/info:")
        try:
            st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
        except StreamlitPageNotFoundError:  # the page run on its own, not through app.py's router
            pass
        return None
    rows = {r.path: runs.read_metrics(r.path) for r in candidates}
    labels = dict(zip((r.id for r in candidates), compare.run_labels(
        [r.name for r in candidates], [r.id for r in candidates], [r.config.get("train", {}) for r in candidates])))
    best = dashboard.best_completed(candidates, rows)
    left, right = st.columns([2, 3])
    run = left.selectbox(
        "Run", candidates, key="predict.run", index=candidates.index(best) if best else 0,
        format_func=lambda r: dashboard.picker_label(labels[r.id], r.state, rows[r.path]),
        help="The best completed run (highest validation QWK, else test QWK) is chosen first.")
    cfg = run.config.get("train", {})
    left.caption(f"{md_text(run.id)} · {cfg.get('arch', '?')} · {cfg.get('head', '?')} head · "
                 f"{cfg.get('image_size', '?')} px"
                 f"{' · Ben Graham' if cfg.get('ben_graham') else ''} · best checkpoint")
    top = runs.best_row(rows[run.path]) or {}
    m1, m2, m3, m4 = right.columns(4)
    m1.metric("Best epoch", top.get("epoch", "–"))
    m2.metric("test QWK", f"{top['test_qwk']:.3f}" if top.get("test_qwk") is not None else "–")
    m3.metric("test accuracy", f"{top['test_acc']:.1%}" if top.get("test_acc") is not None else "–")
    m4.metric("Ref. AUC (epoch, uncalibrated)", f"{top['test_ref_auc']:.3f}" if top.get("test_ref_auc") is not None
              else "–", help="metrics.jsonl's figure, before the temperature; the test report's referable AUC "
                             "(Compare page, evaluate) is after it")
    return run


def pick_photos() -> tuple[list[tuple[str, bytes]], dict | None]:
    """Uploaded photos and chosen test images as (name, bytes), and the chosen ones' true grades."""
    up_col, sample_col = st.columns(2)
    uploads = up_col.file_uploader(
        "Fundus photographs", type=["jpg", "jpeg", "png", "dcm"], accept_multiple_files=True, key="predict.uploads",
        max_upload_size=MAX_UPLOAD_MB, help="JPEG or PNG, any size: the fundus is found, cropped and resized as "
        "the run was trained.")
    data_dir = settings.data_path()
    try:
        samples = sample_images(str(data_dir))
    except DatasetError as e:
        samples = {}
        sample_col.caption(f"No samples: {e}")
    picked = sample_col.multiselect(
        f"Or test images from {data_dir.name}", list(samples), key="predict.samples", placeholder="choose samples",
        format_func=lambda p: f"{samples[p][0]} (grade {samples[p][1]})" if p in samples else p)
    photos = [(f.name, f.getvalue()) for f in uploads or []]
    truth = {}
    for path in picked:
        try:
            photos.append((Path(path).name, Path(path).read_bytes()))
            truth[Path(path).name] = samples[path][1]
        except (OSError, KeyError) as e:
            st.error(f"{Path(path).name}: cannot be read ({getattr(e, 'strerror', e)})", icon=":material/error:")
    return photos, truth or None


def map_options(trained) -> tuple[bool, str, object, object, float]:
    """TTA, CAM method, the grade explained and against which, and the map's opacity."""
    o1, o2, o3, o4, o5 = st.columns(5)
    tta = o1.toggle("TTA", key="predict.tta", help="Test-time augmentation: average over the photo, its vertical "
                    "flip and ±10° rotations (4x the work).")
    method = o2.selectbox("Map", explain.list_cam_methods(), key="predict.method",
                          help="eigencam uses no gradients: it shows the same map for every grade.")
    no_target = trained.config.head == "regress" or method in explain.TARGET_FREE
    target = o3.selectbox("Explain grade", [None, *GRADES], key="predict.target", disabled=no_target,
                          format_func=lambda g: "the predicted one" if g is None else f"{g} · {GRADE_INFO[g]['name']}",
                          help="A regress head's map explains its raw score; eigencam's map is the same for every grade.")
    contrast = o4.selectbox("Compared with", [0, None], key="predict.contrast", disabled=no_target,
                            format_func=lambda c: "grade 0 (healthy eye)" if c == 0 else "nothing (raw logit)",
                            help="Against grade 0 the map shows the evidence for the grade rather than a healthy eye.")
    opacity = o5.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="predict.opacity")
    return tta, method, target, contrast, opacity


def verdicts(preds, digests) -> None:
    """Per photo: an error box when it is rejected (not a fundus: with "Grade anyway"), a warning box
    when it is ungradable or something needs saying (unreadable EXIF)."""
    shown = set()
    for p, digest in zip(preds, digests):
        if digest in shown:  # the same photo twice: one box, one checkbox (widget keys are unique)
            continue
        shown.add(digest)
        q = p.quality or {}
        if q.get("verdict") == "not_fundus":
            reasons = "; ".join(q["reasons"])
            st.error(f"{p.image}: not a fundus photograph: {reasons}" + ("" if not p.ok else " (graded anyway)"),
                     icon=":material/hide_image:")
            st.checkbox("Grade anyway", key=f"predict.anyway.{digest}",
                        help="Grade it with the quality gate off: the grade of a photo that is not a fundus means nothing.")
        elif not p.ok:
            st.error(p.error, icon=":material/broken_image:")
        elif q.get("verdict") == "ungradable":
            st.warning(f"{p.image}: ungradable: {'; '.join(q['reasons'])}. Graded anyway: the grade may not hold.",
                       icon=":material/warning:")
        if p.status == choices.REFER_UNGRADED:
            st.info(f"{p.image}: **{p.status}**: Retino did not grade this eye from a gradable photo, which is no "
                    "evidence that it is healthy: refer the patient for examination (or retake the photo).",
                    icon=":material/assignment_late:")
        for line in p.warnings:
            st.warning(line, icon=":material/warning:")


def results_table(preds, truth) -> None:
    table = predict.predictions_table(preds, truth)
    st.dataframe(table.dropna(axis=1, how="all"), hide_index=True, key="predict.table",
                 column_config={"grade_name": "ICDR name", "true_grade": "true grade",
                                "score": st.column_config.NumberColumn("raw score", format="%.2f"),
                                "referable": st.column_config.CheckboxColumn("referable"),
                                **{col: st.column_config.NumberColumn(f"P(grade {g})", format="percent")
                                   for g, col in enumerate(PROB_COLS)}})
    st.download_button("Download the table (CSV)", table.to_csv(index=False), file_name="predictions.csv",
                       mime="text/csv", icon=":material/download:", key="predict.download")


def show_map(trained, run_key, pred, digest, method, target, contrast, opacity) -> None:
    """The photo, what the model saw, the map over it, and the grade with its probabilities or score."""
    regress, size = trained.config.head == "regress", trained.config.image_size
    with st.spinner("Making the map…"):
        heat, explained, against = heat_map(run_key, digest, method, None if regress else target,
                                            None if regress else contrast, trained, pred)
    c1, c2, c3 = st.columns(3)
    c1.image(pred.original, caption="The photograph", width="stretch")
    c2.image(pred.seen, caption=f"What the model saw ({size} px)", width="stretch")
    if method in explain.TARGET_FREE:
        what = "the strongest activation pattern (the same for every grade)"
    elif regress:
        what = "evidence for a higher score"
    else:
        what = f"evidence for grade {explained}" + (f" over grade {against}" if against is not None else "")
    c3.image(explain.overlay(pred.seen, heat, image_weight=1.0 - opacity), caption=f"{method}: {what}",
             width="stretch")
    note = None if regress or method in explain.TARGET_FREE else dashboard.explain_note(explained, pred.grade)
    if note:
        c3.info(note, icon=":material/info:")
    cells = explain.map_cells(size)
    if cells < FINE_MAP_CELLS:
        c3.caption(f"The map has {cells} x {cells} cells: a CAM at the last block has the image size / "
                   f"{explain.MAP_STRIDE} ({size} px / {explain.MAP_STRIDE}). Train at 256 px or more for a finer "
                   f"map (512 px gives {explain.map_cells(512)} x {explain.map_cells(512)}).")
    info = GRADE_INFO[pred.grade]
    g1, g2 = st.columns([2, 3])
    g1.subheader(f"Grade {pred.grade}: {info['name']}")
    g1.write(info["description"])
    g1.markdown(referral_line(pred, trained))
    g1.caption(f"Quality gate: {(pred.quality or {}).get('verdict', 'not run')}. "
               "Research tool on a model you trained; not a diagnosis.")
    chart = (charts.score_on_thresholds(pred.score, pred.thresholds) if regress
             else charts.probabilities(pred.probs, pred.grade))
    g2.plotly_chart(chart, key="predict.chart")
    if not regress:
        g2.caption(f"Probabilities calibrated (temperature {pred.temperature:.2f}, chosen on "
                   f"{trained.selected_on or 'val'})." if pred.temperature else
                   "Probabilities not calibrated: no temperature applies to this checkpoint (see the note above).")
    g2.caption(f"Graded by {engine.describe(engine.get(trained, 'auto').info())}; maps drawn by PyTorch (they "
               "need its gradients).")


def referral_line(pred, trained) -> str:
    """"Referable at this run's operating point: yes (P(grade >= 2) 0.63, threshold 0.41)", or the default rule."""
    what = "score" if pred.probs is None else "P(grade ≥ 2)"
    where = ("at this run's operating point" if trained.operating_point
             else "by the default rule (this run has no operating point)")
    why = f" — {pred.referable_why}" if pred.referable_why else ""
    return (f"Referable {where}: **{'yes' if pred.referable else 'no'}** ({what} {dashboard.probability_text(pred.referable_score)}, "
            f"threshold {pred.referable_threshold:.2f}){why}")


def page() -> None:
    st.title("Predict")
    run = pick_run()
    if run is None:
        return
    stamp = dashboard.checkpoint_stamp(run.path)
    try:
        trained = load_model(str(run.path), stamp)
    except (runs.RunError, OSError) as e:
        st.error(f"Cannot load this run's model: {e}", icon=":material/error:")
        return
    run_key = (str(run.path), stamp)
    photos, truth = pick_photos()
    if not photos:
        st.info("Upload photographs or pick samples to grade them.", icon=":material/upload:")
        return
    tta, method, target, contrast, opacity = map_options(trained)
    digests = [hashlib.sha1(data).hexdigest() for _, data in photos]
    bar = st.progress(0.0, text=f"Grading 0 of {len(photos)} photos…") if len(photos) > 1 else None
    preds = []
    for (name, data), d in zip(photos, digests):
        preds.append(grade_photo(run_key, name, d, tta, not st.session_state.get(f"predict.anyway.{d}"), trained, data))
        if bar is not None:
            bar.progress(len(preds) / len(photos), text=f"Grading {len(preds)} of {len(photos)} photos…")
    if bar is not None:
        bar.empty()
    for note in trained.notes:  # choices missing or made for another epoch: said, with how to make them
        st.warning(note, icon=":material/info:")
    verdicts(preds, digests)
    results_table(preds, truth)
    graded = {d: p for p, d in zip(preds, digests) if p.ok}  # digest -> prediction: stable across reruns
    if not graded:
        return
    digest = next(iter(graded))
    if len(graded) > 1:
        digest = st.selectbox("Photo", list(graded), key="predict.focus", format_func=lambda d: graded[d].image)
    show_map(trained, run_key, graded[digest], digest, method, target, contrast, opacity)


page()
