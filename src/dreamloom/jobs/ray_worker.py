"""`dreamloom jobs worker --ray ADDRESS`: the queue's jobs run on a Ray cluster. This process (on
the machine that holds jobs.db) claims queued jobs while the cluster has room for them, and runs
each through Ray Train: a `TorchTrainer` of `train.processes` workers (one GPU each on a GPU
cluster, one CPU each otherwise), each training the run in-process under Accelerate, which takes
the process group Ray Train set up. Ray's failure policy restarts a worker group that lost a
worker or a node; the restarted workers resume the run from its latest checkpoint, so a dead node
costs only the steps since then. Run directories, logs and heartbeats live in the studio's home
folder, which every node must see at the same path (a shared folder).

Leases, heartbeats and cancels work as for a local worker: the lease is renewed from here; every
rank beats into the job's heartbeat file, and a silent one gets the job's Ray task killed and the
job retried; a cancel writes the run's stop file, which the ranks honour with a checkpoint (no
signal reaches a trainer that runs in a thread of a Ray actor)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from ..errors import DreamloomError, TrainingStopped
from .heartbeat import ENV as HEARTBEAT_ENV
from .heartbeat import silence, start_from_environment
from .queue import Job, JobQueue
from .worker import BAD_INPUT, Policy, job_log, job_run, settle


def _train_rank(config: dict) -> dict:
    """One rank of a job, inside a Ray Train worker: train the run from its latest checkpoint,
    printing into the job's log; what became of it, as the exit code a trainer process would have."""
    from ..shell import quiet_libraries
    from ..trainers.run import train_run

    os.environ[HEARTBEAT_ENV] = config["heartbeat"]
    start_from_environment()
    quiet_libraries()
    logging.getLogger().setLevel(logging.WARNING)  # Ray sets INFO: Accelerate would log every checkpoint file
    rank = os.environ.get("RANK", "0")
    with open(config["log"], "a", buffering=1) as out, redirect_stdout(out), redirect_stderr(out):
        print(f"--- ray worker {os.getpid()} on {socket.gethostname()}: rank {rank} of {config['processes']} "
              f"trains {config['run']} ---")
        try:
            train_run(config["run"])
        except TrainingStopped as exc:
            print(exc)
            return {"code": TrainingStopped.exit_code}
        except DreamloomError as exc:
            print(f"error: {exc}")
            return {"code": BAD_INPUT, "error": str(exc)}
    return {"code": 0}


def _fit(run: str, processes: int, use_gpu: bool, log: str, heartbeat: str, storage: str, name: str,
         restarts: int) -> dict:
    """A Ray task that owns the job's Ray Train run (killing it ends the run's workers too)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_rank, train_loop_config={"run": run, "log": log, "heartbeat": heartbeat, "processes": processes},
        scaling_config=ScalingConfig(num_workers=processes, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=storage, name=name, failure_config=FailureConfig(max_failures=restarts)))
    result = trainer.fit()
    return result.return_value or {"code": 0}


def _command(arguments: list[str], log: str, heartbeat: str) -> dict:
    """A Ray task running a job that is not a training run (`dreamloom sample ...`) on some node."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HEARTBEAT_ENV: heartbeat})
    with open(log, "a") as out:
        code = subprocess.run([sys.executable, "-m", "dreamloom", *arguments], stdout=out, stderr=subprocess.STDOUT,
                              env=env).returncode
    return {"code": code}


def check_reachable(address: str) -> None:
    """Fail at once, with the fix, where Ray itself would retry an address nobody listens on for a
    minute or more ("auto": the cluster this machine is part of, found by Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DreamloomError(f"--ray {address}: give the cluster's address as HOST:PORT (what `ray start --head` "
                             f"prints), or auto.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise DreamloomError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}). Start one "
                             f"with `ray start --head` and give the address it prints.") from None


class RayWorker:
    def __init__(self, home: str | Path, address: str, policy: Policy | None = None, poll: float = 1.0):
        try:
            import ray
        except ImportError:
            raise DreamloomError("--ray needs Ray on this machine and every node: pip install 'dreamloom[ray]' "
                                 "(with the same version everywhere).") from None
        check_reachable(address)
        self.ray = ray
        self.queue = JobQueue(home)
        self.policy = policy or Policy()
        self.poll = poll
        try:
            # the trainer's own print() into the job's log only, not through Ray Train's logger as well
            ray.init(address=address, log_to_driver=False, logging_level="WARNING",
                     runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise DreamloomError(f"--ray {address}: no Ray cluster answers there ({exc}). Start one with "
                                 f"`ray start --head` and give the address it prints.") from None
        # a GPU cluster runs one rank per GPU; a CPU cluster (tests, a try) one rank per CPU
        self.use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if self.slots() == 0:
            raise DreamloomError(f"--ray {address}: the cluster has no CPU or GPU to run jobs on yet; add a node "
                                 f"(`ray start --address {address}`).")
        self.running: dict[int, threading.Thread] = {}
        self.held: dict[int, int] = {}  # job id -> the slots it holds

    def slots(self) -> int:
        """What the cluster holds now: nodes that join (or leave) after the start count."""
        return int(self.ray.cluster_resources().get("GPU" if self.use_gpu else "CPU", 0))

    def serve(self, once: bool = False) -> None:
        """Claim jobs while the cluster has room for them; with once, return when the queue is empty
        and every job this worker started has ended."""
        for job_id in self.queue.recover_orphans():
            print(f"job {job_id}: its worker had died; queued again, it resumes from its checkpoint", flush=True)
        print(f"serving the queue on a Ray cluster of {self.slots()} {'GPU' if self.use_gpu else 'CPU'}(s)", flush=True)
        while True:
            for job_id, thread in list(self.running.items()):
                if not thread.is_alive():
                    del self.running[job_id], self.held[job_id]
            room = self.slots() - sum(self.held.values())
            job = self.queue.claim(os.getpid(), None, lease=self.policy.lease, room=room) if room > 0 else None
            if job is not None:
                print(f"job {job.id} ({job.name}) sent to the Ray cluster ({job.processes} worker(s))", flush=True)
                self.held[job.id] = job.processes
                self.running[job.id] = threading.Thread(target=self._report, args=(job,), daemon=True)
                self.running[job.id].start()
                continue
            if once and not self.running and not any(j.state == "queued" for j in self.queue.jobs()):
                return
            time.sleep(self.poll)

    def _report(self, job: Job) -> None:
        print(f"job {job.id}: {self.run_job(job)}", flush=True)

    def run_job(self, job: Job) -> str:
        """Run one claimed job on the cluster to its end; its state afterwards."""
        ray, queue, policy = self.ray, self.queue, self.policy
        log = job_log(queue, job.id)
        log.parent.mkdir(parents=True, exist_ok=True)
        heartbeat = log.with_suffix(".heartbeat")
        heartbeat.touch()
        run = None
        if job.arguments is not None:
            ref = ray.remote(_command).options(num_cpus=1, num_gpus=1 if self.use_gpu else 0, max_retries=0).remote(
                job.arguments, str(log), str(heartbeat))
        else:
            try:
                run = job_run(queue, job)
            except (DreamloomError, OSError) as exc:
                queue.finish(job.id, "failed", str(exc))
                return "failed"
            if run.is_finished():
                queue.finish(job.id, "finished")
                return "finished"
            run.stop_file.unlink(missing_ok=True)  # a cancel of an earlier attempt is spent
            with open(log, "a") as out:
                out.write(f"--- ray worker {os.getpid()} sends job {job.id} (attempt {job.attempts}) to the cluster "
                          f"in {run.path} ---\n")
            ref = ray.remote(_fit).options(num_cpus=0, max_retries=0).remote(
                str(run.path), job.processes, self.use_gpu, str(log), str(heartbeat), str(queue.home / "ray"),
                f"job-{job.id}-attempt-{job.attempts}", max(policy.retries - 1, 0))
        asked_to_stop, renewed = False, time.time()
        while not ray.wait([ref], timeout=self.poll)[0]:
            if time.time() - renewed > policy.lease / 4:
                if not queue.renew(job.id, os.getpid(), policy.lease):
                    ray.cancel(ref, force=True)
                    return "lost"
                renewed = time.time()
            if silence(heartbeat) > policy.hang:
                ray.cancel(ref, force=True)
                return queue.retry_or_fail(job, f"hung (no heartbeat for {policy.hang:.0f} s)", policy.retries,
                                           policy.backoff)
            if queue.get(job.id).cancel_requested and not asked_to_stop:
                asked_to_stop = True
                if run is None:
                    ray.cancel(ref, force=True)
                else:
                    run.stop_file.touch()  # every rank checkpoints at the same step, then stops
        try:
            outcome = ray.get(ref)
            code, error = outcome["code"], outcome.get("error")
        except ray.exceptions.TaskCancelledError:
            code, error = TrainingStopped.exit_code, None
        except ray.exceptions.RayError as exc:  # Ray's failure policy gave up, or the task's node died
            return queue.retry_or_fail(job, str(exc).strip().splitlines()[-1], policy.retries, policy.backoff)
        return settle(queue, job, run, code, asked_to_stop, error or f"exit code {code}", policy)


def serve_on_ray(home: str | Path, address: str, policy: Policy | None = None, once: bool = False) -> None:
    RayWorker(home, address, policy).serve(once=once)
