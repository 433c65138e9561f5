"""Train: a method, a recipe to start from, a dataset, a base and the settings that matter; then the
job goes to the queue (a worker process trains it, never this page)."""

import math

import streamlit as st

from dreamloom.errors import DreamloomError
from dreamloom.jobs.queue import JobQueue
from dreamloom.recipes import dump_recipe
from dreamloom.studio import datasets as ds
from dreamloom.studio import literal, studio_home
from dreamloom.studio.login import visitor
from dreamloom.studio import train_form as form
from dreamloom.trainers.registry import METHODS
from dreamloom.trainers.run import check_run_inputs

home = studio_home()

st.title("Train")
if "flash" in st.session_state:
    st.success(st.session_state.pop("flash"))
names = ds.list_datasets(home)
if not names:
    st.info("First make a dataset and add a few pictures to it.")
    st.page_link("screens/datasets.py", label="Go to Datasets", icon=":material/photo_library:")
    st.stop()

# The Jobs page's "re-run with edits" leaves (job id, its recipe) here.
edit = form.job_choice(*st.session_state["edit_job"]) if "edit_job" in st.session_state else None
methods = list(METHODS)
method = st.selectbox("Method", methods, index=methods.index(edit.method if edit else form.DEFAULT_METHOD),
                      format_func=lambda m: m.replace("_", " "), help="What kind of file training makes.")
st.caption(METHODS[method].help)
choices = ([edit] if edit and edit.method == method else []) + form.recipe_choices(home, method)
labels = [c.label for c in choices]
label = st.selectbox("Recipe", labels, index=0 if edit and edit.method == method else form.default_index(choices),
                     key=f"recipe-{method}-{edit.label if edit else ''}",
                     help="A starting point: built-in recipes are named base-method-GPU memory. toy-* (the default) "
                          "train on a CPU in minutes and draw real pictures: the toy base is pretrained on simple "
                          "shapes. tiny-* train in seconds, but their pictures are noise (random weights).")
choice = choices[labels.index(label)]
try:
    start = form.build_recipe(choice, {})
except DreamloomError as exc:
    st.error(literal(str(exc)))
    st.stop()
if start.description:
    st.caption(start.description)

current = st.session_state.get("current_dataset")
dataset = st.selectbox("Dataset", names, index=names.index(current) if current in names else 0)
st.session_state["current_dataset"] = dataset
folder = ds.datasets_root(home) / dataset
words = ds.read_settings(folder)
st.caption(f"{len(ds.image_paths(folder))} picture(s) · trigger **{literal(words.trigger)}** · class word "
           f"**{literal(words.class_word) or '(none)'}** (change them on the Datasets page)")

spec = start.base.model
kind_index = form.base_kind(spec)
kind = st.radio("Base model", form.BASE_KINDS, index=kind_index, horizontal=True, key=f"base-kind-{label}")
if kind == form.BASE_KINDS[0]:
    base = st.selectbox("Built-in base", form.BUILTIN_BASES,
                        index=form.BUILTIN_BASES.index(spec) if spec in form.BUILTIN_BASES else 0,
                        help="toy: SD's architecture at 64 px, pretrained on pictures of simple shapes; trains on a "
                             "CPU in minutes and draws real pictures. tiny: the same scaled down further, random "
                             "weights; trains in seconds, draws noise. random:*: architectures with random weights "
                             "(benchmarks).")
elif kind == form.BASE_KINDS[1]:
    base = st.text_input("Path", value=spec if kind_index == 1 else "",
                         help="A diffusers model folder (with model_index.json) or a .safetensors / .ckpt file.")
else:
    base = st.text_input("Hub id", value=spec if kind_index == 2 else "",
                         placeholder="stable-diffusion-v1-5/stable-diffusion-v1-5",
                         help="Downloaded from the Hugging Face hub, or read from its local cache.")

st.subheader("Settings")
values = {}
columns = st.columns(3)
shown = [s for s in form.SETTINGS if s.applies(start)]
for i, setting in enumerate(shown):
    value, key = form.recipe_value(start, setting.key), f"{label}:{setting.key}"
    column = columns[i % 3]
    if isinstance(value, bool):
        values[setting.key] = column.checkbox(setting.label, value=value, help=setting.help, key=key)
    elif options := form.setting_choices(setting.key):
        values[setting.key] = column.selectbox(setting.label, options, index=options.index(value),
                                               help=setting.help, key=key)
    elif isinstance(value, int):
        values[setting.key] = column.number_input(setting.label, value=value, step=8 if "resolution" in key else 1,
                                                  help=setting.help, key=key)
    else:
        step = 10.0 ** math.floor(math.log10(value)) if value > 0 else 0.1
        values[setting.key] = column.number_input(setting.label, value=float(value), step=step, format="%g",
                                                  help=setting.help, key=key)
values.update({"data.path": str(folder), "data.trigger": words.trigger, "data.class_word": words.class_word,
               "base.model": base.strip()})
try:
    recipe = form.build_recipe(choice, values)
except DreamloomError as exc:
    st.error(literal(str(exc)))
    st.stop()

memory = st.cache_data(form.predicted_memory, show_spinner="Estimating GPU memory...", max_entries=64)(
    dump_recipe(recipe))
if memory is None:
    st.caption("No GPU memory estimate for this base: it is read from `toy`, `tiny`, `random:*`, a local "
               "model's files, a published base's hub id or a model in the local hub cache.")
else:
    st.metric("Predicted GPU memory", f"{memory[0]:.1f} GiB", help="The peak of training on a CUDA GPU; on a CPU "
              "training uses ordinary memory instead.")
    with st.expander("Where the memory goes"):
        st.code(memory[1], language=None)

if st.button("Train", type="primary", icon=":material/play_arrow:"):
    try:
        check_run_inputs(recipe)  # every picture decoded, the base found: problems now, not in the worker
        job_id = JobQueue(home).submit(recipe, home / "runs", by=visitor(st.context.cookies))
    except DreamloomError as exc:
        st.error(literal(str(exc)))
    else:
        st.session_state.pop("edit_job", None)
        st.success(f"Job {job_id} is queued.")
        st.page_link("screens/jobs.py", label="Follow it on the Jobs page", icon=":material/monitoring:")

st.subheader("Recipe files")
left, middle, right = st.columns(3)
left.download_button("Download this recipe (TOML)", dump_recipe(recipe), file_name=f"{recipe.name}.toml",
                     mime="application/toml", on_click="ignore", icon=":material/download:")
with middle.form("save-recipe", clear_on_submit=True):
    save_as = st.text_input("Save as", placeholder="my-dog-lora")
    if st.form_submit_button("Save recipe"):
        try:
            path = form.save_recipe(home, recipe, save_as)
        except DreamloomError as exc:
            st.error(literal(str(exc)))
        else:
            st.session_state["flash"] = f"Saved: '{literal(path.stem)}' is now in the recipe list."
            st.rerun()
with right:
    uploaded = st.file_uploader("Upload a recipe (.toml)", type=["toml"], max_upload_size=1, key="recipe-upload")
    if uploaded is not None and st.button("Add recipe"):
        try:
            path = form.import_recipe(home, uploaded.name, uploaded.getvalue())
        except DreamloomError as exc:
            st.error(literal(str(exc)))
        else:
            st.session_state["flash"] = f"Added: '{literal(path.stem)}' is now in the recipe list."
            st.rerun()
