"""`dapft sweep --slurm-partition P`: a sweep's workers as one SLURM job array, through submitit
(the launcher the DETR, Deformable DETR and DINO authors ship as `run_with_submitit.py`).

Each array task is one sweep worker (dapft.sweeps.grid: the workers divide the grid by the run folders'
locks), itself a multi-GPU DDP job: one task a GPU, submitit's torch distributed environment
exported, so that every run of the grid it takes runs on all its GPUs. Time limits: SLURM signals
a worker (submitit asks for SIGUSR2 --slurm-signal-delay seconds before the limit); its run saves a
resumable checkpoint at the end of the step, and the worker requeues itself through submitit; the
requeued worker resumes that run, or the next one, as the same sweep command would. Preemption
(SIGTERM, then SLURM requeues the job) and scancel (SIGTERM) save the same way. A signal before the
attempt has saved anything waits until it has (dapft.utils.signals.stop_after_progress)."""

from __future__ import annotations

import dataclasses
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# What a job imports to unpickle its worker is kept light (no torch): until submitit's handler and
# then the worker's are installed, a SIGUSR2 (which SLURM may send within seconds of a start) would
# end the process by its default action, without a requeue.
from dapft.utils.console import console
from dapft.utils.signals import TrainingInterrupted, ignore_further_signals, stop_after_progress

if TYPE_CHECKING:
    from dapft.training.config import FinetuneConfig


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
    """One array task: the sweep, as a worker of its grid. submitit pickles it and runs it on the
    nodes; on the time limit's signal the worker stops once it has saved progress and requeues
    itself through submitit (`checkpoint`: the runs' state is on disk)."""

    def __init__(self, settings: dict, grid: dict[str, list]):
        self.settings, self.grid = settings, grid  # the sweep's FinetuneConfig as its fields' values

    def __call__(self) -> dict:
        import submitit

        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint, requeue, exit
        # The time limit's SIGUSR2, and the SIGTERM of a preemption or scancel (which submitit would
        # only log): the worker stops at the end of a step, or, where this attempt has saved
        # nothing yet, once it has (the evaluation before, a first step), never in a loop of
        # requeues without progress.
        stop_after_progress((signal.SIGUSR2, signal.SIGTERM))
        from dapft.sweeps.grid import sweep
        from dapft.training.config import FinetuneConfig

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # every task sees the node's GPUs and takes the one of its local rank
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            result = sweep(FinetuneConfig(**self.settings), self.grid)
        except TrainingInterrupted as exc:
            console.print(str(exc), markup=False)
            if exc.signum == signal.SIGUSR2 and callable(requeue):
                requeue(signal.SIGUSR2, None)  # a preemption is requeued by SLURM itself, scancel not at all
                if env.global_rank != 0:
                    _await_requeue()
            raise
        # This worker's part is done and saved: a stop signal from now on has nothing to stop, and
        # one that came as the process exits would end it by the signal: SLURM would mark FAILED a
        # job whose work is all saved.
        ignore_further_signals()
        return result

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepWorker(self.settings, self.grid))


def _await_requeue() -> None:
    """A task other than the first, stopped by the time limit: the first task checkpoints and
    requeues the job (submitit's handler returns here without doing anything, as it must), and the
    requeue ends this task. It waits for that instead of exiting: a task that exits with an error
    ends the job step, and can end the first task before its requeue is made, leaving the job
    FAILED. Should the first task fail, the step ends and takes this one with it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM ends it at once
    while True:
        signal.pause()


def submit_sweep(base: FinetuneConfig, grid: dict[str, list], options: SlurmOptions) -> list:
    """Submit `options.workers` sweep workers as one job array with sbatch. Returns the submitit
    jobs; their logs are in OUTPUT/slurm/."""
    try:
        import submitit
    except ImportError:
        raise ImportError("--slurm-partition needs submitit: pip install 'dapft[slurm]'") from None
    from dapft.sweeps.grid import check_sweep

    options.check()
    check_sweep(base, grid)  # a mistake shows now, not in a job hours later
    if shutil.which("sbatch") is None:
        raise RuntimeError("--slurm-partition: sbatch is not on this machine's PATH; submit from a SLURM login node")
    executor = submitit.SlurmExecutor(folder=Path(base.output) / "slurm", max_num_timeout=options.requeues)
    # submitit.SlurmExecutor takes sbatch's own names (ntasks_per_node, time), not the local and
    # auto executors' (tasks_per_node, timeout_min).
    executor.update_parameters(
        partition=options.partition, nodes=options.nodes, ntasks_per_node=options.gpus_per_node,
        gpus_per_node=options.gpus_per_node, cpus_per_task=options.cpus_per_task or 8, time=options.time,
        signal_delay_s=options.signal_delay, array_parallelism=options.workers,
        job_name=f"dapft-sweep-{Path(base.output).name}", additional_parameters=dict(options.sbatch),
        **({"account": options.account} if options.account else {}))
    try:
        with executor.batch():
            settings = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            jobs = [executor.submit(SweepWorker(settings, grid)) for _ in range(options.workers)]
    except submitit.core.utils.FailedJobError as exc:
        message = " ".join(str(exc).split()) or "no message"
        raise RuntimeError(f"--slurm-partition {options.partition}: sbatch refused the job array: {message}") from None
    return jobs


def print_submitted(jobs: list, output: Path) -> None:
    console.print(f"submitted {len(jobs)} sweep worker{'s' * (len(jobs) != 1)}: job "
                  + ", ".join(str(j.job_id) for j in jobs), markup=False)
    console.print(f"logs: {jobs[0].paths.stdout.parent}/<job id>_<task>_log.out and .err; the sweep's summary: "
                  f"{Path(output) / 'sweep.md'} (written by the worker that ends the last run)", markup=False)
