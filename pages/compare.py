"""Compare: pick runs, then overlay their curves, confusion matrices, best-epoch metrics and configs.

Every number comes from ``retino.compare`` (pure pandas) and every figure from ``retino.charts``;
metrics are read once per (run, metrics stamp), so 50 runs on disk stay quick (bench/compare_page.py).
"""
import streamlit as st

from retino import charts, compare, dashboard, runs

PERCENT = {"accuracy", "macro_f1", "balanced_acc", "sens_at_90spec", "majority_acc", "acc_over_majority"}
HEADINGS = {"run": "run", "best_epoch": "best epoch", "epochs": "epochs", "accuracy": "accuracy", "qwk": "QWK",
            "macro_f1": "macro-F1", "balanced_acc": "bal. acc.", "ref_auc": "ref. AUC",
            "sens_at_90spec": "sens@90%spec", "majority_acc": "majority", "acc_over_majority": "acc − majority"}


@st.cache_data(show_spinner=False, max_entries=2000)
def read_metrics(path: str, stamp: tuple) -> list[dict]:
    """A run's metrics, re-read only when their stamp (mtime, size) changes."""
    return runs.read_metrics(path)


def metrics_of(path) -> list[dict]:
    stamp = dashboard.metrics_stamp(path)
    return read_metrics(str(path), stamp) if stamp else []  # no epoch yet, or the folder vanished


def number_columns(columns) -> dict:
    return {c: st.column_config.NumberColumn(HEADINGS.get(c, c), format="percent" if c in PERCENT else "%.3f")
            for c in columns if c in HEADINGS and c not in ("run", "best_epoch", "epochs")}


def load_records() -> list[dict]:
    """Every run as compare's plain mapping (label, id, state, config, rows, ...), newest first."""
    infos = runs.list_runs()
    labels = compare.run_labels([r.name for r in infos], [r.id for r in infos],
                                [r.config.get("train", {}) for r in infos])
    return [{"label": label, "name": "" if r.name == r.id else r.name, "id": r.id, "state": r.state,
             "config": r.config.get("train", {}), "tags": r.tags, "created": r.created, "path": r.path,
             "problems": r.problems, "rows": metrics_of(r.path)}
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
                       "best_qwk": st.column_config.NumberColumn("best QWK", format="%.3f"),
                       "best_acc": st.column_config.NumberColumn("best accuracy", format="percent"),
                       "image_size": st.column_config.NumberColumn("image px"),
                       "created": st.column_config.DatetimeColumn("created", format="MMM D, HH:mm")},
        column_order=["run", "id", *(c for c in shown.columns if c not in ("run", "id", "loss"))])
    st.session_state["compare.selected"] = [shown["id"][i] for i in event.selection.rows if i < len(shown)]
    chosen = [r for r in records if r["id"] in set(st.session_state["compare.selected"])]
    st.caption(f"{len(shown)} of {len(table)} runs shown, newest first; {len(chosen)} selected. "
               "Click rows to choose which runs to compare.")
    return chosen


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
    left.plotly_chart(charts.curves(frame, ["train_acc", "test_acc"], title="accuracy (train dashed, test solid)",
                                    yaxis="accuracy", percent=True, colours=colours), key="compare.acc")
    right.plotly_chart(charts.curves(frame, ["train_loss", "test_loss"], title="loss (train dashed, test solid)",
                                     yaxis="loss", colours=colours, log_y="auto"), key="compare.loss")
    left.plotly_chart(charts.curves(frame, ["test_qwk"], title="test QWK", yaxis="QWK", colours=colours),
                      key="compare.qwk")
    right.plotly_chart(charts.curves(frame, ["test_macro_f1"], title="test macro-F1", yaxis="macro-F1",
                                     colours=colours), key="compare.f1")


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
    groups = compare.seed_groups(chosen)
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


def manage(chosen: list[dict]) -> None:
    """Rename, tag or delete one of the chosen runs (delete asks first)."""
    st.subheader("Rename, tag or delete")
    by_id = {r["id"]: r for r in chosen}
    target = by_id[st.selectbox("Run", list(by_id), key="compare.manage",
                                format_func=lambda i: f"{by_id[i]['label']} · {i}")]
    with st.form("compare.meta", border=False):
        c1, c2 = st.columns(2)
        name = c1.text_input("Name", value=target["name"], placeholder=target["label"], key="compare.name")
        tags = c2.text_input("Tags (comma separated)", value=", ".join(target["tags"]), key="compare.tags")
        if st.form_submit_button("Save", icon=":material/save:", key="compare.save"):
            try:
                runs.set_meta(target["path"], name=name, tags=tags.split(","))
                st.rerun()
            except OSError as e:
                st.error(f"{target['id']}: could not save ({e})")
    if st.session_state.get("compare.confirm") != target["id"]:
        if st.button("Delete run…", icon=":material/delete:", key="compare.ask_delete"):
            st.session_state["compare.confirm"] = target["id"]
            st.rerun()
        return
    st.warning(f"Delete **{target['label']}** (`{target['path']}`) with its checkpoints? This cannot be undone.")
    yes, no = st.columns([1, 6])
    if yes.button("Delete", type="primary", key="compare.delete"):
        try:
            runs.delete_run(target["path"])
            st.session_state.pop("compare.confirm")
            st.rerun()
        except (runs.RunError, OSError) as e:
            st.error(str(e))
    if no.button("Cancel", key="compare.cancel"):
        st.session_state.pop("compare.confirm")
        st.rerun()


def page() -> None:
    st.title("Compare runs")
    records = load_records()
    if not records:
        st.info("No runs yet: start one on the Train page. Runs are read from "
                f"`{runs.runs_root().resolve()}`.", icon=":material/info:")
        st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
        return
    chosen = pick_runs(records)
    if not chosen:
        st.info("Select one or more runs in the table.", icon=":material/touch_app:")
        return
    for r in chosen:
        for problem in r["problems"]:
            st.warning(f"{r['label']}: {problem}", icon=":material/warning:")
        if not r["rows"]:
            st.caption(f"{r['label']} has no finished epoch yet.")
    with_rows = [r for r in chosen if r["rows"]]
    best_epochs(chosen)
    if with_rows:
        curves(with_rows, charts.run_colours([r["label"] for r in chosen]))
        confusion(with_rows)
    seeds_and_settings(chosen)
    manage(chosen)


page()
