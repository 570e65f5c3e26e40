"""Train: a sidebar form built from TrainConfig, launched as background jobs, monitored live.

Each run is its own ``python -m retino train`` process (``retino.dashboard.jobs``); this page only writes a
config, starts it, and reads run folders back every 2 seconds (a fragment with ``run_every=2``).
Presets are ``retino.config.PRESETS``; what a run needs before it starts comes from ``retino.dashboard.plan``.
"""
import dataclasses
import time
from pathlib import Path

import streamlit as st

from retino.dashboard import charts, runs_view as dashboard, jobs, plan, settings
from retino.evaluation import compare
from retino import runs
from retino.config import PRESETS, ConfigError, TrainConfig, expand_preset, preset_base
from retino.data import DatasetError, read_dataset
from retino.models import list_models, weights_available
from retino.dashboard.text import md_text

MAIN = ("arch", "pretrained", "head", "loss", "class_weights", "sampler", "augment", "epochs", "batch_size",
        "image_size", "ben_graham", "optimizer", "lr", "weight_decay", "device", "seed", "name")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "data"}  # data: the sidebar's choice
SMALL_FLOATS = {"lr": 1e-4, "weight_decay": 1e-5, "momentum": 0.05, "warmup_epochs": 0.5}  # widget steps
WITHOUT_WEIGHTS = {"scratch": "Start the runs that need no ImageNet weights", "none": "Start nothing"}


@st.cache_data(show_spinner=False, max_entries=8)
def split_sizes(path: str, fingerprint: tuple) -> dict:
    return read_dataset(path).describe()["sizes"]


# Ten minutes: long enough not to re-time on every rerun of the form, short enough to follow the machine's load.
@st.cache_data(show_spinner="Timing a few training steps on this machine...", ttl=600, max_entries=16)
def probe_rate(arch: str, image_size: int) -> float:
    return plan.probe_images_per_s(arch, image_size)


def apply_preset() -> None:
    """Fill the form's widgets with the chosen preset (its first run's values where runs differ)."""
    name = st.session_state["train.preset"]
    values = dataclasses.replace(preset_base(name), **PRESETS[name].runs[0]).to_dict()
    for field in FIELDS:
        st.session_state[f"cfg.{field}"] = values[field]


def field_widget(name: str, disabled: bool = False) -> None:
    """One widget for a TrainConfig field, typed and explained by the field's own metadata."""
    f, key = FIELDS[name], f"cfg.{name}"
    label, help_text, choices = name.replace("_", " "), f.metadata.get("help"), f.metadata.get("choices")
    if choices:
        st.selectbox(label, choices, key=key, help=help_text, disabled=disabled)
    elif f.type in ("bool", bool):
        st.checkbox(label, key=key, help=help_text, disabled=disabled)
    elif f.type in ("int", int):  # no min_value: an out-of-range value gets validate()'s message instead
        st.number_input(label, step=1, key=key, help=help_text, disabled=disabled)
    elif f.type in ("float", float):
        st.number_input(label, step=SMALL_FLOATS.get(name, 0.1), format="%g", key=key, help=help_text,
                        disabled=disabled)
    else:
        st.text_input(label, key=key, help=help_text, disabled=disabled)


def weights_note() -> None:
    """Which ImageNet checkpoints are on disk, and where a missing one goes (checked before Start)."""
    lines, missing = [], False
    for arch in list_models():
        ok, path = weights_available(arch)
        missing |= not ok
        where = path.replace(str(Path.home()), "~", 1)
        lines.append(f":green[{arch}: available offline]" if ok
                     else f":orange[{arch}: not offline], place it at `{where}`")
    hint = "  \nor give a file as **weights** under Advanced." if missing else ""
    st.caption("ImageNet weights:  \n" + "  \n".join(lines) + hint)


def configs_from_form(data: str) -> list[TrainConfig]:
    """The runs the form describes: one per preset run, each validated (ConfigError on a bad value)."""
    values = {name: st.session_state[f"cfg.{name}"] for name in FIELDS}
    return expand_preset(st.session_state["train.preset"], TrainConfig.from_dict({**values, "data": data}))


def missing_weights_text(missing: dict) -> str:
    where = "; ".join(f"{arch}: `{path.replace(str(Path.home()), '~', 1)}`" for arch, path in missing.items())
    return (f"The ImageNet weights for {', '.join(missing)} are not on disk, so the pretrained runs would fail "
            f"seconds after starting. Download them on a machine with internet and place them at {where}.")


def before_start(data_path: Path) -> int | None:
    """What the form's runs need that is not there, and how long they take on this CPU: said before Start.

    Returns how many runs Start would launch (None while the form has a bad value), for its button.
    """
    try:
        configs = configs_from_form(str(data_path))
    except ConfigError:
        return None  # Start shows the message
    missing = plan.missing_weights(configs)
    if missing:
        st.warning(missing_weights_text(missing), icon=":material/warning:")
        if any(not plan.needs_missing_weights(c, missing) for c in configs):
            st.radio("Without the weights", list(WITHOUT_WEIGHTS), key="train.without_weights",
                     format_func=WITHOUT_WEIGHTS.get)
    configs = plan.runs_to_start(configs, missing, st.session_state.get("train.without_weights", "scratch"))
    cpu = [c for c in configs if plan.trains_on_cpu(c)]
    try:
        sizes = split_sizes(str(data_path), settings.folder_fingerprint(data_path))
    except DatasetError:
        return len(configs)
    if cpu:
        n_eval = sizes.get("val", 0) + sizes.get("test", 0)
        seconds, source = plan.estimate(cpu, sizes.get("train", 0), n_eval, runs.list_runs(),
                                        probe=probe_rate)
        st.caption(f"On this CPU: {plan.duration_text(seconds)} for {len(cpu)} run{'s' if len(cpu) > 1 else ''} "
                   f"({sizes.get('train', 0):,} training images x {cpu[0].epochs} epochs), from {source}; "
                   "the first run on a data set also builds its image cache. Once a run starts, its card's "
                   "ETA is measured as it goes.")
    return len(configs)


def start(data_path: Path) -> None:
    try:
        configs = configs_from_form(str(data_path))
        read_dataset(data_path)  # a bad folder is refused here, before any process starts
    except (ConfigError, DatasetError) as e:
        st.error(md_text(e), icon=":material/error:")
        return
    missing = plan.missing_weights(configs)
    configs = plan.runs_to_start(configs, missing, st.session_state.get("train.without_weights", "scratch"))
    if not configs:
        st.error("Nothing started. " + missing_weights_text(missing), icon=":material/error:")
        return
    started = [jobs.launch(cfg) for cfg in configs]
    st.session_state["train.started"] = [p.name for p in started]
    st.session_state.pop("train.active", None)  # the monitor re-reads it without a second rerun
    st.rerun()  # a full rerun, so the sidebar's count of active runs includes them


def form() -> None:
    """The sidebar: preset, what it needs, the settings, Start."""
    if "cfg.arch" not in st.session_state:  # first visit (or back from another page): the preset's values
        st.session_state.setdefault("train.preset", next(iter(PRESETS)))
        apply_preset()
    data_path = settings.data_path()
    with st.sidebar:
        st.subheader("New run")
        st.selectbox("Preset", list(PRESETS), key="train.preset", on_change=apply_preset,
                     format_func=lambda k: PRESETS[k].label)
        n_runs = len(PRESETS[st.session_state["train.preset"]].runs)
        n_start = before_start(data_path)
        n_start = n_runs if n_start is None else n_start
        with st.form("train-form"):
            st.caption(f"Data: {md_text(data_path)} (switch it above)")
            for name in MAIN:
                field_widget(name, disabled=n_runs > 1 and name in ("arch", "pretrained"))
                if name == "pretrained":
                    weights_note()
            with st.expander("Advanced"):
                for name in FIELDS:
                    if name not in MAIN:
                        field_widget(name)
            if n_runs > 1:
                st.caption(f"Queues {n_runs} runs: architecture and pretrained vary; they train one after "
                           "another on the same device. A run name becomes `<name>-resnet18-scratch` and so on.")
            # the number it will start, pretrained runs held back for want of weights already taken off
            label = "Start training" if n_runs == 1 and n_start == 1 else (
                f"Start {n_start} of {n_runs} runs" if n_start < n_runs else f"Start {n_runs} runs")
            submitted = st.form_submit_button(label, type="primary", icon=":material/play_arrow:", key="train.start")
        if submitted:
            start(data_path)


# ----------------------------------------------------------------------------- monitoring

def active_card(run: runs.RunInfo, label: str, holder: str | None = None) -> None:
    s, rows = run.status, runs.read_metrics(run.path)
    with st.container(border=True):
        head, stop = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"**{md_text(label)}** :blue-badge[{run.state}]  \n{md_text(run.id)}")
        if stop.button("Stop", key=f"stop-{run.id}", icon=":material/stop:"):
            st.toast(f"Asked {md_text(label)} to stop after this step" if jobs.stop(run.path)
                     else f"{md_text(label)} is not running any more")
        fraction, text = dashboard.progress(s, holder)
        st.progress(fraction, text=text)
        if run.state != "running":
            return
        qwk = dashboard.qwk_key(rows)
        c = st.columns(5)
        c[0].metric("images/s", f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "–")
        c[1].metric("ETA", dashboard.clock(s.get("eta_s")))
        c[2].metric("train loss", f"{s['train_loss']:.3f}" if s.get("train_loss") is not None else "–")
        split = qwk.removesuffix("_qwk")  # the split the run is judged on while it trains: val (test: older runs)
        last = rows[-1] if rows else None
        c[3].metric(f"{split} accuracy", dashboard.value_text(last, split, "acc"))
        c[4].metric(f"{split} QWK", dashboard.value_text(last, split),
                    help=f"best so far {s['best_qwk']:.3f}" if s.get("best_qwk") is not None else None)
        steps = dashboard.step_log(run)
        if rows or steps:
            st.plotly_chart(charts.live_curves(rows, steps), key=f"live-{run.id}")


def finished_card(run: runs.RunInfo, label: str) -> None:
    s = run.status
    rows = runs.read_metrics(run.path)
    icon = {"completed": ":green-badge[completed]", "failed": ":red-badge[failed]",
            "stopped": ":orange-badge[stopped]", "interrupted": ":orange-badge[interrupted]"}.get(
        run.state, f":gray-badge[{run.state}]")
    with st.container(border=True):
        text, action = st.columns([5, 1], vertical_alignment="center")
        summary = dashboard.best_summary(rows)
        ago = dashboard.ago(time.time() - float(s.get("updated") or run.created))
        text.markdown(f"**{md_text(label)}** {icon} · {summary} · {len(rows)}/{s.get('epochs', '?')} epochs · {ago}  \n"
                      f"{md_text(run.id)}")
        resumable, why_not = dashboard.can_resume(run)
        if resumable and action.button("Resume", key=f"resume-{run.id}", icon=":material/play_arrow:"):
            try:
                jobs.resume(run.path)
                st.toast(f"Resuming {md_text(label)}")
            except runs.RunError as e:
                st.error(md_text(e))
        if run.state == "failed" and s.get("error"):
            st.error(md_text(s["error"]), icon=":material/error:")
        if why_not:
            st.caption(md_text(why_not))
        elif run.state == "interrupted":
            st.caption("Its process ended without saying so (killed, or the machine restarted): "
                       f"{dashboard.resume_point(run, rows)}.")
        elif run.state == "stopped":
            point = dashboard.resume_point(run, rows)
            st.caption(f"{point[0].upper()}{point[1:]}.")
        for problem in run.problems:
            st.warning(md_text(problem))


@st.fragment(run_every=2)
def monitor() -> None:
    all_runs = runs.list_runs()
    labels = dict(zip((r.id for r in all_runs), compare.run_labels(
        [r.name for r in all_runs], [r.id for r in all_runs], [r.config.get("train", {}) for r in all_runs])))
    active = [r for r in all_runs if r.state in runs.ACTIVE]
    ids = [r.id for r in active]
    if st.session_state.setdefault("train.active", ids) != ids:  # one started or ended: refresh the sidebar too
        st.session_state["train.active"] = ids
        st.rerun()
    st.subheader(f"Active runs ({len(active)})")
    if not active:
        st.caption("No run is training. Choose settings in the sidebar and press Start.")
    for run in active:
        active_card(run, labels[run.id], dashboard.device_holder(run, all_runs, labels) if run.state == "queued"
                    else None)
    finished = [r for r in all_runs if r.state not in runs.ACTIVE]
    if finished:
        st.subheader("Recent runs")
        for run in finished[:5]:
            finished_card(run, labels[run.id])
        st.page_link("pages/compare.py", label=f"Compare runs ({dashboard.completed_count(finished)} completed)",
                     icon=":material/compare_arrows:")


form()
st.title("Train")
if st.session_state.get("train.started"):
    st.success("Started " + ", ".join(md_text(n) for n in st.session_state.pop("train.started")),
               icon=":material/rocket_launch:")
monitor()
