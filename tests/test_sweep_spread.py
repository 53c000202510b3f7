"""A sweep spread out: under real `torchrun` (gloo, CPU), and as several `dapft sweep` processes on
one output folder dividing the grid between them by the run folders' locks."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from runs_helpers import assert_same_weights, weights

pytestmark = pytest.mark.slow  # several processes, each training

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
QUICK = ["--model", "dapft/tiny-rtdetr-shapes", "--batch-size", "4", "--max-train-images", "8", "--no-augment",
         "--num-workers", "0", "--no-progress", "--device", "cpu", "--max-eval-images", "4", "--report-to", "none"]


def _dapft(*args, prefix=(sys.executable,), check=True, timeout=400):
    proc = subprocess.run([*prefix, "-m", "dapft", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _started(stderr: str) -> list[str]:
    """The runs a sweep process started or resumed (its bold run-name lines)."""
    return [line.split()[0] for line in stderr.splitlines() if line.startswith("seed=") and ":" not in line]


def test_torchrun_sweep_runs_end_at_the_weights_torchrun_finetune_gives(tmp_path, shapes_root):
    common = [*QUICK, "--data", shapes_root, "--max-steps", "2"]
    _dapft("sweep", *common, "--output", tmp_path / "sweep", "--seed", "0,1", prefix=TORCHRUN)
    _dapft("finetune", *common, "--output", tmp_path / "alone", "--seed", "1", prefix=TORCHRUN)
    # the sweep's second run, made after the first in the same process group, as a run of its own
    assert_same_weights(weights(tmp_path / "sweep" / "seed=1"), weights(tmp_path / "alone"))
    assert (tmp_path / "sweep" / "eval" / "before" / "metrics.json").is_file()
    before = json.loads((tmp_path / "sweep" / "before.json").read_text())["metrics"]
    assert before["AP"] == json.loads((tmp_path / "alone" / "report.json").read_text())["before"]["AP"]
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["state"] for r in summary["runs"]] == ["finished", "finished"]


def test_two_workers_divide_a_grid_each_run_made_once_and_the_summary_one_workers(tmp_path, shapes_root):
    args = ["sweep", *QUICK, "--data", shapes_root, "--seed", "0,1,2,3", "--max-steps", "6"]
    shared = tmp_path / "shared"
    workers = [subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args), "--output", str(shared)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    started = [_started(out) for out in outputs]
    assert sorted(started[0] + started[1]) == [f"seed={s}" for s in range(4)]  # every run made, none twice
    assert started[0] and started[1]  # both worked
    assert sum(out.count("evaluating the model before fine-tuning") for out in outputs) == 1
    _dapft(*args, "--output", tmp_path / "alone")
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("shared", "alone"))
    assert [r["AP"] for r in a["runs"]] == [r["AP"] for r in b["runs"]]  # to the last digit
    assert a["comparisons"] == b["comparisons"] and a["settings"] == b["settings"]
    again = _dapft(*args, "--output", shared)  # everything finished: only the summary is written
    assert _started(again.stderr) == [] and again.stderr.count("finished earlier, skipped") == 4


def test_a_run_another_worker_holds_is_left_to_it_and_the_summary_says_so(tmp_path, shapes_root):
    args = ["sweep", *QUICK, "--data", shapes_root, "--seed", "0,1", "--max-steps", "2", "--output", tmp_path / "s"]
    (tmp_path / "s" / "seed=1").mkdir(parents=True)
    with open(tmp_path / "s" / "seed=1" / ".dapft.lock", "w") as held:  # as another worker running it holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = _dapft(*args)
        assert "seed=1: running in another worker, skipped" in proc.stderr
        text = (tmp_path / "s" / "sweep.md").read_text()
        assert "**Partial: 1 of 2 runs not finished** (seed=1: running in another worker)" in text
        assert json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"][1]["state"] == "running"
    proc = _dapft(*args)  # the holder gone: the same command makes it
    assert _started(proc.stderr) == ["seed=1"] and "Partial" not in (tmp_path / "s" / "sweep.md").read_text()


def test_a_worker_killed_mid_run_leaves_it_resumable_and_the_next_worker_resumes_it(tmp_path, shapes_root):
    args = ["sweep", *QUICK, "--data", shapes_root, "--seed", "0,1", "--epochs", "3", "--save-every", "1",
            "--output", tmp_path / "s"]
    first = subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    checkpoint = tmp_path / "s" / "seed=0" / "checkpoint-last"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.is_dir():
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no chance to save or to release anything: the lock goes with it
    first.communicate()
    proc = _dapft(*args)
    assert "seed=0 (resuming)" in proc.stderr
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]
    assert [r["state"] for r in rows] == ["finished", "finished"]


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ").read().split("\0") if "=" in x)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env and "TORCHELASTIC_RUN_ID" in env else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_torchruns_sigterm_ends_a_process_blocked_on_a_hung_peer_with_a_line_saying_so(tmp_path, shapes_root):
    # Rank 1 frozen (SIGSTOP) mid-training: rank 0 waits in a collective that will not finish, where
    # Python cannot run its SIGTERM handler. It must still end on torchrun's SIGTERM, saying why.
    args = ["sweep", *QUICK, "--data", shapes_root, "--seed", "0,1", "--epochs", "200", "--output", tmp_path / "s"]
    agent = subprocess.Popen([*TORCHRUN, "-m", "dapft", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, "DAPFT_SIGTERM_GRACE": "5"})
    log = tmp_path / "s" / "seed=0" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and '"type": "step"' in log.read_text()):
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    [peer] = [int(p) for p in children if _rank_of(int(p)) == 1]
    os.kill(peer, signal.SIGSTOP)
    time.sleep(1)
    agent.send_signal(signal.SIGTERM)
    time.sleep(10)  # rank 0's grace is 5 s; torchrun itself would SIGKILL the frozen peer only after 30
    os.kill(peer, signal.SIGKILL)
    _, stderr = agent.communicate(timeout=120)
    assert "SIGTERM: still blocked 5 s later" in stderr


# ------------------------------------------------------------------------------ SLURM through submitit
# submitit's local executor runs a job's tasks as local processes with the environment SLURM gives
# them (ranks, the job id, the time limit's signal, requeueing): dapft's SLURM path up to sbatch.

def _base(tmp_path, shapes_root, **kw):
    from dapft.config import FinetuneConfig

    settings = dict(model="dapft/tiny-rtdetr-shapes", data=str(shapes_root), output=str(tmp_path / "s"), batch_size=4,
                    max_train_images=8, augment=False, num_workers=0, progress=False, device="cpu",
                    max_eval_images=4, report_to="none", gallery=False)
    return FinetuneConfig(**{**settings, **kw})


def _logs(tmp_path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "s" / "slurm").glob("*_log.*")))


def test_slurm_workers_as_a_job_array_divide_the_grid_and_a_worker_of_two_tasks_runs_ddp(tmp_path, shapes_root,
                                                                                          monkeypatch):
    from dapft.slurm import SlurmOptions, submit_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = _base(tmp_path, shapes_root, max_steps=2)
    jobs = submit_sweep(base, {"seed": [0, 1]}, SlurmOptions("local", workers=2, time=10), cluster="local")
    assert len(jobs) == 2
    for job in jobs:
        job.result()
    assert sorted(_started(_logs(tmp_path))) == ["seed=0", "seed=1"]  # each run made once, by either worker
    assert [r["state"] for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]] == ["finished"] * 2
    # One worker of two tasks: submitit's torch distributed environment, the run over both processes
    jobs = submit_sweep(_base(tmp_path, shapes_root, max_steps=1, output=str(tmp_path / "ddp")), {"seed": [0]},
                        SlurmOptions("local", gpus_per_node=2, time=10), cluster="local")
    jobs[0].results()
    text = "".join(p.read_text() for p in (tmp_path / "ddp" / "slurm").glob("*_0_log.err"))
    assert "cpu x2" in text and (tmp_path / "ddp" / "seed=0" / "report.json").is_file()


def test_a_slurm_worker_warned_of_its_time_limit_saves_its_run_is_requeued_and_resumes_it(tmp_path, shapes_root,
                                                                                         monkeypatch):
    from dapft.slurm import SlurmOptions, submit_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = _base(tmp_path, shapes_root, epochs=60, eval_every=1000)  # longer than one attempt can train
    # a 1-minute limit, its SIGUSR2 40 s before: mid-run in the first attempt
    [job] = submit_sweep(base, {"seed": [0]}, SlurmOptions("local", time=1, signal_delay=40), cluster="local")
    job.result()
    logs = _logs(tmp_path)
    assert "SIGUSR2: saving a resumable checkpoint" in logs
    assert "seed=0 (resuming)" in logs
    assert [r["state"] for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]] == ["finished"]
