"""The studio's entry point for `streamlit run` (`dreamloom studio` starts it): one page per step,
data -> training -> jobs -> results. Pages only call the core; training runs in the job queue's
worker processes, never here."""

from pathlib import Path

import streamlit as st

from dreamloom.shell import quiet_libraries
from dreamloom.studio import literal
from dreamloom.studio.login import LOGOUT_PATH, logged_in

quiet_libraries()  # before the pages import diffusers and transformers
# not "pages/": Streamlit would serve that folder itself, by direct URL, around this navigation
PAGES = Path(__file__).parent / "screens"

st.set_page_config(page_title="dreamloom studio", page_icon=":material/texture:", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "datasets.py", title="Datasets", icon=":material/photo_library:", default=True),
    st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:"),
    st.Page(PAGES / "jobs.py", title="Jobs", icon=":material/monitoring:"),
    st.Page(PAGES / "library.py", title="Library", icon=":material/download:"),
    st.Page(PAGES / "about.py", title="About", icon=":material/info:"),
])
st.sidebar.caption("dreamloom: teach Stable Diffusion a subject or a style from a few pictures.")
user = logged_in(st.context.cookies)
if user is not None:  # a shared studio (see login.py)
    st.sidebar.caption(f"Logged in as **{literal(user)}** · [Log out]({LOGOUT_PATH})")
navigation.run()
