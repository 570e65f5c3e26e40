"""Train: a sidebar form built from TrainConfig, launched as background jobs, monitored live.

Each run is its own ``python -m retino train`` process (``retino.jobs``); this page only writes a
config, starts it, and reads run folders back every 2 seconds (a fragment with ``run_every=2``).
"""
import dataclasses
import time
from pathlib import Path

import streamlit as st

from retino import charts, compare, jobs, runs, settings
from retino.config import ConfigError, TrainConfig
from retino.data import DatasetError, read_dataset
from retino.models import list_models, weights_available

LAB = {"image_size": 512, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
       "head": "classify", "loss": "ce", "class_weights": "lab", "epochs": 10, "batch_size": 8,
       "schedule": "constant", "ben_graham": False, "augment": "lab", "interpolation": "nearest",
       "sampler": "plain"}
# ^ the lab report's settings: plain photos, its augmentation, no learning-rate schedule
PRESETS = {
    # name -> (shared settings, one override per run it queues)
    "Quick demo (CPU)": ({}, [{}]),
    "Lab report: ResNet18/50 x scratch/pretrained": (
        LAB, [{"arch": a, "pretrained": p} for a in ("resnet18", "resnet50") for p in (False, True)]),
}
MAIN = ("arch", "pretrained", "head", "loss", "class_weights", "sampler", "augment", "epochs", "batch_size",
        "image_size", "ben_graham", "optimizer", "lr", "weight_decay", "device", "seed", "name")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "data"}  # data: the sidebar's choice
SMALL_FLOATS = {"lr": 1e-4, "weight_decay": 1e-5, "momentum": 0.05, "warmup_epochs": 0.5}  # widget steps


def apply_preset() -> None:
    """Fill the form's widgets with the chosen preset (its first run's values where runs differ)."""
    shared, variants = PRESETS[st.session_state["train.preset"]]
    values = {**TrainConfig().to_dict(), **shared, **variants[0]}
    for name in FIELDS:
        st.session_state[f"cfg.{name}"] = values[name]


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
    """The runs the form describes: one per preset variant, each validated (ConfigError on a bad value)."""
    values = {name: st.session_state[f"cfg.{name}"] for name in FIELDS}
    shared, variants = PRESETS[st.session_state["train.preset"]]
    out = []
    for variant in variants:
        cfg = TrainConfig.from_dict({**values, **variant, "data": data})
        if values["name"] and len(variants) > 1:
            cfg.name = f"{values['name']}-{cfg.display_name()}"
        out.append(cfg.validate())
    return out


def start(data) -> None:
    try:
        configs = configs_from_form(str(data))
        read_dataset(data)  # a bad folder is refused here, before any process starts
    except (ConfigError, DatasetError) as e:
        st.error(str(e), icon=":material/error:")
        return
    started = [jobs.launch(cfg) for cfg in configs]
    st.session_state["train.started"] = [p.name for p in started]
    st.session_state.pop("train.active", None)  # the monitor re-reads it without a second rerun
    st.rerun()  # a full rerun, so the sidebar's count of active runs includes them


# ----------------------------------------------------------------------------- the form

if "cfg.arch" not in st.session_state:  # first visit (or back from another page): the preset's values
    st.session_state.setdefault("train.preset", next(iter(PRESETS)))
    apply_preset()
data_path = settings.data_path()
with st.sidebar:
    st.subheader("New run")
    st.selectbox("Preset", list(PRESETS), key="train.preset", on_change=apply_preset)
    n_runs = len(PRESETS[st.session_state["train.preset"]][1])
    with st.form("train-form"):
        st.caption(f"Data: `{data_path}` (switch it above)")
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
                       "another on the same device.")
        submitted = st.form_submit_button(f"Start {n_runs} runs" if n_runs > 1 else "Start training",
                                          type="primary", icon=":material/play_arrow:", key="train.start")
    if submitted:
        start(data_path)

st.title("Train")
if st.session_state.get("train.started"):
    st.success("Started " + ", ".join(f"`{n}`" for n in st.session_state.pop("train.started")),
               icon=":material/rocket_launch:")


# ----------------------------------------------------------------------------- monitoring

def _clock(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _ago(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now"


def _fraction(status: dict) -> float:
    epochs, epoch = max(int(status.get("epochs") or 1), 1), int(status.get("epoch") or 0)
    step, steps = int(status.get("step") or 0), int(status.get("steps") or 0)
    done = (max(epoch - 1, 0) + (step / steps if steps else 0)) / epochs
    return min(max(done, 0.0), 1.0)


def active_card(run: runs.RunInfo, label: str) -> None:
    s, rows = run.status, runs.read_metrics(run.path)
    with st.container(border=True):
        head, stop = st.columns([5, 1], vertical_alignment="center")
        head.markdown(f"**{label}** :blue-badge[{run.state}]  \n`{run.id}`")
        if stop.button("Stop", key=f"stop-{run.id}", icon=":material/stop:"):
            if jobs.stop(run.path):
                st.toast(f"Asked {label} to stop after this step")
            else:
                st.toast(f"{label} is not running any more")
        if run.state == "queued" and not s.get("started"):
            st.progress(0.0, text="queued: waiting for the device (another run is training on it)")
            return
        st.progress(_fraction(s), text=f"epoch {s.get('epoch') or 0}/{s.get('epochs', '?')} · "
                                       f"step {s.get('step') or 0}/{s.get('steps') or '?'}")
        c = st.columns(5)
        c[0].metric("images/s", f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "–")
        c[1].metric("ETA", _clock(s.get("eta_s")))
        c[2].metric("train loss", f"{s['train_loss']:.3f}" if s.get("train_loss") is not None else "–")
        c[3].metric("test accuracy", f"{100 * rows[-1]['test_acc']:.1f}%" if rows else "–")
        c[4].metric("test QWK", f"{rows[-1]['test_qwk']:.3f}" if rows else "–",
                    help=f"best so far {s['best_qwk']:.3f}" if s.get("best_qwk") is not None else None)
        if rows:
            st.plotly_chart(charts.live_curves(rows), key=f"live-{run.id}")


def finished_card(run: runs.RunInfo, label: str) -> None:
    s = run.status
    rows = runs.read_metrics(run.path)
    best = compare.best_row(rows)
    icon = {"completed": ":green-badge[completed]", "failed": ":red-badge[failed]",
            "stopped": ":orange-badge[stopped]", "interrupted": ":orange-badge[interrupted]"}.get(
        run.state, f":gray-badge[{run.state}]")
    with st.container(border=True):
        text, action = st.columns([5, 1], vertical_alignment="center")
        summary = (f"best epoch {best.get('epoch')}: QWK {best.get('test_qwk', float('nan')):.3f}, "
                   f"accuracy {100 * best.get('test_acc', float('nan')):.1f}%" if best else "no finished epoch")
        ago = _ago(time.time() - float(s.get("updated") or run.created))
        text.markdown(f"**{label}** {icon} · {summary} · {len(rows)}/{s.get('epochs', '?')} epochs · {ago}")
        if run.state in ("stopped", "interrupted", "failed"):
            if action.button("Resume", key=f"resume-{run.id}", icon=":material/play_arrow:"):
                try:
                    jobs.resume(run.path)
                    st.toast(f"Resuming {label}")
                except runs.RunError as e:
                    st.error(str(e))
        if run.state == "failed" and s.get("error"):
            st.error(s["error"], icon=":material/error:")
        elif run.state == "interrupted":
            st.caption("Its process ended without saying so (killed, or the machine restarted). "
                       "Resume continues from the last saved checkpoint.")
        for problem in run.problems:
            st.warning(problem)


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
        active_card(run, labels[run.id])
    finished = [r for r in all_runs if r.state not in runs.ACTIVE]
    if finished:
        st.subheader("Recent runs")
        for run in finished[:5]:
            finished_card(run, labels[run.id])
        st.page_link("pages/compare.py", label=f"Compare runs ({len(finished)} finished)",
                     icon=":material/compare_arrows:")


monitor()
