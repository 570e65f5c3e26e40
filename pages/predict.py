"""Predict: grade photographs with a finished run and see where the model looked (Grad-CAM).

Every number and map comes from ``retino.explain``; the model is loaded once per (run, checkpoint
mtime) and shared by every session (``explain`` locks it while a map is made), predictions and maps
are cached per photo, so moving the opacity slider only re-blends.
"""
import hashlib
import os
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from retino import compare, explain, runs
from retino.data import DatasetError, read_dataset
from retino.data.preprocess import MAX_BYTES
from retino.evaluate import load_trained

GRADES = list(explain.GRADE_INFO)
GRADE_NAMES = {g: info["name"] for g, info in explain.GRADE_INFO.items()}
MAX_UPLOAD_MB = MAX_BYTES // 2**20  # the decoder's own limit; larger files would be refused anyway


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def load_model(run_dir: str, mtime_ns: int):
    """The run's best checkpoint, shared across sessions; a rewritten best.pt has a new mtime."""
    return load_trained(run_dir)


@st.cache_data(max_entries=64, show_spinner=False)  # a Prediction holds a photo of up to 1024 px
def grade_photo(run_key: tuple, name: str, digest: str, tta: bool, _trained, _data: bytes):
    return explain.predict(_trained, [named_bytes(name, _data)], tta=tta)[0]


@st.cache_data(max_entries=64, show_spinner=False)
def heat_map(run_key: tuple, digest: str, method: str, target, contrast, _trained, _pred):
    e = explain.explain(_trained, _pred, method=method, target=target, contrast=contrast)
    return e.heatmap, e.target, e.contrast


@st.cache_data(max_entries=8, show_spinner=False)
def sample_images(path: str) -> dict[str, str]:
    """The data set's first 500 test images: path -> "name (grade g)"."""
    test = read_dataset(path).splits["test"].head(500)
    return {str(p): f"{Path(p).name} (grade {int(g)})" for p, g in zip(test["path"], test["grade"])}


def named_bytes(name: str, data: bytes):
    import io
    buf = io.BytesIO(data)
    buf.name = name  # load_image names the file in its one-line errors
    return buf


def data_in_use() -> Path:
    """The data set chosen in the sidebar (retino.settings), else the synthetic default."""
    try:
        from retino import settings
    except ImportError:
        return Path("data/synthetic")
    get = getattr(settings, "get_data_dir", None) or getattr(settings, "data_path", None)
    return Path(get()) if get else Path("data/synthetic")


def probability_chart(probs, grade: int) -> go.Figure:
    labels = [f"{g} · {explain.GRADE_INFO[g]['name']}" for g in GRADES]
    colours = ["#d62728" if g == grade else "#9aa5b1" for g in GRADES]
    fig = go.Figure(go.Bar(x=probs, y=labels, orientation="h", marker_color=colours,
                           text=[f"{p:.1%}" for p in probs], textposition="auto"))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%", title="probability"),
                      yaxis=dict(autorange="reversed"), height=260, margin=dict(l=10, r=10, t=10, b=10))
    return fig


def score_chart(score: float, thresholds) -> go.Figure:
    fig = go.Figure(go.Scatter(x=[score], y=[0], mode="markers+text", text=[f"{score:.2f}"],
                               textposition="top center", marker=dict(size=14, color="#d62728")))
    for t in thresholds:
        fig.add_vline(x=t, line_dash="dot", line_color="#9aa5b1")
    fig.update_layout(xaxis=dict(range=[min(-0.5, score - 0.5), max(4.5, score + 0.5)], title="raw score"),
                      yaxis=dict(visible=False), height=160, margin=dict(l=10, r=10, t=10, b=10))
    return fig


st.title("Predict")
candidates = [r for r in runs.list_runs()
              if r.state in ("completed", "stopped") and (r.path / "best.pt").is_file()]
if not candidates:
    st.info("No finished run with a best checkpoint yet: train a model on the Train page first. Runs are "
            f"read from `{runs.runs_root().resolve()}`.", icon=":material/info:")
    try:
        st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
    except StreamlitPageNotFoundError:  # the page run on its own, not through app.py's router
        pass
    st.stop()

# ----------------------------------------------------------------------------- the run
left, right = st.columns([2, 3])
run = left.selectbox("Run", candidates, key="predict.run", format_func=lambda r: f"{r.name} ({r.state})")
cfg = run.config.get("train", {})
left.caption(f"{cfg.get('arch', '?')} · {cfg.get('head', '?')} head · {cfg.get('image_size', '?')} px"
             f"{' · Ben Graham' if cfg.get('ben_graham') else ''} · best checkpoint")
best = compare.best_row(runs.read_metrics(run.path)) or {}
m1, m2, m3, m4 = right.columns(4)
m1.metric("Best epoch", best.get("epoch", "–"))
m2.metric("Test QWK", f"{best['test_qwk']:.3f}" if best.get("test_qwk") is not None else "–")
m3.metric("Test accuracy", f"{best['test_acc']:.1%}" if best.get("test_acc") is not None else "–")
m4.metric("Referable AUC", f"{best['test_ref_auc']:.3f}" if best.get("test_ref_auc") is not None else "–")
try:
    ckpt = run.path / "best.pt"
    trained = load_model(str(run.path), os.stat(ckpt).st_mtime_ns)
except (runs.RunError, OSError) as e:
    st.error(f"Cannot load this run's model: {e}", icon=":material/error:")
    st.stop()
run_key = (str(run.path), os.stat(ckpt).st_mtime_ns)

# ----------------------------------------------------------------------------- the photos
up_col, sample_col = st.columns(2)
uploads = up_col.file_uploader(
    "Fundus photographs", type=["jpg", "jpeg", "png"], accept_multiple_files=True, key="predict.uploads",
    max_upload_size=MAX_UPLOAD_MB, help="JPEG or PNG, any size: the fundus is found, cropped and resized as the "
    "run was trained.")
data_dir = data_in_use()
try:
    samples = sample_images(str(data_dir))
except DatasetError as e:
    samples = {}
    sample_col.caption(f"No samples: {e}")
picked = sample_col.multiselect(f"Or test images from {data_dir.name}", list(samples), key="predict.samples",
                                format_func=lambda p: samples.get(p, p), placeholder="choose samples")
photos = [(f.name, f.getvalue()) for f in uploads or []]
for path in picked:
    try:
        photos.append((Path(path).name, Path(path).read_bytes()))
    except OSError as e:
        st.error(f"{Path(path).name}: cannot be read ({e.strerror})", icon=":material/error:")
if not photos:
    st.info("Upload photographs or pick samples to grade them.", icon=":material/upload:")
    st.stop()

o1, o2, o3, o4, o5 = st.columns([1, 1, 1, 1, 1])
tta = o1.toggle("TTA", key="predict.tta", help="Test-time augmentation: average over the photo, its vertical "
                "flip and ±10° rotations (4x the work).")
method = o2.selectbox("Map", explain.list_cam_methods(), key="predict.method",
                      help="eigencam uses no gradients: it shows the same map for every grade.")
regress = trained.config.head == "regress"
no_target = regress or method in explain.TARGET_FREE
target = o3.selectbox("Explain grade", [None, *GRADES], key="predict.target", disabled=no_target,
                      format_func=lambda g: "the predicted one" if g is None else f"{g} · {GRADE_NAMES[g]}",
                      help="A regress head's map explains its raw score; eigencam's map is the same for every grade.")
contrast = o4.selectbox("Compared with", [0, None], key="predict.contrast", disabled=no_target,
                        format_func=lambda c: "grade 0 (healthy eye)" if c == 0 else "nothing (raw logit)",
                        help="Against grade 0 the map shows the evidence for the grade rather than a healthy eye.")
opacity = o5.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="predict.opacity")

with st.spinner("Grading…"):
    digests = [hashlib.sha1(data).hexdigest() for _, data in photos]
    preds = [grade_photo(run_key, name, d, tta, trained, data) for (name, data), d in zip(photos, digests)]
for p in preds:
    if not p.ok:
        st.error(p.error, icon=":material/broken_image:")

table = explain.predictions_table(preds)
st.dataframe(table.dropna(axis=1, how="all"), hide_index=True, key="predict.table",
             column_config={"grade_name": "ICDR name",
                            "score": st.column_config.NumberColumn("raw score", format="%.2f"),
                            **{f"p{g}": st.column_config.NumberColumn(f"P(grade {g})", format="percent")
                               for g in GRADES}})
st.download_button("Download the table (CSV)", table.to_csv(index=False), file_name="predictions.csv",
                   mime="text/csv", icon=":material/download:", key="predict.download")

graded = {d: p for p, d in zip(preds, digests) if p.ok}  # digest -> prediction: stable across reruns
if not graded:
    st.stop()
digest = next(iter(graded))
if len(graded) > 1:
    digest = st.selectbox("Photo", list(graded), key="predict.focus", format_func=lambda d: graded[d].image)
pred = graded[digest]

with st.spinner("Making the map…"):
    heat, explained, against = heat_map(run_key, digest, method, None if regress else target,
                                        None if regress else contrast, trained, pred)
c1, c2, c3 = st.columns(3)
c1.image(pred.original, caption="The photograph", width="stretch")
c2.image(pred.seen, caption=f"What the model saw ({trained.config.image_size} px)", width="stretch")
if method in explain.TARGET_FREE:
    what = "the strongest activation pattern (the same for every grade)"
elif regress:
    what = "evidence for a higher score"
else:
    what = f"evidence for grade {explained}" + (f" over grade {against}" if against is not None else "")
c3.image(explain.overlay(pred.seen, heat, image_weight=1.0 - opacity), caption=f"{method}: {what}", width="stretch")

info = explain.GRADE_INFO[pred.grade]
g1, g2 = st.columns([2, 3])
g1.subheader(f"Grade {pred.grade}: {info['name']}")
g1.write(info["description"])
g1.caption("Research tool on a model you trained; not a diagnosis.")
if regress:
    g2.plotly_chart(score_chart(pred.score, pred.thresholds), key="predict.chart")
else:
    g2.plotly_chart(probability_chart(pred.probs, pred.grade), key="predict.chart")
