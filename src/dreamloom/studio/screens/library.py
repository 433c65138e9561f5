"""Library: every exported file with its format, size, base and trigger, to download; and a try-it
panel that queues a sample of the base with an adapter (beside the base alone, or any X/Y plot)."""

from collections import defaultdict

import pandas as pd
import streamlit as st

from dreamloom.errors import DreamloomError
from dreamloom.jobs.queue import JobQueue
from dreamloom.paths import human_bytes
from dreamloom.sampling.schedulers import SCHEDULERS
from dreamloom.studio import literal, studio_home
from dreamloom.studio.login import visitor
from dreamloom.studio.library import download_bytes, scan_exports
from dreamloom.studio.tryit import TryIt, save_picture, submit_try, waiting_line

st.title("Library")
exports = scan_exports(studio_home())
if not exports:
    st.info("Nothing exported yet: files appear here when a training job finishes.")
    st.page_link("screens/train.py", label="Go to Train", icon=":material/model_training:")
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


@st.fragment(run_every=2)
def try_it_result() -> None:
    """Where the last try stands, then its picture: polls the queue (its own fragment, so only this
    part refreshes)."""
    if "try-it-job" not in st.session_state:
        return
    job_id, out = st.session_state["try-it-job"]
    line = waiting_line(JobQueue(studio_home()), job_id)
    if line.startswith("Failed"):
        st.error(literal(line))
    elif out.exists():
        st.image(str(out), caption=literal(st.session_state.get("try-it-caption", "")))
    else:
        st.info(literal(line))


@st.fragment
def try_it_panel(candidates) -> None:
    """Its own fragment: changing a setting redraws this panel only. Drawing is a queued job."""
    st.subheader("Try it")
    if not candidates:
        st.caption("The try-it panel applies LoRA-type, hypernetwork and embedding files; none has been exported yet.")
        return
    labels = [f"{e.run} / {e.path.name} ({e.format})" for e in candidates]
    export = candidates[labels.index(st.selectbox("Adapter", labels))]
    prompt = st.text_input("Prompt", value=export.prompt, key=f"prompt-{export.path}",
                           help="A1111's syntax: (word:1.3) weighs a word more, [word] less; any length.")
    negative = st.text_input("Negative prompt", value="")
    strength_column, seed_column, steps_column, guidance_column = st.columns(4)
    strength = strength_column.slider("Strength", 0.0, 1.5, 1.0, 0.05, help="0: the base alone; 1: as trained.")
    seed = seed_column.number_input("Seed", value=0, step=1, help="The same seed for every picture of the plot.")
    steps = steps_column.slider("Sampling steps", 5, 50, min(max(export.steps, 5), 50),
                                help="The run's own value to start with.")
    guidance = guidance_column.slider("Guidance", 1.0, 12.0, min(max(float(export.guidance_scale), 1.0), 12.0), 0.5,
                                      help="How strictly pictures follow the prompt. The run's own value to start "
                                           "with: the toy base draws best at about 3, SD at about 7.5.")
    sampler_column, width_column, height_column = st.columns(3)
    sampler = sampler_column.selectbox("Sampler", ["the base's own (DDIM)", *SCHEDULERS])
    width = width_column.number_input("Width", 0, 2048, 0, 64, help="px; 0: the base's own size (1024 for SDXL).")
    height = height_column.number_input("Height", 0, 2048, 0, 64, help="px; 0: the base's own size.")
    with st.expander("Start from a picture (img2img, inpainting)"):
        start = st.file_uploader("Start picture", type=["png", "jpg", "jpeg", "webp"])
        mask = st.file_uploader("Mask (white: re-draw, black: keep; the start picture's size)",
                                type=["png", "jpg", "jpeg", "webp"])
        denoise = st.slider("Denoising strength", 0.0, 1.0, 0.75, 0.05, help="How much of the picture is re-drawn.")
    with st.expander("X/Y plot"):
        st.caption("NAME=V1,V2,... over seed, cfg, steps, scheduler, strength, step, prompt (search and replace), "
                   "clip_skip. Without one, the base alone is drawn beside the adapter at the chosen strength.")
        x = st.text_input("X axis (columns)", placeholder="strength=0,0.5,1")
        y = st.text_input("Y axis (rows)", placeholder="seed=1,2,3")
    if st.button("Generate", type="primary", icon=":material/auto_awesome:"):
        home = studio_home()
        try:
            start_path = save_picture(home, start.getvalue(), "start picture") if start else None
            mask_path = save_picture(home, mask.getvalue(), "mask") if mask else None
            t = TryIt(export, prompt, negative, strength, int(seed), steps, guidance,
                      None if sampler not in SCHEDULERS else sampler, int(width) or None, int(height) or None,
                      start_path, mask_path, denoise, x, y)
            st.session_state["try-it-job"] = submit_try(JobQueue(home), home, t, by=visitor(st.context.cookies))
            st.session_state["try-it-caption"] = f"{export.path.name} at strength {strength:g}"
        except DreamloomError as exc:
            st.error(literal(str(exc)))


try_it_panel([e for e in exports if e.try_it])
try_it_result()
