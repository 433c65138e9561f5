"""Datasets: make one, upload pictures (files or a zip), see them with their problems, caption them (by hand,
in bulk, or with a captioner model through the job queue), and see their tags with counts."""

import pandas as pd
import streamlit as st

from dreamloom.datasets import SUPPORTED_SUFFIXES
from dreamloom.errors import DatasetError, DreamloomError
from dreamloom.studio import datasets as ds
from dreamloom.studio import literal, studio_home
from dreamloom.studio.login import visitor
from dreamloom.paths import human_bytes
from dreamloom.studio.uploads import LIMITS, MB, save_uploads

GRID_COLUMNS = 4
home = studio_home()

st.title("Datasets")
st.caption("A dataset is a handful of pictures of one subject or style (3 to 50), each with an optional caption.")
if "flash" in st.session_state:  # a message from before the last rerun
    st.success(st.session_state.pop("flash"))

names = ds.list_datasets(home)
with st.expander("New dataset", expanded=not names):
    with st.form("new-dataset", clear_on_submit=True):
        name = st.text_input("Name", placeholder="my-dog")
        trigger = st.text_input("Trigger word", value=ds.DatasetSettings.trigger,
                                help="A made-up word that will mean your subject in prompts, e.g. sks.")
        class_word = st.text_input("Class word", placeholder="dog",
                                   help="What the subject is: dog, person, toy, style...")
        if st.form_submit_button("Create dataset", type="primary"):
            try:
                folder = ds.create_dataset(home, name, ds.DatasetSettings(trigger, class_word))
            except DatasetError as exc:
                st.error(literal(str(exc)))
            else:
                st.session_state["current_dataset"] = st.session_state["dataset-picker"] = folder.name
                st.session_state["flash"] = f"Dataset '{literal(folder.name)}' created. Now add pictures."
                st.rerun()
    st.caption("Or start from the demo: four pictures of an orange crescent, a shape the toy base has never "
               "seen. Train it with toy-lora, then draw it in the Library's try-it panel.")
    if st.button("Add the demo dataset (4 crescents)", icon=":material/add_photo_alternate:"):
        try:
            folder = ds.add_demo_dataset(home)
        except DatasetError as exc:
            st.error(literal(str(exc)))
        else:
            st.session_state["current_dataset"] = st.session_state["dataset-picker"] = folder.name
            words = ds.read_settings(folder)
            st.session_state["flash"] = literal(
                f"Dataset '{folder.name}' added: {len(ds.image_paths(folder))} pictures, trigger {words.trigger}, "
                f"class word {words.class_word}. Train it on the Train page (toy-lora is the default).")
            st.rerun()
if not names:
    st.info("No datasets yet: create one above and add your pictures to it, or add the demo dataset.")
    st.stop()

if st.session_state.get("dataset-picker") not in names:  # current_dataset is shared with the Train page
    current = st.session_state.get("current_dataset")
    st.session_state["dataset-picker"] = current if current in names else names[0]
name = st.selectbox("Dataset", names, key="dataset-picker")
st.session_state["current_dataset"] = name
folder = ds.datasets_root(home) / name
settings = ds.read_settings(folder)

with st.form("settings"):
    left, right = st.columns(2)
    trigger = left.text_input("Trigger word", value=settings.trigger, help="The new word that names your subject.",
                              key=f"trigger-{name}")
    class_word = right.text_input("Class word", value=settings.class_word, help="What the subject is (dog, person).",
                                  key=f"class-word-{name}")
    if st.form_submit_button("Save words"):
        try:
            ds.write_settings(folder, ds.DatasetSettings(trigger, class_word))
            st.session_state["flash"] = "Saved."
            st.rerun()
        except DatasetError as exc:
            st.error(literal(str(exc)))

st.subheader("Add pictures")
uploader_key = f"upload-{st.session_state.get('upload_round', 0)}"  # a new key empties the uploader
files = st.file_uploader(
    f"Pictures ({', '.join(SUPPORTED_SUFFIXES)}) or a .zip of them; up to {LIMITS.max_files} at a time, "
    f"{LIMITS.max_image_bytes // MB} MB each", type=[s.lstrip(".") for s in SUPPORTED_SUFFIXES] + ["zip"],
    accept_multiple_files=True, max_upload_size=LIMITS.max_zip_bytes // MB, key=uploader_key)
if files and st.button("Add to dataset", type="primary"):
    try:
        added = save_uploads(folder, [(f.name, f.getvalue()) for f in files])
    except DatasetError as exc:
        st.error(literal(str(exc)))
    else:
        st.session_state["upload_round"] = st.session_state.get("upload_round", 0) + 1
        st.session_state["flash"] = f"Added {len(added)} picture(s)."
        st.rerun()

entries = ds.scan_images(folder)
if not entries:
    st.info("No pictures in this dataset yet.")
    st.stop()

st.subheader("Captions")
st.caption(f"Name in each caption what is not the subject and should stay changeable: the background, the pose, "
           f"and the colour if you will ask for other colours ('an orange {literal(settings.trigger)} shape on a "
           "white background'). What no caption names, the trigger word learns as part of the subject (QUALITY.md).")
caption_round = st.session_state.get("caption_round", 0)  # bumped by bulk edits so the boxes show the files
left, right = st.columns(2)
with left.form("add-trigger"):
    st.caption(f"Put '{literal(settings.trigger)}' at the front of every caption that does not mention it.")
    if st.form_submit_button("Add the trigger word"):
        changed = ds.add_trigger(folder, settings.trigger)
        st.session_state["caption_round"] = caption_round + 1
        st.session_state["flash"] = f"Trigger added to {changed} caption(s)."
        st.rerun()
with right.form("find-replace"):
    find = st.text_input("Find", key="find")
    replace = st.text_input("Replace with", key="replace")
    if st.form_submit_button("Replace in all captions"):
        try:
            changed = ds.find_replace(folder, find, replace)
        except DatasetError as exc:
            st.error(literal(str(exc)))
        else:
            st.session_state["caption_round"] = caption_round + 1
            st.session_state["flash"] = f"Replaced in {changed} caption(s)."
            st.rerun()

with st.expander("Caption every picture with a model"):
    st.caption("A captioner from a local folder (BLIP, Florence-2, Qwen2-VL, LLaVA) writes a sentence; a WD14-style "
               "tagger writes tags. A worker runs it, like a training job; captions you wrote are kept unless you "
               "tick 'Replace existing captions'.")
    with st.form("auto-caption"):
        model = st.text_input("Captioner folder", placeholder="/models/blip-image-captioning-large")
        mode_column, prefix_column = st.columns(2)
        mode = mode_column.selectbox("Write", ["caption", "tags"], format_func={"caption": "a sentence",
                                                                               "tags": "tags"}.get)
        prefix = prefix_column.text_input("Put in front", value=f"{settings.trigger},")
        overwrite = st.checkbox("Replace existing captions")
        if st.form_submit_button("Caption with the model"):
            from dreamloom.jobs.queue import JobQueue

            try:
                job_id = ds.caption_job(JobQueue(home), folder, model, mode, prefix, overwrite,
                                            by=visitor(st.context.cookies))
            except DreamloomError as exc:
                st.error(literal(str(exc)))
            else:
                st.session_state["flash"] = f"Job {job_id} captions the dataset: follow it on the Jobs page."
                st.rerun()

tags = ds.tag_counts(folder)
if any("," in e.caption for e in entries):  # tag captions
    with st.expander(f"Tags ({len(tags)})"):
        st.dataframe(pd.DataFrame(tags, columns=["tag", "captions"]), hide_index=True, width="stretch", height=240)
        with st.form("remove-tag"):
            tag = st.selectbox("Tag", [t for t, _ in tags])
            if st.form_submit_button("Remove it from every caption"):
                changed = ds.remove_tag(folder, tag)
                st.session_state["caption_round"] = caption_round + 1
                st.session_state["flash"] = f"Removed '{literal(tag)}' from {changed} caption(s)."
                st.rerun()

troubled = [e for e in entries if e.problems]
st.subheader(f"{len(entries)} picture(s)")
if troubled:
    st.warning(f"{len(troubled)} picture(s) have a problem; training refuses them until they are removed:\n\n"
               + literal("\n".join(f"- {e.path.name}: {'; '.join(e.problems)}" for e in troubled)))
st.caption(literal(f"An empty caption means: a photo of {settings.trigger} {settings.class_word}".rstrip()
                   + ". In a caption, {trigger} and {class_word} stand for the words above."))


def save_caption(image, key):
    ds.write_caption(image, st.session_state[key])


for row_start in range(0, len(entries), GRID_COLUMNS):
    for column, entry in zip(st.columns(GRID_COLUMNS), entries[row_start:row_start + GRID_COLUMNS]):
        with column.container(border=True):
            thumb = ds.thumbnail(entry.path)
            if thumb is not None:
                st.image(thumb, width="stretch")
            size = f"{entry.width}x{entry.height} px, " if entry.width else ""
            st.caption(f"**{literal(entry.path.name)}** · {size}{human_bytes(entry.size_bytes)}")
            for problem in entry.problems:
                st.error(literal(problem), icon=":material/error:")
            key = f"caption-{entry.path.name}-{caption_round}"
            st.text_input("Caption", value=entry.caption, key=key, on_change=save_caption, args=(entry.path, key),
                          placeholder="(the template)", label_visibility="collapsed")
            if st.button("Remove", key=f"remove-{entry.path.name}", icon=":material/delete:"):
                ds.remove_image(entry.path)
                st.rerun()
