"""Jobs: the queue with each job's state; for one job a live progress bar with ETA, the loss curve,
the latest validation samples and the log tail; cancel, resume, re-run with edits."""

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from dreamloom.jobs.queue import JobQueue
from dreamloom.jobs.worker import job_log
from dreamloom.studio import literal, studio_home
from dreamloom.studio.progress import checkpoint_grid, format_eta, log_tail, run_progress

REFRESH_S = 2.0
LIVE_STATES = ("queued", "running")
STATE_ICONS = {"queued": ":material/schedule:", "running": ":material/play_circle:", "finished": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/stop_circle:"}
queue = JobQueue(studio_home())

st.title("Jobs")
for notice in queue.notices()[:1]:  # a repair of a damaged queue, say
    st.warning(literal(notice), icon=":material/warning:")
live = any(job.state in LIVE_STATES for job in queue.jobs())


def when(stamp):
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else ""


def job_actions(job) -> None:
    left, middle, right = st.columns(3)
    if job.state in LIVE_STATES and left.button("Cancel", icon=":material/stop:", key=f"cancel-{job.id}",
                                                help="A running job saves a checkpoint first, then stops."):
        outcome = queue.cancel(job.id)
        st.toast(f"Job {job.id}: {'cancelled' if outcome == 'cancelled' else 'saving a checkpoint, then stopping'}")
    if job.state in ("failed", "cancelled") and left.button("Resume", icon=":material/replay:", key=f"resume-{job.id}",
                                                            help="Continues from the latest checkpoint."):
        queue.requeue(job.id)
        st.toast(f"Job {job.id} is queued again; it continues from its latest checkpoint.")
    if job.arguments is None and middle.button("Re-run with edits", icon=":material/edit:", key=f"edit-{job.id}",
                                               help="Opens the Train page with this job's recipe."):
        st.session_state["edit_job"] = (job.id, job.recipe)
        st.switch_page("screens/train.py")
    if job.state == "finished" and job.arguments is None:
        right.page_link("screens/library.py", label="Its exports in the Library", icon=":material/download:")


def export_checkpoint(job, steps: list[int]) -> None:
    """Export one checkpoint into the run's exports/step-N, in a separate process (a large base never
    loads into the studio's). Its outcome is kept in the session: any rerun while or after it runs
    (a widget, a refresh) would otherwise wipe a message drawn only on the click's run."""
    left, right = st.columns([1, 2], vertical_alignment="bottom")
    step = left.selectbox("Checkpoint", steps, index=len(steps) - 1, key=f"checkpoint-{job.id}",
                          format_func=lambda s: f"step {s}")
    outcome_key = f"exported-{job.id}"
    if right.button("Export this checkpoint", icon=":material/file_export:", key=f"export-{job.id}",
                    help="Writes its files into the run's exports/step-N; they appear in the Library."):
        with st.spinner(f"Exporting the checkpoint of step {step}..."):
            done = subprocess.run([sys.executable, "-m", "dreamloom", "export", str(job.run_dir), "--step", str(step),
                                   "--overwrite"], capture_output=True, text=True)
        st.session_state[outcome_key] = (done.returncode == 0, step,
                                         (done.stderr.strip().splitlines() or ["export failed"])[-1])
    if outcome_key in st.session_state:
        exported, step, last_line = st.session_state[outcome_key]
        if exported:
            st.success(f"Exported step {step}: it is in the Library.")
        else:
            st.error(literal(f"Exporting step {step} failed: {last_line}"))


def command_detail(job) -> None:
    """A job that is not a training run (captioning a dataset): its state and its log."""
    st.subheader(f"{STATE_ICONS[job.state]} Job {job.id} · {literal(job.name)} · {job.state}")
    st.caption(literal("dreamloom " + " ".join(job.arguments)))
    if job.state == "failed":
        st.error(literal(f"It failed: {job.error or 'no message'}"))
    elif job.state == "queued":
        st.info(literal(f"Waiting: {queue.waiting_reason(job)}."))
    job_actions(job)
    st.code(log_tail(job_log(queue, job.id), lines=8) or "(no output yet)", language=None)


def job_detail(job) -> None:
    if job.arguments is not None:
        return command_detail(job)
    progress = run_progress(job.run_dir)
    st.subheader(f"{STATE_ICONS[job.state]} Job {job.id} · {literal(job.name)} · {job.state}")
    if job.state == "running" and progress.total and progress.step < progress.total:
        eta = format_eta(progress.eta_s)
        st.progress(progress.fraction, text=f"step {progress.step} of {progress.total} · ETA {eta}")
    elif job.state == "running" and progress.total:
        st.progress(1.0, text="all steps done: exporting and drawing the final samples...")
    elif job.state == "running":
        st.progress(0.0, text="starting: loading the base model and the pictures...")
    elif job.state == "queued":
        st.info(literal(f"Waiting: {queue.waiting_reason(job)}. Jobs run one at a time per worker, oldest first."))
        if job.error:  # a crash or a hang it is being retried after
            st.warning(literal(job.error))
    elif job.state == "finished":
        st.progress(1.0, text=f"finished: {progress.step} steps")
    elif job.state == "cancelled":
        st.warning(f"Cancelled at step {progress.step}" + (f" of {progress.total}" if progress.total else "")
                   + ". Resume continues from the latest checkpoint.")
    if job.state == "failed":
        st.error(literal(f"Training failed: {progress.error or job.error or 'no message'}"))
    job_actions(job)
    chart, sample = st.columns(2)
    if progress.losses:
        chart.caption("Training loss (it is noisy: watch the trend)" + (" and validation loss (held-out pictures, "
                      "same noise at every checkpoint: its lowest point is the best checkpoint)"
                      if progress.validation else ""))
        curves = pd.DataFrame(progress.losses, columns=["step", "training"]).merge(
            pd.DataFrame(progress.validation, columns=["step", "validation"]), on="step", how="outer")
        chart.line_chart(curves, x="step", y=["training", "validation"] if progress.validation else "training",
                         height=260)
    if progress.latest_sample is not None:
        sample.caption(f"Latest validation samples: {progress.latest_sample.name}")
        sample.image(str(progress.latest_sample), width="stretch")
    if len(progress.samples) > 1:
        st.caption("Checkpoints side by side: rows are the prompts, columns the steps (same seeds everywhere)")
        st.image(checkpoint_grid(progress.samples), width="stretch")
    if progress.checkpoints and job.run_dir:
        export_checkpoint(job, progress.checkpoints)
    if progress.exports:
        st.caption("Exports: " + ", ".join(f"`{Path(p).name}`" for p in progress.exports))
    with st.expander("Log", expanded=job.state == "failed"):
        st.code(log_tail(job_log(queue, job.id)) or "(no output yet)", language=None)


@st.fragment(run_every=REFRESH_S if live else None)
def jobs_panel() -> None:
    """Redrawn every few seconds while a job is queued or running, without rerunning the page."""
    jobs = queue.jobs()
    if not jobs:
        st.info("No jobs yet. Submit one on the Train page.")
        st.page_link("screens/train.py", label="Go to Train", icon=":material/model_training:")
        return
    table = pd.DataFrame([{"job": j.id, "state": j.state, "recipe": j.name, "by": j.submitted_by or "", "waiting": queue.waiting_reason(j, jobs),
                           "attempts": j.attempts, "submitted": when(j.created), "finished": when(j.finished)}
                          for j in jobs])
    st.dataframe(table, hide_index=True, width="stretch")
    ids = [j.id for j in jobs]
    running = next((j.id for j in jobs if j.state == "running"), ids[0])
    if st.session_state.get("job-picker") not in ids:
        st.session_state["job-picker"] = running
    picked = st.selectbox("Job", ids, key="job-picker", format_func=lambda i: f"job {i}")
    job_detail(next(j for j in jobs if j.id == picked))


jobs_panel()
