"""Runs spread out: under real `torchrun` (gloo, CPU) on one machine and on two (two agents meeting at
a c10d rendezvous on localhost, as two machines would), and as several `dapft sweep` processes on one
output folder dividing the grid between them by the run folders' locks. (SLURM: tests/test_slurm.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs_helpers import assert_same_weights, weights

from dapft.utils.checkpoint import MANIFEST

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(*args) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2` as two machines would start it: two agents, one process each, meeting at
    a c10d rendezvous on the first one's address (here both on localhost)."""
    port, run_id = _free_port(), f"dapft-{time.time_ns()}"
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
                              "--rdzv-conf", f"is_host={int(first)}", "--max-restarts", "0", "-m", "dapft",
                              *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for first in (True, False)]


def _ended(agents: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    outputs = [a.communicate(timeout=timeout)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return outputs


def _lose_the_second_machine(agents: list[subprocess.Popen], ready) -> str:
    """Once `ready()`: SIGKILL the second agent and its process at once (its machine lost). The
    first must end within seconds, saying why. Returns what it printed."""
    deadline = time.time() + 300
    while time.time() < deadline and not ready():
        time.sleep(0.2)
    lost = agents[1]
    children = subprocess.run(["pgrep", "-P", str(lost.pid)], capture_output=True, text=True).stdout.split()
    for pid in (lost.pid, *map(int, children)):
        os.kill(pid, signal.SIGKILL)
    lost.communicate()
    start = time.time()
    _, stderr = agents[0].communicate(timeout=120)
    assert time.time() - start < 30 and agents[0].returncode != 0  # seconds: its connections closed with the process
    assert "another process of this job ended" in " ".join(stderr.split()), stderr[-3000:]
    return stderr


UNUSED_WARNING = "find_unused_parameters=True was specified"  # PyTorch's, each step's wasted graph traversal


def _checkpointed(run: Path, step: int) -> bool:
    """Whether the run's checkpoint-last holds step `step` or a later one."""
    try:
        return json.loads((run / "checkpoint-last" / MANIFEST).read_text())["global_step"] >= step
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def one_machine_run(tmp_path_factory, shapes_root):
    """`dapft finetune` on one machine's two processes, uninterrupted: what a run spread over two
    machines, interrupted or not, must end at."""
    out = tmp_path_factory.mktemp("one-machine") / "run"
    proc = _dapft("finetune", *QUICK, "--data", shapes_root, "--epochs", "4", "--seed", "1", "--output", out,
                  prefix=TORCHRUN)
    assert UNUSED_WARNING not in proc.stderr  # the RT-DETR leaves no parameter without a gradient
    return out


@pytest.mark.xdist_group("two-machines")  # one_machine_run, once
def test_finetune_on_two_machines_one_lost_mid_run_resumes_to_one_machines_weights(tmp_path, shapes_root,
                                                                                   one_machine_run):
    args = ["finetune", *QUICK, "--data", shapes_root, "--epochs", "4", "--seed", "1", "--save-every", "1",
            "--output", tmp_path / "run"]
    # Lost after step 3, where the processes' random generators have parted (each draws RT-DETR's
    # denoising noise for its own boxes): the resume must give each its own back.
    _lose_the_second_machine(_two_machines(*args), lambda: _checkpointed(tmp_path / "run", 3))
    assert not (tmp_path / "run" / "report.json").exists()
    resumed = _ended(_two_machines(*args, "--resume"))
    assert "resuming from" in resumed[0] and UNUSED_WARNING not in resumed[0] + resumed[1]
    assert_same_weights(weights(tmp_path / "run"), weights(one_machine_run))
    ours, theirs = (json.loads((d / "report.json").read_text())["after"] for d in (tmp_path / "run", one_machine_run))
    assert ours == theirs


@pytest.mark.xdist_group("two-machines")
def test_a_sweep_on_two_machines_one_lost_mid_run_continues_and_ends_at_one_machines_weights(tmp_path, shapes_root,
                                                                                              one_machine_run):
    args = ["sweep", *QUICK, "--data", shapes_root, "--epochs", "4", "--seed", "0,1", "--save-every", "1",
            "--output", tmp_path / "s"]
    _lose_the_second_machine(_two_machines(*args), lambda: _checkpointed(tmp_path / "s" / "seed=0", 3))
    _ended(_two_machines(*args))  # the same command: seed=0 resumes, seed=1 runs
    # the sweep's second run, made after the first in the same process group, as a run of its own
    assert_same_weights(weights(tmp_path / "s" / "seed=1"), weights(one_machine_run))
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["state"] for r in summary["runs"]] == ["finished", "finished"]
    before = json.loads((tmp_path / "s" / "before.json").read_text())["metrics"]
    assert before["AP"] == json.loads((one_machine_run / "report.json").read_text())["before"]["AP"]


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
