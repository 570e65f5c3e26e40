"""Screen: grade every photograph in a folder with a finished run, and list the patients to refer.

All the work is ``retino.screen.screen``, run in this script with a callback that moves the progress
bar (never from another thread). Its rows are written as each batch finishes, so a screen stopped
half-way (Stop, or a closed tab) resumes from its report when started again. The last result stays
in the session, so a download does not screen again.
"""
import math
from pathlib import Path

import streamlit as st

from retino import runs
from retino import screen as screening

st.title("Screen a folder")
st.caption("Every JPEG/PNG under a folder graded in batches: one row per photo, one per patient (referable when "
           "either eye is). Research tool on a model you trained; not a diagnosis.")


def chosen_score(run) -> float:
    """The run's chosen epoch's val QWK (test QWK for runs made before the val split); -inf if none."""
    row = runs.best_row(runs.read_metrics(run.path)) or {}
    for key in ("val_qwk", "test_qwk"):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return -math.inf


def run_label(item) -> str:
    run, score = item
    qwk = f" · QWK {score:.3f}" if math.isfinite(score) else ""
    return f"{run.name} ({run.id}){qwk}"


candidates = sorted(((r, chosen_score(r)) for r in runs.list_runs()
                     if r.state == "completed" and (r.path / "best.pt").is_file()),
                    key=lambda item: -item[1])
if not candidates:
    st.info("No completed run with a best checkpoint yet: train a model on the Train page first. Runs are read "
            f"from `{runs.runs_root().resolve()}`.", icon=":material/info:")
    st.stop()

left, right = st.columns([2, 3])
run, _ = left.selectbox("Run (best first)", candidates, key="screen.run", format_func=run_label)
cfg = run.config.get("train", {})
left.caption(f"{cfg.get('arch', '?')} · {cfg.get('head', '?')} head · {cfg.get('image_size', '?')} px · "
             "best checkpoint")
folder = right.text_input("Folder of photographs", key="screen.folder", placeholder="/data/screening/2026-01-15",
                          help="Searched recursively for .jpeg, .jpg and .png; hidden files are skipped.")
out = right.text_input("Report file (.csv)", key="screen.out",
                       placeholder=str(screening.default_report(folder or "FOLDER", run.path)),
                       help="Photos already in this report are skipped: start again to resume a stopped screen. "
                            "<name>.patients.csv and <name>.json are written beside it.")
with st.expander("Options"):
    o1, o2, o3, o4 = st.columns(4)
    batch_size = o1.number_input("Batch size", 1, 256, 16, key="screen.batch_size")
    workers = o2.number_input("Decoding processes", 0, 64, None, key="screen.workers", placeholder="auto",
                              help=f"Empty: {screening.default_workers()} on this machine, none for fewer than "
                                   f"{screening.POOL_MIN_PHOTOS} photos. 0 decodes in the dashboard's own process.")
    tta = o3.toggle("TTA", key="screen.tta", help="Average over flips and ±10° rotations (4x the work).")
    gate = o4.toggle("Quality gate", True, key="screen.gate",
                     help="Photos that are not a fundus are not graded; ungradable ones are, with the reason.")

if st.button("Start", type="primary", key="screen.start", icon=":material/play_arrow:", disabled=not folder.strip()):
    bar = st.progress(0.0, text="Finding photographs…")

    def moved(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{done:,} of {total:,} photos")

    try:
        st.session_state["screen.result"] = screening.screen(
            run.path, Path(folder.strip()).expanduser(), Path(out.strip()).expanduser() if out.strip() else None,
            batch_size=int(batch_size), tta=tta, workers=None if workers is None else int(workers),
            quality_gate=gate, on_progress=moved)
        bar.progress(1.0, text="Done")
    except (screening.ScreenError, runs.RunError) as e:
        bar.empty()
        st.error(str(e), icon=":material/error:")

result = st.session_state.get("screen.result")
if result is None:
    st.stop()
s = result.summary()
st.subheader("Patients")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Patients", f"{s['patients']:,}")
m2.metric("Referable", f"{s['referable_patients']:,}")
m3.metric("Photos graded", f"{s['graded']:,}", help=f"{s['ungradable']:,} of them ungradable: see their reasons")
m4.metric("Not graded", f"{s['errors']:,}", help=f"unreadable files, and {s['not_fundus']:,} not a fundus")
st.caption(f"Referable when {s['threshold_source']}. "
           f"{s['skipped']:,} photos were already in the report. Report: `{s['report']}`")
st.dataframe(result.patients, hide_index=True, key="screen.patients",
             column_config={"worst_grade": "worst grade", "ungraded": "photos not graded"})
st.download_button("Download the patients (CSV)", screening.table_csv(result.patients),
                   file_name=result.patients_report.name, mime="text/csv", icon=":material/download:",
                   key="screen.download_patients")
st.subheader("Photos")
st.dataframe(result.photos.dropna(axis=1, how="all"), hide_index=True, key="screen.photos",
             column_config={f"p{g}": st.column_config.NumberColumn(f"P(grade {g})", format="percent")
                            for g in range(5)})
st.download_button("Download the photos (CSV)", screening.table_csv(result.photos), file_name=result.report.name,
                   mime="text/csv", icon=":material/download:", key="screen.download_photos")
