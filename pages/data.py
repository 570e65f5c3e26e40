"""Data set: what the folder in use holds before anything is trained on it.

Grades per split, the accuracy a do-nothing model gets, the class weights each scheme would use,
eyes, image sizes, unreadable files and a few samples per grade. The summary reads only image
headers and ends (``retino.data.stats``) and is cached per folder state; only the gallery decodes.
"""
import numpy as np
import pandas as pd
import streamlit as st

from retino.dashboard import charts, settings
from retino.config import CLASS_WEIGHTS, TrainConfig
from retino.data import DatasetError, load_image, preprocess, read_dataset, stats
from retino.grades import GRADE_NAMES
from retino.evaluation.metrics import class_weights
from retino.dashboard.text import md_text

GALLERY_DISPLAY_PX = 360  # originals are shown downscaled: a 3888 px Kaggle photo would weigh megabytes
TRAINING = TrainConfig()  # the gallery's defaults are what a default run sees


@st.cache_data(show_spinner="Reading image headers…", max_entries=8)
def summarize(path: str, fingerprint: tuple) -> dict:
    """``retino.data.stats`` plus every readable image's path and grade (for the gallery)."""
    ds = read_dataset(path)
    report = stats(ds)
    bad = {p["file"] for p in report["problems"]}
    table = pd.concat([df.assign(split=split) for split, df in ds.splits.items()], ignore_index=True)
    report["readable"] = table.loc[~table["path"].isin(bad), ["split", "path", "grade"]]
    return report


@st.cache_data(show_spinner=False, max_entries=256)
def sample_pair(path: str, size: int, ben_graham: bool) -> tuple[np.ndarray, np.ndarray]:
    """(original downscaled for display, preprocessed as training sees it) for one image."""
    img = load_image(path, target=max(size, GALLERY_DISPLAY_PX))
    small = img.copy()
    small.thumbnail((GALLERY_DISPLAY_PX, GALLERY_DISPLAY_PX))
    return np.asarray(small), preprocess(img, size, ben_graham_norm=ben_graham)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def load_report():
    """The summary of the folder in use; None (with what to do) when it cannot be read."""
    path = settings.data_path()
    try:
        return summarize(str(path), settings.folder_fingerprint(path))
    except DatasetError as e:
        st.error(md_text(e), icon=":material/error:")
        if settings.is_default_data(path):
            st.info("The synthetic set has not been generated yet: run `make data` (or "
                    f"`python -m retino synth {settings.DEFAULT_DATA}`), or choose another folder in the sidebar.")
        else:
            st.info("Choose another folder under **Switch data set** in the sidebar.")
        return None


def grades(report: dict) -> None:
    """Counts per split and the accuracy floor of always answering the majority grade."""
    splits = report["splits"]
    st.caption(f"{md_text(report['path'])} · {report['layout']} layout · {settings.split_text(report['split'])}")
    if settings.is_synthetic(report["path"]):
        st.info("This is Retino's synthetic default data: fundus-like images Retino drew itself (`python -m "
                "retino synth`), not photographs of eyes. It lets every page work on a fresh machine; figures on it "
                "say nothing about real photos. Choose your own folder under **Switch data set** in the sidebar.",
                icon=":material/science:")
    cols = st.columns(len(splits) + 1)
    for col, (split, s) in zip(cols, splits.items()):
        col.metric(f"{split} images", f"{s['n']:,}")
    cols[-1].metric("unreadable files", f"{len(report['problems']):,}")
    st.subheader("Grades")
    percent = st.segmented_control("Bar height", ["count", "percent"], default="count", key="data.unit") == "percent"
    st.plotly_chart(charts.label_distribution(report, percent=percent), key="data.grades")
    majority = {s["majority_grade"] for s in splits.values()}
    if len(majority) == 1:  # the usual case: one grade dominates every split
        g = majority.pop()
        floors = " and ".join(f"**{_pct(s['majority_acc'])}** on {split}" for split, s in splits.items())
        floor_text = f"Always predicting grade {g} ({GRADE_NAMES[g]}) scores {floors}"
    else:
        floor_text = "Always predicting the most common grade scores " + " and ".join(
            f"**{_pct(s['majority_acc'])}** on {split} (grade {s['majority_grade']})" for split, s in splits.items())
    st.info(f"{floor_text} here, with QWK 0: the accuracy floor any model has to beat.", icon=":material/info:")


def weights_and_eyes(report: dict) -> None:
    splits = report["splits"]
    left, right = st.columns(2)
    with left:
        st.subheader("Class weights")
        train_counts = splits.get("train", next(iter(splits.values())))["counts"]
        weights = pd.DataFrame({scheme: class_weights(train_counts, scheme) for scheme in CLASS_WEIGHTS},
                               index=pd.Index(charts.GRADE_LABELS, name="grade")).T
        st.dataframe(weights.style.format("{:.3f}"))
        st.caption("Cross-entropy weight per grade under each `class_weights` setting, from the train counts: "
                   "lab = 1 − n_k/N (the lab report's), inverse = N/(K·n_k).")
    with right:
        st.subheader("Eyes and image sizes")
        facts = pd.DataFrame({
            split: {"left eyes": s["eyes"]["left"], "right eyes": s["eyes"]["right"],
                    "eye unknown": s["n"] - s["eyes"]["left"] - s["eyes"]["right"],
                    **{f"{k} size": "–" if s["size"][k] is None else f"{s['size'][k][0]} × {s['size'][k][1]}"
                       for k in ("min", "median", "max")}}
            for split, s in splits.items()}).astype(str)
        st.dataframe(facts)


def gallery(report: dict) -> None:
    """A few originals per grade next to what training makes of them (training's defaults first)."""
    st.subheader("Samples per grade")
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1], vertical_alignment="bottom")
    per_grade = c1.slider("Samples per grade", 1, 6, 3, key="data.per_grade")
    size = c2.select_slider("Preprocessed size", [64, 128, 224, 256, 384, 512], value=TRAINING.image_size,
                            key="data.size", help="the training image size: cropped to the fundus, squared, resized")
    ben_graham = c3.toggle("Ben Graham normalisation", value=TRAINING.ben_graham, key="data.bg",
                           help="on by default, as in training (--ben-graham)")
    if c4.button("Shuffle", icon=":material/shuffle:"):
        st.session_state["data.seed"] = st.session_state.get("data.seed", 0) + 1
    readable = report["readable"]
    for grade, name in enumerate(GRADE_NAMES):
        pool = readable[readable["grade"] == grade]
        st.markdown(f"**{grade} · {name}** ({len(pool):,} image{'s' if len(pool) != 1 else ''})")
        if pool.empty:
            st.caption("No readable image of this grade.")
            continue
        picks = pool.sample(min(per_grade, len(pool)), random_state=st.session_state.get("data.seed", 0))
        cells = st.columns(2 * per_grade)
        for i, (_, pick) in enumerate(picks.iterrows()):
            try:
                original, processed = sample_pair(pick["path"], size, ben_graham)
            except Exception as e:  # a file changed since the scan: show why, keep the gallery
                cells[2 * i].warning(md_text(f"{pick['path']}: {e}"))
                continue
            fname = pick["path"].rsplit("/", 1)[-1]
            cells[2 * i].image(original, caption=f"{fname} ({pick['split']})", width="stretch")
            cells[2 * i + 1].image(processed, caption=f"preprocessed {size} px", width="stretch")


def problems(report: dict) -> None:
    st.subheader("Unreadable files")
    if report["problems"]:
        st.warning(f"{len(report['problems']):,} file(s) cannot be used; training skips them.")
        st.dataframe(pd.DataFrame(report["problems"]), hide_index=True)
    else:
        st.success("Every image's header and end marker read cleanly.", icon=":material/check_circle:")


st.title("Data set")
report = load_report()
if report is not None:
    grades(report)
    weights_and_eyes(report)
    gallery(report)
    problems(report)
