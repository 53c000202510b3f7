"""A real one-node SLURM cluster on localhost for the tests: Debian's munged, slurmctld and slurmd
(`apt-get install munge slurmctld slurmd slurm-client`, which `.ci/run` does), run as root in a
temporary folder with their own munge key, ports and state, and stopped at the end.

The node declares 16 CPUs and 2 GPUs whatever the machine has (`SlurmdParameters=config_overrides`;
the GPUs are generic resources backed by /dev/null and /dev/zero), so that sbatch accepts the
`--gpus-per-node` and `--cpus-per-task` a sweep asks for on a CPU machine; the jobs run on the CPU.

One thing is not as on a production cluster: SLURM holds a requeued job for 2 minutes before it
may start again (its BeginTime; fixed in slurmctld). A thread of the fixture releases such jobs at
once (`scontrol update JobId=... StartTime=now`), which changes when a requeued job starts, not what
it does."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
PARTITION = "dapft"


def missing() -> str | None:
    """Why a cluster cannot run here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install munge slurmctld slurmd slurm-client"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """`with SlurmCluster(folder) as cluster:` a cluster whose clients (sbatch, squeue, scontrol, and
    submitit, which calls them) find it through SLURM_CONF, set in os.environ while it runs."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._previous_conf = os.environ.get("SLURM_CONF")

    # ------------------------------------------------------------------ start, stop
    def __enter__(self) -> "SlurmCluster":
        f = self.folder
        for sub in ("state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = f / "munge.sock"
        try:
            self._start([_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                         f"--key-file={key}", f"--pid-file={f / 'munged.pid'}", f"--log-file={f / 'log' / 'munged.log'}",
                         f"--seed-file={f / 'munge.seed'}"], wait_for=self.munge_socket)
            host = socket.gethostname().split(".")[0]
            self.conf.write_text(self._slurm_conf(host))
            (f / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/null\nNodeName={host} Name=gpu File=/dev/zero\n")
            os.environ["SLURM_CONF"] = str(self.conf)
            self._start([_binary("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._start([_binary("slurmd"), "-D", "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.__exit__()
            raise
        threading.Thread(target=self._release_requeued, name="slurm-requeue-release", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.processes[2:]:  # the controller and the node: end what still runs
            subprocess.run(["scancel", "--partition", PARTITION], capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and self.jobs_alive():
                time.sleep(0.5)
        for proc in reversed(self.processes):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf

    def _slurm_conf(self, host: str) -> str:
        f = self.folder
        return "\n".join([
            "ClusterName=dapfttest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "GresTypes=gpu", "SlurmdParameters=config_overrides", "ReturnToService=2",
            "KillWait=15",  # SIGTERM to SIGKILL: a tiny model's step and checkpoint take well under it
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 Gres=gpu:2 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            ""])

    def _start(self, command: list[str], wait_for: Path | None = None) -> None:
        log = open(self.folder / "log" / f"{Path(command[0]).name}.out", "w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        deadline = time.time() + 20
        while wait_for is not None and not wait_for.exists():
            if time.time() > deadline or self.processes[-1].poll() is not None:
                raise RuntimeError(f"{command[0]} did not start: {self.logs()}")
            time.sleep(0.1)

    def _wait_idle(self) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node never became idle: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.folder / "log").glob("*")))

    # ------------------------------------------------------------------ jobs
    def _release_requeued(self) -> None:
        while not self._stop.wait(1.0):
            out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                job, _, reason = line.partition(" ")
                if reason.strip() == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)

    def states(self, job: str) -> dict[str, str]:
        """Each task of a job (array) and its state, as squeue shows them (finished ones included)."""
        out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-j", str(job), "-o", "%i %T"], capture_output=True,
                             text=True).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def jobs_alive(self) -> bool:
        out = subprocess.run(["squeue", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
        return any(s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD") for s in out)

    def wait(self, job: str, timeout: float = 300) -> dict[str, str]:
        """Until every task of `job` has ended; their final states."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.states(job)
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                    "PREEMPTED", "BOOT_FAIL", "DEADLINE") for s in states.values()):
                return states
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still running after {timeout} s: {self.states(job)}\n{self.logs()}")

    def restarts(self, job: str) -> int:
        out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
        return max((int(w.split("=")[1]) for w in out.split() if w.startswith("Restarts=")), default=0)
