"""Compare: pick runs, then their test figures with intervals, B vs A, ROC and reliability, curves,
confusion matrices, the photos a run gets most wrong, and configs.

Every number comes from ``retino.evaluation.compare`` (pure pandas) and every figure from ``retino.dashboard.charts``;
metrics and evaluations are read once per (run, file stamps), so 50 runs on disk stay quick
(bench/compare_page.py). Nothing here runs a model unless the user asks (evaluate once, Grad-CAM).
"""
from functools import partial

import streamlit as st

from retino import paths
from retino.dashboard import charts, runs_view as dashboard, downloads
from retino.evaluation import compare, evaluate
from retino.inference import explain
from retino import runs
from retino.data import DatasetError, ImageError
from retino.grades import grade_label
from retino.inference.trained import load_trained
from retino.dashboard.text import md_text
from retino.evaluation import results

PERCENT = {"accuracy", "macro_f1", "balanced_acc", "sens_at_90spec", "majority_acc", "acc_over_majority"}
HEADINGS = {"run": "run", "best_epoch": "best epoch", "epochs": "epochs", "accuracy": "accuracy", "qwk": "QWK",
            "macro_f1": "macro-F1", "balanced_acc": "bal. acc.", "ref_auc": "ref. AUC (uncalibrated)",
            "sens_at_90spec": "sens@90%spec", "majority_acc": "majority", "acc_over_majority": "acc − majority"}


@st.cache_data(show_spinner=False, max_entries=2000)
def read_metrics(path: str, stamp: tuple) -> list[dict]:
    """A run's metrics, re-read only when their stamp (mtime, size) changes."""
    return runs.read_metrics(path)


def metrics_of(path) -> list[dict]:
    stamp = dashboard.metrics_stamp(path)
    return read_metrics(str(path), stamp) if stamp else []  # no epoch yet, or the folder vanished


@st.cache_data(show_spinner=False, max_entries=500)
def test_report(path: str, stamp: tuple) -> dict | None:
    """A run's test report (test.json, or from its saved predictions), re-read when a file changes."""
    return dashboard.read_test_report(path)


@st.cache_data(show_spinner=False, max_entries=64)
def saved_evaluation(path: str, stamp: tuple):
    """(predictions.csv, evaluation.json) of a run, or None before it is evaluated."""
    return dashboard.read_evaluation(path)


@st.cache_data(show_spinner=False, max_entries=64)
def versus(path_a: str, path_b: str, stamps: tuple) -> dict:
    """B minus A with paired intervals (raises RunError when their test images differ: not cached)."""
    return evaluate.compare_runs(path_a, path_b)


@st.cache_data(show_spinner=False, max_entries=16)
def test_files(path: str, stamp: tuple, config: dict) -> dict:
    return dashboard.image_files(config)


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def trained_model(path: str, stamp: tuple):
    return load_trained(path)


@st.cache_data(max_entries=64, show_spinner=False)
def cam_overlay(_trained, run_key: tuple, file: str):
    """Grad-CAM of the run's predicted grade (against grade 0) over what the model saw."""
    return explain.explain(_trained, file).overlay


def number_columns(columns) -> dict:
    return {c: st.column_config.NumberColumn(HEADINGS.get(c, c), format="percent" if c in PERCENT else "%.3f")
            for c in columns if c in HEADINGS and c not in ("run", "best_epoch", "epochs")}


def load_records() -> list[dict]:
    """Every run as compare's plain mapping (label, id, state, config, rows, ...), newest first."""
    infos = runs.list_runs()
    labels = compare.run_labels([r.name for r in infos], [r.id for r in infos],
                                [r.config.get("train", {}) for r in infos])
    rows = {r.id: metrics_of(r.path) for r in infos}
    notes = {r.id: dashboard.provisional_note(r, rows[r.id]) for r in infos}  # None once completed
    return [{"label": f"{label} (provisional)" if notes[r.id] else label, "name": "" if r.name == r.id else r.name,
             "id": r.id, "state": r.state, "note": notes[r.id],
             "config": r.config.get("train", {}), "tags": r.tags, "created": r.created, "path": r.path,
             "problems": r.problems, "rows": rows[r.id], "dataset": results.dataset_label(r.config),
             "code": r.config.get("code"), "data_fingerprint": r.config.get("data_fingerprint"),
             "full_config": r.config}
            for r, label in zip(infos, labels)]


def pick_runs(records: list[dict]) -> list[dict]:
    """The filters and the run table; the selection is kept as run ids (rows move when runs come and go)."""
    table = compare.run_table(records)
    f1, f2, f3, f4 = st.columns(4)
    states = f1.multiselect("State", sorted(table["state"].unique()), placeholder="any state")
    archs = f2.multiselect("Architecture", sorted(table["arch"].dropna().unique()), placeholder="any architecture")
    pretrained = f3.multiselect("Pretrained", [True, False], format_func=lambda v: "pretrained" if v else "scratch",
                                placeholder="either")
    text = f4.text_input("Name or tag contains", placeholder="e.g. lab")
    shown = compare.filter_runs(table, states=states, archs=archs, pretrained=pretrained, text=text)
    if "compare.selected" not in st.session_state:  # first visit: the newest runs that have an epoch
        st.session_state["compare.selected"] = [r["id"] for r in records if r["rows"]][:3]
    wanted = set(st.session_state["compare.selected"])
    event = st.dataframe(
        shown.drop(columns=["loss"]), key=f"compare.table.{hash(tuple(shown['id']))}", hide_index=True,
        on_select="rerun", selection_mode="multi-row", height=min(38 + 35 * len(shown), 300),
        selection_default={"selection": {"rows": [i for i, rid in enumerate(shown["id"]) if rid in wanted]}},
        column_config={"id": st.column_config.TextColumn("run id", help="the run's folder: unique where names collide"),
                       "best_qwk": st.column_config.NumberColumn(
                           "best val QWK", format="%.3f",
                           help="val QWK at the chosen epoch (test QWK for runs made before the val split)"),
                       "best_acc": st.column_config.NumberColumn("test accuracy", format="percent",
                                                                 help="test accuracy at the chosen epoch"),
                       "image_size": st.column_config.NumberColumn("image px"),
                       "created": st.column_config.DatetimeColumn("created", format="MMM D, HH:mm")},
        column_order=["run", "id", *(c for c in shown.columns if c not in ("run", "id", "loss"))])
    st.session_state["compare.selected"] = [shown["id"][i] for i in event.selection.rows if i < len(shown)]
    chosen = [r for r in records if r["id"] in set(st.session_state["compare.selected"])]
    st.caption(f"{len(shown)} of {len(table)} runs shown, newest first; {len(chosen)} selected. "
               "Click rows to choose which runs to compare.")
    return chosen


def test_results(chosen: list[dict]) -> dict:
    """The test-results table (intervals, best marked), evaluate-once buttons, and the mismatch warnings.

    Returns run id -> (predictions table, choices) for the runs evaluated so far.
    """
    st.subheader("On the test split, everything chosen on val")
    reports, evaluated = {}, {}
    for r in chosen:
        if r["state"] not in dashboard.PREDICTABLE:  # a live or failed run's folder holds no final evaluation
            continue
        stamp = dashboard.evaluation_stamp(r["path"])
        try:
            reports[r["id"]] = test_report(str(r["path"]), stamp)
            saved = saved_evaluation(str(r["path"]), stamp)
        except runs.RunError as e:
            st.warning(md_text(f"{r['label']}: {e}"), icon=":material/warning:")
            continue
        if saved is not None:
            evaluated[r["id"]] = saved
    table = results.test_results_table([{**r, "report": reports.get(r["id"])} for r in chosen])
    st.table(table.style.map(lambda v: "font-weight: bold" if str(v).endswith(results.BEST_MARK) else ""))
    st.caption(f"95% patient-level bootstrap intervals (both eyes resampled together). {results.BEST_MARK.strip()} "
               "best point value among the selected runs (lowest ECE); overlapping intervals mean the gap may be "
               "noise: B vs A below says. Sensitivity and specificity of referable DR (grade ≥ 2) at each run's "
               "threshold, chosen on val for its target sensitivity.")
    for r in chosen:
        note = dashboard.calibration_note((reports.get(r["id"]) or {}).get("calibration"))
        if note:
            st.caption(f":orange[{r['label']}: {note}.]")
    for r in chosen:  # a live run is evaluated by its trainer when it completes
        if (reports.get(r["id"]) is None and r["id"] not in evaluated and r["state"] in dashboard.PREDICTABLE
                and dashboard.checkpoint_stamp(r["path"])):
            c1, c2 = st.columns([3, 1])
            why = ("was made before runs kept their test predictions" if runs.selected_on(r["rows"]) == "test"
                   else "has no test evaluation")
            c1.caption(f"{md_text(r['label'])} {why}: evaluate its best checkpoint on its test split once (its temperature "
                       "and operating point are then chosen on test, and marked so).")
            if c2.button("Evaluate once", key=f"compare.evaluate.{r['id']}", icon=":material/fact_check:"):
                try:
                    with st.spinner(f"Evaluating {md_text(r['label'])} on its test split…"):
                        dashboard.evaluate_once(r["path"])
                    st.rerun()
                except (runs.RunError, DatasetError, OSError) as e:
                    st.error(md_text(f"{r['label']}: {e}"))
    labels = {r["id"]: md_text(r["label"]) for r in chosen}  # names are text; the sentences around them are ours
    mismatch = results.test_set_mismatch({labels[i]: t for i, (t, _) in evaluated.items()})
    for warning in ([mismatch] if mismatch else []) + results.provenance_differences(
            [{**r, "label": labels[r["id"]]} for r in chosen]):
        st.warning(warning, icon=":material/warning:")
    return evaluated


def b_vs_a(chosen: list[dict], evaluated: dict) -> None:
    """Any two selected runs: B minus A on the same test images, paired by patient."""
    st.subheader("B vs A")
    by_id = {r["id"]: r for r in chosen}
    ids = list(by_id)
    c1, c2 = st.columns(2)
    name = lambda i: by_id[i]["label"]  # noqa: E731  (labels are unique; the folder would cut the text off)
    a = c1.selectbox("A", ids, index=min(1, len(ids) - 1), key="compare.a", format_func=name)
    b = c2.selectbox("B", ids, index=0, key="compare.b", format_func=name)
    if a == b:
        st.info("Pick two different runs as A and B.", icon=":material/compare_arrows:")
        return
    missing = [by_id[i]["label"] for i in (a, b) if i not in evaluated]
    if missing:
        unfinished = [f"{md_text(by_id[i]['label'])}: {by_id[i]['note']}" for i in (a, b)
                      if by_id[i]["state"] not in dashboard.PREDICTABLE]
        st.info(f"Not compared: {'; '.join(unfinished)}. B vs A compares finished runs." if unfinished else
                f"Not evaluated yet: {md_text(', '.join(missing))} (see above).", icon=":material/info:")
        return
    try:
        result = versus(str(by_id[a]["path"]), str(by_id[b]["path"]),
                        (dashboard.evaluation_stamp(by_id[a]["path"]), dashboard.evaluation_stamp(by_id[b]["path"])))
    except (runs.RunError, ValueError) as e:
        st.warning(f"A and B cannot be compared: {md_text(e)}", icon=":material/block:")
        return
    st.markdown(results.versus_sentence(result))
    st.table(results.versus_table(result))
    st.caption("B − A on the same test images; the interval and p(B better) come from resampling patients, "
               "the same ones for both runs in every resample, so what the two share cancels out.")


def roc_and_calibration(chosen: list[dict], evaluated: dict, colours: dict) -> None:
    """ROC curves with each run's operating point; reliability diagrams side by side."""
    if not evaluated:
        return
    st.subheader("Referable DR and calibration (test split)")
    tables = {r["label"]: evaluated[r["id"]] for r in chosen if r["id"] in evaluated}
    rocs = {label: results.roc(t, c) for label, (t, c) in tables.items()}
    for label, r in rocs.items():
        if "error" in r:
            st.caption(f"{md_text(label)}: {md_text(r['error'])}.")
    left, right = st.columns(2)
    left.plotly_chart(charts.roc_curves(rocs, colours=colours), key="results.roc")
    right.markdown("**Operating points** (◆): each run's threshold on P(grade ≥ 2), fixed on val for its target "
                   "sensitivity, applied once to test.")
    for label, r in rocs.items():
        if "error" not in r:
            where = f"chosen on {r['chosen_on']}" if r["chosen_on"] else "none could be chosen: 0.5"
            right.caption(f"{md_text(label)}: threshold {r['threshold']:.3f} ({where}) → sensitivity {r['sensitivity']:.1%}, "
                          f"specificity {r['specificity']:.1%}; AUC {r['auc']:.3f}")
    diagrams = {label: results.reliability(t, c) for label, (t, c) in tables.items()}
    diagrams = {k: d for k, d in diagrams.items() if d is not None}
    if diagrams:
        st.plotly_chart(charts.reliability_diagrams(diagrams, colours=colours), key="results.reliability")
        st.caption("A calibrated model's points lie on the diagonal: of the photos it gives 80% confidence, 80% "
                   "are right. Solid: after the temperature fitted on val (what Predict shows); dashed: before.")


def gallery(chosen: list[dict], evaluated: dict) -> None:
    """One run's most-wrong test photos with their Grad-CAM, computed only when asked for."""
    by_id = {r["id"]: r for r in chosen if r["id"] in evaluated}
    if not by_id:
        return
    with st.expander("The test photos a run gets most wrong, with Grad-CAM", icon=":material/image_search:"):
        st.caption("Largest distance between the label and the predicted grade, then the lowest probability of the "
                   "true grade: where label noise and failure modes show.")
        c1, c2 = st.columns([3, 2])
        rid = c1.selectbox("Run", list(by_id), key="compare.gallery_run",
                           format_func=lambda i: by_id[i]["label"])
        if not c2.toggle("Show the photos (runs the model)", key="compare.gallery"):
            return
        run = by_id[rid]
        worst = results.worst_predictions(evaluated[rid][0], n=8)
        if worst.empty:
            st.success("This run grades every test photo right.")
            return
        stamp = dashboard.checkpoint_stamp(run["path"])
        try:
            files = test_files(str(run["path"]), stamp, run["full_config"])
            trained = trained_model(str(run["path"]), stamp)
        except (DatasetError, runs.RunError) as e:
            st.error(md_text(f"{run['label']}: {e}"))
            return
        cols = st.columns(4)
        with st.spinner("Grad-CAM of each photo…"):
            for i, w in worst.iterrows():
                p = f", P(true) {w['p_true']:.0%}" if w["p_true"] == w["p_true"] else ""
                caption = f"{w['image']}: true {grade_label(w['label'])}, predicted {grade_label(w['grade'])}{p}"
                try:
                    cols[i % 4].image(cam_overlay(trained, (str(run["path"]), stamp), files[w["image"]]),
                                      caption=caption, width="stretch")
                except (KeyError, ImageError) as e:
                    cols[i % 4].caption(f"{caption}: no photo ({e})")
        st.caption(f"Maps of the predicted grade against grade 0, at {explain.map_cells(trained.config.image_size)}"
                   f" cells a side (the image size / {explain.MAP_STRIDE}).")


def best_epochs(chosen: list[dict]) -> None:
    st.subheader("At each run's best epoch (highest validation QWK; test QWK for runs without validation)")
    best = compare.best_epoch_table(chosen)
    st.dataframe(best, hide_index=True, column_config={
        "best_epoch": st.column_config.NumberColumn("best epoch"), **number_columns(best.columns)})
    majority = best["majority_acc"].dropna()
    if len(majority):
        st.caption(f"Majority baseline: always predicting the test split's most common grade scores "
                   f"{100 * majority.min():.1f}%" + (f"–{100 * majority.max():.1f}%" if majority.nunique() > 1 else "")
                   + " accuracy with QWK 0; accuracy alone says little on DR data.")
    st.download_button("Download CSV", best.to_csv(index=False), file_name="retino-best-epochs.csv",
                       mime="text/csv", icon=":material/download:")


def curves(with_rows: list[dict], colours: dict) -> None:
    st.subheader("Curves")
    frame = compare.curves_frame(with_rows)
    left, right = st.columns(2)
    left.plotly_chart(charts.curves(frame, ["train_acc", "val_acc", "test_acc"], yaxis="accuracy", percent=True,
                                    title="accuracy (train dashed, val dotted, test solid)", colours=colours),
                      key="compare.acc")
    right.plotly_chart(charts.curves(frame, ["train_loss", "val_loss", "test_loss"], yaxis="loss", log_y="auto",
                                     title="loss (train dashed, val dotted, test solid)", colours=colours),
                       key="compare.loss")
    left.plotly_chart(charts.curves(frame, ["val_qwk", "test_qwk"], title="QWK (val dotted, test solid)",
                                    yaxis="QWK", colours=colours), key="compare.qwk")
    right.plotly_chart(charts.curves(frame, ["val_macro_f1", "test_macro_f1"], yaxis="macro-F1",
                                     title="macro-F1 (val dotted, test solid)", colours=colours), key="compare.f1")
    st.caption("Test is drawn where the run recorded it each epoch; nothing on it chose an epoch or a threshold.")


def confusion(with_rows: list[dict]) -> None:
    st.subheader("Confusion matrices")
    c1, c2 = st.columns(2)
    which = c1.segmented_control("Epoch", ["best", "last"], default="best", key="compare.epoch") or "best"
    unit = c2.segmented_control("Values", ["counts", "row-normalised"], default="counts",
                                key="compare.unit") or "counts"
    matrices = {r["label"]: compare.confusion_at(r["rows"], which, normalize=unit != "counts") for r in with_rows}
    matrices = {k: m for k, m in matrices.items() if m is not None}
    if matrices:
        n = min(len(matrices), 3)  # one or two matrices would otherwise stretch across the page
        slot = st.columns([n + 1, 3 - n])[0] if n < 3 else st.container()
        slot.plotly_chart(charts.confusion_matrices(matrices, normalized=unit != "counts"), key="compare.confusion")
        st.caption("Rows: true grade; columns: predicted grade; one colour scale for all runs.")


def seeds_and_settings(chosen: list[dict]) -> None:
    st.subheader("Seeds")
    finished = [r for r in chosen if not r["note"]]
    left_out = [r["label"] for r in chosen if r["note"]]
    if left_out:
        st.caption(f"Left out of the seed averages, not finished: {', '.join(left_out)}.")
    groups = compare.seed_groups(finished)
    if groups.empty:
        st.caption("No selected runs differ only by seed. Select runs with the same settings and different seeds "
                   "to see mean ± std of their best-epoch metrics.")
    else:
        st.dataframe(compare.mean_std_text(groups), hide_index=True,
                     column_config={k: v for k, v in HEADINGS.items() if k in compare.TABLE_METRICS})
    st.subheader("Settings")
    diff_only = st.toggle("Differences only", value=True, key="compare.diff_only")
    diff = compare.config_diff(chosen, diff_only=diff_only and len(chosen) > 1)
    if diff.empty:
        st.caption("The selected runs have identical settings.")
    else:
        st.dataframe(diff)


def download_panel(chosen: list[dict]) -> None:
    """The report of the selected runs, and one run's model (ONNX, TorchScript) or files (zip), built on click."""
    st.subheader("Download")
    st.download_button("Download report", partial(downloads.report_html, [str(r["path"]) for r in chosen]),
                       file_name="retino-report.html", mime="text/html", on_click="ignore",
                       icon=":material/description:", key="compare.download_report")
    st.caption("One HTML file holding this page's figures, the data set, each run's config and Grad-CAM of the "
               "worst test photos; it opens with no network (`python -m retino report RUN ... --out FILE`).")
    by_id = {r["id"]: r for r in chosen}
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    rid = c1.selectbox("Run", list(by_id), key="compare.download_run",
                       format_func=lambda i: f"{by_id[i]['label']} · {i}")
    path, has_model = str(by_id[rid]["path"]), dashboard.checkpoint_stamp(by_id[rid]["path"]) is not None
    for col, fmt, label in ((c2, "onnx", "ONNX model"), (c3, "torchscript", "TorchScript model")):
        col.download_button(label, partial(downloads.exported_model, path, fmt), on_click="ignore",
                            file_name=downloads.export_file_name(rid, fmt), mime="application/octet-stream",
                            disabled=not has_model, icon=":material/download:", key=f"compare.download_{fmt}")
    c4.download_button("Run files (zip)", partial(downloads.run_zip, path), file_name=f"{runs.safe_name(rid)}.zip",
                       mime="application/zip", on_click="ignore", icon=":material/folder_zip:",
                       key="compare.download_zip")
    if not has_model:
        st.caption("This run has no best.pt yet: there is no model to export.")


def manage(chosen: list[dict]) -> None:
    """Rename, tag or delete one of the chosen runs (delete asks first)."""
    st.subheader("Rename, tag or delete")
    by_id = {r["id"]: r for r in chosen}
    target = by_id[st.selectbox("Run", list(by_id), key="compare.manage",
                                format_func=lambda i: by_id[i]["label"])]
    with st.form("compare.meta", border=False):
        c1, c2 = st.columns(2)
        name = c1.text_input("Name", value=target["name"], placeholder=target["label"], key="compare.name")
        tags = c2.text_input("Tags (comma separated)", value=", ".join(target["tags"]), key="compare.tags")
        if st.form_submit_button("Save", icon=":material/save:", key="compare.save"):
            try:
                runs.set_meta(target["path"], name=name, tags=tags.split(","))
                st.rerun()
            except OSError as e:
                st.error(md_text(f"{target['id']}: could not save ({e})"))
    if st.session_state.get("compare.confirm") != target["id"]:
        if st.button("Delete run…", icon=":material/delete:", key="compare.ask_delete"):
            st.session_state["compare.confirm"] = target["id"]
            st.rerun()
        return
    st.warning(f"Delete **{md_text(target['label'])}** ({md_text(target['path'])}) with its checkpoints? This cannot be undone.")
    yes, no = st.columns([1, 6])
    if yes.button("Delete", type="primary", key="compare.delete"):
        try:
            runs.delete_run(target["path"])
            st.session_state.pop("compare.confirm")
            st.rerun()
        except (runs.RunError, OSError) as e:
            st.error(md_text(e))
    if no.button("Cancel", key="compare.cancel"):
        st.session_state.pop("compare.confirm")
        st.rerun()


def page() -> None:
    st.title("Compare runs")
    records = load_records()
    if not records:
        st.info("No runs yet: start one on the Train page. Runs are read from "
                f"`{paths.runs_root().resolve()}`.", icon=":material/info:")
        st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
        return
    chosen = pick_runs(records)
    if not chosen:
        st.info("Select one or more runs in the table.", icon=":material/touch_app:")
        return
    for r in chosen:
        if r["note"]:
            later = "" if r["state"] in dashboard.PREDICTABLE else "; it is evaluated on test when it completes"
            st.warning(f"{r['label']}: {r['note']}. Its figures below are its best epoch so far{later}.",
                       icon=":material/hourglass_top:")
        for problem in r["problems"]:
            st.warning(md_text(f"{r['label']}: {problem}"), icon=":material/warning:")
        if not r["rows"]:
            st.caption(f"{md_text(r['label'])} has no finished epoch yet.")
    with_rows = [r for r in chosen if r["rows"]]
    colours = charts.run_colours([r["label"] for r in chosen])
    evaluated = test_results(chosen)
    if len(chosen) > 1:
        b_vs_a(chosen, evaluated)
    roc_and_calibration(chosen, evaluated, colours)
    best_epochs(chosen)
    if with_rows:
        curves(with_rows, colours)
        confusion(with_rows)
    gallery(chosen, evaluated)
    seeds_and_settings(chosen)
    download_panel(chosen)
    manage(chosen)


page()
