"""Screen: grade every photograph in a folder with a finished run, and list the patients to refer.

All the work is ``retino.screening.screen.screen``, run in this script with a callback that moves the progress
bar (never from another thread). Its rows are written as each batch finishes, so a screen stopped
half-way resumes from its report when started again. Stop (or any click while it runs) ends the
script run at the next batch, as Streamlit does: the rerun finds the job still in the session and
shows what the report holds so far. The last result stays in the session, so a download does not
screen again.
"""
import math

import streamlit as st

from retino import paths
from retino.training import admission
from retino.dashboard import runs_view as dashboard
from retino import runs
from retino.screening import screen as screening
from retino.screening.screen_paths import path_problem
from retino.inference.choices import STATUSES
from retino.dashboard.text import md_text
from retino.screening import screen_paths, screen_report

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
    rows = runs.read_metrics(run.path)
    qwk = f" · {dashboard.figure(runs.best_row(rows), runs.selected_on(rows))}" if math.isfinite(score) else ""
    return f"{run.name} ({run.id}){qwk}"


candidates = sorted(((r, chosen_score(r)) for r in runs.list_runs()
                     if r.state == "completed" and (r.path / "best.pt").is_file()),
                    key=lambda item: -item[1])
if not candidates:
    st.info("No completed run with a best checkpoint yet: train a model on the Train page first. Runs are read "
            f"from `{paths.runs_root().resolve()}`.", icon=":material/info:")
    st.stop()

left, right = st.columns([2, 3])
run, _ = left.selectbox("Run (best first)", candidates, key="screen.run", format_func=run_label)
cfg = run.config.get("train", {})
left.caption(f"{cfg.get('arch', '?')} · {cfg.get('head', '?')} head · {cfg.get('image_size', '?')} px · "
             "best checkpoint")
folder = right.text_input("Folder of photographs", key="screen.folder", placeholder="/data/screening/2026-01-15",
                          help="Searched recursively for photos (JPEG, PNG, TIFF, BMP, DICOM); hidden files are skipped.")
default_out = "RUNS/screens/<folder>/screen-<run>.csv" if not folder.strip() or path_problem(folder.strip()) \
    else str(screen_paths.default_report(folder.strip(), run.path))
out = right.text_input("Report file (.csv)", key="screen.out", placeholder=default_out,
                       help="Photos already in this report are skipped: start again to resume a stopped screen. "
                            "<name>.patients.csv and <name>.json are written beside it. Empty: under the runs "
                            "folder, one report per folder and run. Never a run folder or another program's file.")
with st.expander("Options"):
    o1, o2, o3, o4 = st.columns(4)
    batch_size = o1.number_input("Batch size", 1, 256, 16, key="screen.batch_size")
    workers = o2.number_input("Decoding processes", 0, 64, None, key="screen.workers", placeholder="auto",
                              help=f"Empty: {screening.default_workers()} on this machine, none for fewer than "
                                   f"{screening.POOL_MIN_PHOTOS} photos. 0 decodes in the dashboard's own process.")
    tta = o3.toggle("TTA", key="screen.tta", help="Average over flips and ±10° rotations (4x the work).")
    gate = o4.toggle("Quality gate", True, key="screen.gate",
                     help="Photos that are not a fundus are not graded; ungradable ones are, with the reason.")


def show_table(result_photos, patients, key: str, report) -> None:
    """The patient table, filtered by status, and every photo's row; both downloadable in full."""
    shown = st.multiselect("Show patients whose status is", STATUSES, default=list(STATUSES), key=f"{key}.status")
    st.dataframe(patients[patients["status"].isin(shown)], hide_index=True, key=f"{key}.patients",
                 column_config={"worst_grade": "worst grade", "ungraded": "photos not graded or ungradable"})
    names = screen_report.report_paths(report)
    st.download_button("Download the patients (CSV)", screen_report.table_csv(patients), file_name=names[1].name,
                       mime="text/csv", icon=":material/download:", key=f"{key}.download_patients")
    st.subheader("Photos")
    st.dataframe(result_photos.dropna(axis=1, how="all"), hide_index=True, key=f"{key}.photos",
                 column_config={f"p{g}": st.column_config.NumberColumn(f"P(grade {g})", format="percent")
                                for g in range(5)})
    st.download_button("Download the photos (CSV)", screen_report.table_csv(result_photos), file_name=names[0].name,
                       mime="text/csv", icon=":material/download:", key=f"{key}.download_photos")


def stopped(job: dict) -> None:
    """What a stopped screen's report holds so far; Start resumes it."""
    st.warning(f"Stopped: the photos graded so far are in {md_text(job['report'])}. Press Start with the same "
               "folder and report to continue where it stopped.", icon=":material/stop_circle:")
    try:
        table = screen_report.read_report(job["report"])
    except (screen_report.ScreenError, OSError, ValueError):
        return  # stopped before the report's first line
    patients = screen_report.patient_table(table)
    st.caption(f"{len(table):,} photos in the report so far, {len(patients):,} patients (the screen is not "
               "finished: patients whose other eye is not yet graded may be missing).")
    show_table(table, patients, "screen.partial", job["report"])


def start(job: dict, max_files) -> None:
    """Run one screen here, with a Stop button and a progress bar; the result (or the refusal) into the session."""
    st.session_state["screen.job"] = job
    st.button("Stop", key="screen.stop", icon=":material/stop:",
              help="Stops after the batch being graded; the report keeps every photo graded so far.")
    bar = st.progress(0.0, text="Finding photographs…")

    def moved(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{done:,} of {total:,} photos graded ({done / max(total, 1):.0%})")

    try:
        st.session_state["screen.result"] = screening.screen(
            run.path, job["folder"], job["report"], batch_size=int(batch_size), tta=tta,
            workers=None if workers is None else int(workers), quality_gate=gate, on_progress=moved,
            max_files=max_files)
        bar.progress(1.0, text="Done")
    except screen_paths.TooManyPhotos as e:
        bar.empty()
        st.session_state["screen.too_many"] = (job["folder"], str(e))
    except (screen_report.ScreenError, runs.RunError, OSError) as e:
        bar.empty()
        st.error(md_text(e), icon=":material/error:")
    st.session_state.pop("screen.job", None)


job = st.session_state.pop("screen.job", None)
if job is not None:  # a screen's run ended without finishing: Stop, another click, or a closed tab
    stopped(job)
go = st.button("Start", type="primary", key="screen.start", icon=":material/play_arrow:", disabled=not folder.strip())
many = st.session_state.get("screen.too_many")
confirm = False
if many is not None and many[0] == folder.strip():
    st.warning(md_text(many[1]), icon=":material/warning:")
    confirm = st.button("Screen all of them", key="screen.confirm", icon=":material/done_all:")
if go or confirm:
    st.session_state.pop("screen.result", None)
    st.session_state.pop("screen.too_many", None)
    try:
        folder_path = admission.user_path(folder.strip(), "Folder")
        report = admission.user_path(out.strip(), "Report file") if out.strip() else \
            screen_paths.default_report(folder_path, run.path)
    except runs.RunError as e:
        st.error(md_text(e), icon=":material/error:")
    else:
        start({"folder": str(folder_path), "report": str(report)}, None if confirm else screen_paths.MAX_FILES)
        if "screen.too_many" in st.session_state:
            st.rerun()  # show the question in place of the progress bar

result = st.session_state.get("screen.result")
if result is None:
    st.stop()
s = result.summary()
st.subheader("Patients")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Patients", f"{s['patients']:,}")
m2.metric("To refer", f"{s['patients_to_refer']:,}",
          help=f"{s['referable_patients']:,} referable, {s['ungraded_patients']:,} refer: ungraded eye")
m3.metric("Photos graded", f"{s['graded']:,}", help=f"{s['ungradable']:,} of them ungradable: see their reasons")
m4.metric("Not graded", f"{s['errors']:,}", help=f"unreadable files, and {s['not_fundus']:,} not a fundus")
st.markdown(f"**{s['referable_patients']:,} referable, {s['ungraded_patients']:,} refer: ungraded eye** "
            f"(an eye that was not graded, or was graded from an ungradable photo, is never passed), "
            f"{s['patients'] - s['patients_to_refer']:,} no referral.")
st.caption(f"Referable when {md_text(s['threshold_source'])}. {s['skipped']:,} photos were already in the report. "
           f"Report: {md_text(s['report'])}")
show_table(result.photos, result.patients, "screen", result.report)
