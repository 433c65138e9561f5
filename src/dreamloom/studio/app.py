"""The studio's entry point for `streamlit run` (`dreamloom studio` starts it): one page per step,
data -> training -> jobs -> results. Pages only call the core; training runs in the job queue's
worker processes, never here."""

from pathlib import Path

import streamlit as st

from dreamloom.shell import quiet_libraries

quiet_libraries()  # before the pages import diffusers and transformers
PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="dreamloom studio", page_icon=":material/texture:", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "datasets.py", title="Datasets", icon=":material/photo_library:", default=True),
    st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:"),
    st.Page(PAGES / "jobs.py", title="Jobs", icon=":material/monitoring:"),
    st.Page(PAGES / "library.py", title="Library", icon=":material/download:"),
    st.Page(PAGES / "about.py", title="About", icon=":material/info:"),
])
st.sidebar.caption("dreamloom: teach Stable Diffusion a subject or a style from a few pictures.")
navigation.run()
