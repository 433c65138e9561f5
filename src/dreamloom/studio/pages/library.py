"""Library: every exported file with its format, size, base and trigger, to download; and a try-it
panel that samples the base with an adapter beside the base alone."""

from collections import defaultdict

import pandas as pd
import streamlit as st

from dreamloom.errors import DreamloomError
from dreamloom.models import load_base
from dreamloom.studio import literal, studio_home
from dreamloom.paths import human_bytes
from dreamloom.studio.library import download_bytes, scan_exports
from dreamloom.studio.tryit import compare

st.title("Library")
exports = scan_exports(studio_home())
if not exports:
    st.info("Nothing exported yet: files appear here when a training job finishes.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

st.dataframe(pd.DataFrame([{"file": e.path.name, "format": e.format, "loads in": e.loads_in,
                            "size": human_bytes(e.size_bytes), "base": e.base, "trigger": e.trigger, "run": e.run}
                           for e in exports]), hide_index=True, width="stretch")

st.subheader("Download")
by_run = defaultdict(list)
for export in exports:
    by_run[export.run].append(export)
for i, (run, files) in enumerate(by_run.items()):
    with st.expander(literal(f"{run} · {files[0].method} · trigger {files[0].trigger} · base {files[0].base}"),
                     expanded=i == 0):
        for export in files:
            st.download_button(literal(f"{export.download_name} · {export.format} · {human_bytes(export.size_bytes)}"),
                               data=lambda export=export: download_bytes(export), file_name=export.download_name,
                               on_click="ignore", icon=":material/download:", key=f"download-{export.path}")


@st.cache_resource(max_entries=2, show_spinner="Loading the base model (once)...")
def shared_base(spec: str):
    return load_base(spec)


@st.fragment
def try_it_panel(candidates) -> None:
    """Its own fragment: generating redraws this panel only."""
    st.subheader("Try it")
    if not candidates:
        st.caption("The try-it panel applies LoRA-type, hypernetwork and embedding files; none has been exported yet.")
        return
    labels = [f"{e.run} / {e.path.name} ({e.format})" for e in candidates]
    export = candidates[labels.index(st.selectbox("Adapter", labels))]
    prompt = st.text_input("Prompt", value=export.prompt, key=f"prompt-{export.path}")
    strength_column, seed_column, steps_column, guidance_column = st.columns(4)
    strength = strength_column.slider("Strength", 0.0, 1.5, 1.0, 0.05, help="0: the base alone; 1: as trained.")
    seed = seed_column.number_input("Seed", value=0, step=1, help="The same seed for both pictures.")
    steps = steps_column.slider("Sampling steps", 5, 50, min(max(export.steps, 5), 50),
                                help="The run's own value to start with.")
    guidance = guidance_column.slider("Guidance", 1.0, 12.0, min(max(float(export.guidance_scale), 1.0), 12.0), 0.5,
                                      help="How strictly pictures follow the prompt. The run's own value to start "
                                           "with: the toy base draws best at about 3, SD at about 7.5.")
    if st.button("Generate", type="primary", icon=":material/auto_awesome:"):
        try:
            with st.spinner("Sampling..."):
                images = compare(shared_base(export.base), export.path, export.try_it, strength, prompt,
                                 int(seed), steps, guidance)
        except DreamloomError as exc:
            st.error(literal(str(exc)))
        else:
            st.session_state["try-it"] = (export.path.name, strength, images)
    if "try-it" in st.session_state:
        name, used, (alone, with_adapter) = st.session_state["try-it"]
        left, right = st.columns(2)
        left.image(alone, caption="the base alone", width=256)
        right.image(with_adapter, caption=literal(f"with {name} at strength {used:g}"), width=256)


try_it_panel([e for e in exports if e.try_it])
