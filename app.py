"""Retino's dashboard: the router (``streamlit run app.py``).

Pages live in ``pages/``; this file adds only what every page shares: the page config and a sidebar
that says which data set is in use (and switches it) and how many runs are training.
"""
import streamlit as st

from retino.dashboard import jobs, settings
from retino.data import DatasetError, read_dataset

st.set_page_config(page_title="Retino", page_icon=":material/visibility:", layout="wide")

# url_paths differ from the file names on purpose: Streamlit runs a script with a pages/ folder as
# a v1 multipage app until st.navigation is first called, so a bookmarked /train opened first after
# a restart would run pages/train.py without this router. An unknown path runs app.py instead.
PAGES = [
    st.Page("pages/data.py", title="Data set", icon=":material/photo_library:", url_path="dataset", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:", url_path="training"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="comparison"),
    st.Page("pages/predict.py", title="Predict", icon=":material/search:", url_path="prediction"),
    st.Page("pages/screen.py", title="Screen", icon=":material/fact_check:", url_path="screening"),
]


@st.cache_data(show_spinner=False, max_entries=16)
def describe_dataset(path: str, fingerprint: tuple) -> dict:
    """Layout and split sizes; cached per folder state (a 35,000-image CSV is read once)."""
    return read_dataset(path).describe()


def dataset_sidebar() -> None:
    path = settings.data_path()
    st.subheader("Data set in use")
    try:
        info = describe_dataset(str(path), settings.folder_fingerprint(path))
        sizes = " / ".join(f"{n:,} {split}" for split, n in info["sizes"].items())
        st.markdown(f"**{path.name}** · {info['layout']} layout  \n{sizes} images")
        st.caption(str(path))
    except DatasetError as e:
        st.error(str(e), icon=":material/error:")
    with st.expander("Switch data set"):
        with st.form("switch-dataset", border=False):
            new = st.text_input("Data-set folder", value=str(path), key="app.data_path",
                                help="Any folder Retino recognises: Kaggle, APTOS, the lab report's CSVs, "
                                     "grade folders 0/ ... 4/, or Retino's own layout. Remembered across reloads.")
            if st.form_submit_button("Use this folder", key="app.use_data"):
                try:
                    settings.use_dataset(new)
                    st.rerun()
                except DatasetError as e:
                    st.error(str(e), icon=":material/error:")


def runs_sidebar() -> None:
    active = jobs.active_runs()
    label = f"{len(active)} run{'s' if len(active) != 1 else ''} training" if active else "No run training"
    st.page_link("pages/train.py", label=label, icon=":material/pending:" if active else ":material/check_circle:")


page = st.navigation(PAGES)
with st.sidebar:
    dataset_sidebar()
    runs_sidebar()
page.run()
