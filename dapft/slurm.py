"""`dapft sweep --slurm-partition P`: a sweep's workers as one SLURM job array, through submitit
(the launcher the DETR, Deformable DETR and DINO authors ship as `run_with_submitit.py`).

Each array task is one sweep worker (dapft.sweep: the workers divide the grid by the run folders'
locks), itself a multi-GPU DDP job: one task a GPU, submitit's torch distributed environment
exported, so that every run of the grid it takes runs on all its GPUs. Time limits and
preemption: SLURM signals a worker (submitit asks for SIGUSR2 90 s before the limit); its run saves
a resumable checkpoint at the end of the step, and the worker is requeued through submitit; the
requeued worker resumes that run, or the next one, as the same sweep command would."""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from dapft.config import FinetuneConfig
from dapft.runtime import TrainingInterrupted, also_stop_on, console
from dapft.sweep import check_sweep, sweep


@dataclass
class SlurmOptions:
    """Where and how the workers run; the names are sbatch's."""

    partition: str
    nodes: int = 1  # per worker, and so per run
    gpus_per_node: int = 1
    workers: int = 1  # array tasks, all sharing the grid
    time: int = 24 * 60  # minutes a worker may run before SLURM requeues it
    account: str | None = None
    cpus_per_task: int | None = None  # default: 8 for each GPU (the data loaders')
    sbatch: dict[str, str] = field(default_factory=dict)  # more sbatch options, as --sbatch "qos=high,constraint=a100"
    signal_delay: int = 90  # seconds before the limit that SLURM signals (SIGUSR2) a worker to save
    # times a worker may be requeued at its time limit (submitit's default, 3, would end a sweep
    # longer than four limits; preemptions do not count)
    requeues: int = 100

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node", "workers", "time", "signal_delay", "requeues"):
            if getattr(self, name) < 1:
                raise ValueError(f"--slurm-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


class SweepWorker:
    """One array task: the sweep, as a worker of its grid. submitit pickles it, runs it on the
    nodes, and on SLURM's signal calls `checkpoint` to requeue it (the runs' state is on disk)."""

    def __init__(self, base: FinetuneConfig, grid: dict[str, list]):
        self.base, self.grid = base, grid

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # every task sees the node's GPUs and takes the one of its local rank
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint, requeue, exit
        also_stop_on(signal.SIGUSR2)  # the run saves at the end of its step first
        try:
            return sweep(self.base, self.grid)
        except TrainingInterrupted as exc:
            if exc.signum == signal.SIGUSR2 and callable(requeue):
                requeue(signal.SIGUSR2, None)
            raise

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepWorker(self.base, self.grid))


def submit_sweep(base: FinetuneConfig, grid: dict[str, list], options: SlurmOptions, cluster: str = "slurm") -> list:
    """Submit `options.workers` sweep workers as one job array (cluster "local": submitit's local
    executor, which runs the tasks as local processes with SLURM's environment, for tests). Returns
    the submitit jobs; their logs are in OUTPUT/slurm/."""
    try:
        import submitit
    except ImportError:
        raise ImportError("--slurm-partition needs submitit: pip install 'dapft[slurm]'") from None
    options.check()
    check_sweep(base, grid)  # a mistake shows now, not in a job hours later
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("--slurm-partition: sbatch is not on this machine's PATH; submit from a SLURM login node")
    folder = Path(base.output) / "slurm"
    params = dict(nodes=options.nodes, tasks_per_node=options.gpus_per_node, timeout_min=options.time,
                  signal_delay_s=options.signal_delay)
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.requeues)
        params.update(partition=options.partition, gpus_per_node=options.gpus_per_node,
                      cpus_per_task=options.cpus_per_task or 8, array_parallelism=options.workers,
                      job_name=f"dapft-sweep-{Path(base.output).name}", additional_parameters=dict(options.sbatch))
        if options.account:
            params["account"] = options.account
    else:  # the same job on this machine, its tasks local processes (one node, no GPUs asked)
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.requeues)
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(SweepWorker(base, grid)) for _ in range(options.workers)]
    return jobs


def print_submitted(jobs: list, output: Path) -> None:
    console.print(f"submitted {len(jobs)} sweep worker{'s' * (len(jobs) != 1)}: job "
                  + ", ".join(str(j.job_id) for j in jobs), markup=False)
    console.print(f"logs: {jobs[0].paths.stdout.parent}/<job id>_<task>_log.out and .err; the sweep's summary: "
                  f"{Path(output) / 'sweep.md'} (written by the worker that ends the last run)", markup=False)
