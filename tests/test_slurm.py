"""`dapft sweep --slurm-partition` on a real one-node SLURM cluster on localhost (tests/slurm_cluster.py):
real sbatch, srun, job arrays, SLURM's signals, requeues and scancel, as on a cluster's login node."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs_helpers import ENV
from slurm_cluster import PARTITION, SlurmCluster, missing

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # jobs that train; one cluster

QUICK = ["--model", "dapft/tiny-rtdetr-shapes", "--batch-size", "4", "--max-train-images", "8", "--no-augment",
         "--num-workers", "0", "--no-progress", "--device", "cpu", "--max-eval-images", "4", "--report-to", "none",
         "--no-gallery"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("DAPFT_REQUIRE_SLURM"):  # CI installs SLURM: these tests must not skip there
            pytest.fail(why)
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _cluster_env(**more) -> dict[str, str]:
    return {**ENV, "SLURM_CONF": os.environ["SLURM_CONF"], **more}  # the cluster's; jobs inherit it and ENV's threads


def _dapft(*args, background=False):
    command = [sys.executable, "-m", "dapft", *map(str, args)]
    env = _cluster_env()
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _submit(*args) -> str:
    """`dapft sweep ... --slurm-partition` as a user types it: the job array's id."""
    proc = _dapft("sweep", *args, "--slurm-partition", PARTITION, "--slurm-cpus-per-task", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"submitted \d+ sweep workers?: job (\d+)", proc.stderr)
    assert match, proc.stderr
    return match.group(1)


def _logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "slurm").glob("*_log.*")))


def _started(text: str) -> list[str]:
    """The runs the workers started afresh (a resumed run's line says so)."""
    return re.findall(r"^(seed=\d+)$", text, flags=re.M)


def _until(condition, what: str, cluster: SlurmCluster, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s\n{cluster.logs()}")
        time.sleep(0.2)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["global_step"] for x in (run / "log.jsonl").read_text().splitlines() if '"step"' in x]


def test_a_job_array_divides_a_grid_through_a_preemption_and_a_scancel_each_run_made_once(tmp_path, shapes_root,
                                                                                           cluster):
    grid = ["--data", shapes_root, *QUICK, "--seed", "0,1,2,3", "--epochs", "3", "--max-train-images", "24",
            "--save-every", "1"]
    out = tmp_path / "s"
    # The same grid made by one process alone, meanwhile: what every run must end at.
    alone = _dapft("sweep", *grid, "--output", tmp_path / "alone", background=True)
    job = _submit(*grid, "--output", out, "--slurm-workers", "2")

    def checkpoints() -> int:
        return sum((out / f"seed={s}" / "checkpoint-last").is_dir() for s in range(4))

    # Preempted mid-run (what `scontrol requeue` does): SIGTERM to every task, then SLURM requeues
    # the array. Each worker's run saves at the end of its step; the requeued workers resume them.
    _until(lambda: checkpoints() >= 1, "a first checkpoint", cluster)
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    _until(lambda: "(resuming)" in _logs(out), "a worker resuming its run after the requeue", cluster)
    assert cluster.restarts(f"{job}_0") + cluster.restarts(f"{job}_1") >= 1
    # Cancelled mid-run: the runs save and the workers end; the same command later continues.
    seen = checkpoints()
    _until(lambda: checkpoints() > seen, "a checkpoint after the requeue", cluster)
    subprocess.run(["scancel", job], check=True, capture_output=True)
    cluster.wait(job)
    rows = json.loads((out / "sweep.json").read_text())["runs"] if (out / "sweep.json").exists() else []
    assert [r["state"] for r in rows].count("finished") < 4, "the grid ended before the scancel: lengthen its runs"
    job2 = _submit(*grid, "--output", out, "--slurm-workers", "2")
    assert set(cluster.wait(job2).values()) == {"COMPLETED"}, _logs(out)

    logs = _logs(out)
    assert sorted(_started(logs)) == [f"seed={s}" for s in range(4)], logs  # each run started once, by either
    assert "(resuming)" in logs and "SIGTERM: saving a resumable checkpoint" in logs
    for s in range(4):
        assert _steps(out / f"seed={s}") == list(range(1, 19))  # every step once: resumed where it was saved
    assert alone.wait(timeout=600) == 0, alone.stderr.read()[-3000:]
    ours, theirs = (json.loads((d / "sweep.json").read_text()) for d in (out, tmp_path / "alone"))
    assert [r["state"] for r in ours["runs"]] == ["finished"] * 4
    assert [r["AP"] for r in ours["runs"]] == [r["AP"] for r in theirs["runs"]]  # to the last digit


def test_a_two_task_worker_signalled_by_its_time_limit_before_anything_is_saved_keeps_what_it_then_saves(
        tmp_path, shapes_root, cluster):
    # A 2-minute limit signalled 85 s before it: SLURM, which checks time limits every 30 s and
    # signals up to 30 s early, sends SIGUSR2 between 5 and 35 s into each attempt, and a loaded
    # machine still has a minute and a half to save a step before the limit. The first attempt waits meanwhile for
    # the evaluation before fine-tuning, which another worker holds (the test, here): signalled
    # with nothing saved, it goes on, makes the evaluation once the lock is free, keeps it, and is
    # requeued without starting a run. Every attempt saves something; the sweep ends.
    out = tmp_path / "s"
    out.mkdir()
    held = open(out / ".before.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    job = _submit("--data", shapes_root, *QUICK, "--seed", "0,1", "--epochs", "4", "--save-every", "1", "--output",
                  out, "--slurm-gpus-per-node", "2", "--slurm-time", "2", "--slurm-signal-delay", "85")
    _until(lambda: "SIGUSR2: stopping once this attempt has saved something new" in _logs(out),
           "SLURM's time-limit signal while the worker waits", cluster, timeout=120)
    held.close()  # the other worker's evaluation "failed": this one makes it
    assert set(cluster.wait(job, timeout=400).values()) == {"COMPLETED"}, _logs(out)

    logs = _logs(out)
    assert logs.count("evaluating the model before fine-tuning") == 1, logs  # made once, kept by the requeue
    assert "stopped before seed=0 (SIGUSR2)" in logs  # the first attempt: the evaluation saved, no run begun
    assert cluster.restarts(job) >= 1 and "cpu x2" in logs  # requeued; each run DDP over the two tasks
    for s in (0, 1):
        assert _steps(out / f"seed={s}") == list(range(1, 9))  # every step once, however often it stopped
    assert [r["state"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["finished"] * 2


def test_a_worker_that_has_done_its_part_is_not_ended_by_a_late_time_limit_signal(tmp_path, shapes_root, cluster):
    # SLURM's time-limit signal may come at any moment of an attempt, also as a worker that has
    # done its part exits. Python, shutting down, gives a signal it handles back its default
    # action, which ends the process; SLURM would then mark a job FAILED whose work is all saved
    # (it happened in this file's time-limit test). A worker on a real srun step, its sweep done,
    # is sent the signal over and over until it has exited: the step ends with status 0.
    code = f"""
import os
from dapft.sweeps.slurm import SweepWorker
from dapft.training.config import FinetuneConfig
import dataclasses
base = FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data={str(shapes_root)!r}, output={str(tmp_path / "s")!r},
                      batch_size=4, max_train_images=8, augment=False, num_workers=0, progress=False, device="cpu",
                      max_eval_images=4, report_to="none", gallery=False)
SweepWorker({{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}}, {{"seed": [0]}})()
print("returned", os.getpid(), flush=True)
"""
    env = _cluster_env(SUBMITIT_EXECUTOR="slurm")  # as submitit's sbatch file sets it
    srun = subprocess.Popen(["srun", "-p", PARTITION, "-n", "1", "-c", "1", "-t", "5", sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid = None
    for line in srun.stdout:
        if line.startswith("returned "):
            pid = int(line.split()[1])
            break
    assert pid, srun.stderr.read()[-3000:]
    signals = 0
    while srun.poll() is None:
        try:
            os.kill(pid, signal.SIGUSR2)
            signals += 1
        except ProcessLookupError:
            pass
        time.sleep(0.0005)
    stderr = srun.stderr.read()
    assert srun.wait(timeout=60) == 0, stderr[-3000:]
    assert signals and "User defined signal 2" not in stderr
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"][0]["state"] == "finished"


def test_a_worker_signalled_before_its_first_step_stops_after_one_step_saved(tmp_path, shapes_root):
    # What a SLURM worker does with a time limit's signal that comes while a run loads: the run
    # takes one step, checkpoints it and stops (a requeue then resumes from it). In a process of
    # its own: the signal handling is the process's.
    code = f"""
import os, signal
from dapft.training.config import FinetuneConfig
from dapft.training.trainer import finetune
from dapft.utils.signals import TrainingInterrupted, stop_after_progress
stop_after_progress((signal.SIGUSR2, signal.SIGTERM))
os.kill(os.getpid(), signal.SIGUSR2)  # before the run: nothing saved yet
try:
    finetune(FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data={str(shapes_root)!r}, output={str(tmp_path / "run")!r},
                            batch_size=4, max_train_images=16, augment=False, num_workers=0, progress=False,
                            device="cpu", max_eval_images=4, report_to="none", gallery=False, epochs=2))
except TrainingInterrupted as exc:
    print("stopped:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert "stopped: interrupted at step 1 (SIGUSR2)" in proc.stdout, proc.stderr[-3000:]
    assert _steps(tmp_path / "run") == [1]
    manifest = json.loads((tmp_path / "run" / "checkpoint-last" / "dapft_checkpoint.json").read_text())
    assert manifest["global_step"] == 1


def test_a_sweep_worker_signalled_while_nothing_is_saved_keeps_its_evaluation_before_and_starts_no_run(tmp_path,
                                                                                                      shapes_root):
    # The sweep's evaluation before fine-tuning is progress of its own: made after the signal, it is
    # kept (before.json) and the worker stops there, before its first run, to be requeued.
    code = f"""
import os, signal
from dapft.training.config import FinetuneConfig
from dapft.utils.signals import TrainingInterrupted, stop_after_progress
from dapft.sweeps.grid import sweep
stop_after_progress((signal.SIGUSR2, signal.SIGTERM))
os.kill(os.getpid(), signal.SIGUSR2)  # at the worker's start: nothing saved yet
try:
    sweep(FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data={str(shapes_root)!r}, output={str(tmp_path / "s")!r},
                         batch_size=4, max_train_images=8, augment=False, num_workers=0, progress=False, device="cpu",
                         max_eval_images=4, report_to="none", gallery=False), {{"seed": [0, 1]}})
except TrainingInterrupted as exc:
    print("stopped:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert "stopped: stopped before seed=0 (SIGUSR2)" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "s" / "before.json").is_file() and not (tmp_path / "s" / "seed=0").exists()


def test_sbatch_refusing_the_job_and_bad_settings_are_said_in_one_line_before_anything_runs(tmp_path, shapes_root,
                                                                                           cluster):
    from dapft.sweeps.slurm import SlurmOptions, submit_sweep
    from dapft.training.config import FinetuneConfig

    base = FinetuneConfig(model="dapft/tiny-rtdetr-shapes", data=str(shapes_root), output=str(tmp_path / "s"),
                          device="cpu", report_to="none")
    with pytest.raises(RuntimeError, match="--slurm-partition nosuch: sbatch refused the job array: .*partition"):
        submit_sweep(base, {"seed": [0]}, SlurmOptions("nosuch", cpus_per_task=1))
    with pytest.raises(RuntimeError, match="sbatch refused the job array: .*(gres|GRES|gpu|Requested node configuration)"):
        submit_sweep(base, {"seed": [0]}, SlurmOptions(PARTITION, gpus_per_node=3, cpus_per_task=1))  # the node has 2
    with pytest.raises(ValueError, match="--slurm-workers must be at least 1"):
        submit_sweep(base, {"seed": [0]}, SlurmOptions(PARTITION, workers=0))
    with pytest.raises(ValueError, match="sigma"):
        submit_sweep(base, {"sigma": [-1.0]}, SlurmOptions(PARTITION))
    assert not (tmp_path / "s" / "slurm").exists() or not any((tmp_path / "s" / "slurm").glob("*_log.*"))
