"""`dapft sweep`: one fine-tune per combination of run settings, sequentially and resumably; the
evaluation before fine-tuning done once for all of them; a summary of mean +- sd over seeds and,
for every setting, a paired comparison by seed against the `original`-loss baseline with the same
other values (the control the paper's reviewers asked for).

This module runs the grid (sweeps.settings says what it is) and shares it among workers; the
statistics are sweeps.statistics', the files sweeps.summary's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from pathlib import Path

from dapft.analysis.evaluate import check_evaluator
from dapft.sweeps.settings import SWEEPABLE, expand, run_name
from dapft.sweeps.statistics import ERROR_TYPES, METRICS, RUNNING, TRAIN_METRICS, summarize
from dapft.sweeps.summary import write_summary
from dapft.training.config import (
    NOT_SETTINGS,
    RESUMABLE_CHANGES,
    FinetuneConfig,
    check_choices,
    saved_settings,
)
from dapft.training.evaluations import evaluate_start
from dapft.training.trainer import finetune
from dapft.utils import distributed as dist_utils
from dapft.utils.console import console
from dapft.utils.device import pick_device
from dapft.utils.files import FileLock, FolderInUseError, OutputFolder, take_lock, write_json
from dapft.utils.signals import TrainingInterrupted, pending_stop, saved_progress
from dapft.utils.trackers import Trackers, parse_report_to


def sweep(base: FinetuneConfig, grid: dict[str, list]) -> dict:
    """Fine-tune `base` once per combination in `grid` (field name -> values) under base.output.
    A finished run (report.json present) is kept and skipped; an interrupted one is resumed; a run
    that fails (diverges, runs out of memory) is recorded as failed and the others go on. Returns
    the summary written to sweep.json: `runs`, `settings` (mean and sd over seeds) and
    `comparisons` (paired by seed against the `original` loss).

    Spreading a sweep (docs/scaling-out.md):
    - under torchrun, each run is one DDP run over all the processes, one after another; the main
      process takes the locks and writes, the others follow its decisions;
    - the same sweep started several times against one output folder (one worker per GPU, node or
      SLURM array task) divides the grid: each worker takes the next run that is neither finished
      nor locked by another (the run folder's lock goes with its holder however it ends), the
      evaluation before fine-tuning is made once (under a lock the others wait on) and shared, and
      each worker writes the summary when it runs out of runs; the last one's is complete."""
    settings, configs, names = check_sweep(base, grid)
    root = Path(base.output)
    dist = dist_utils.init_distributed(pick_device(base.device).type)  # torchrun: the runs share the group
    try:
        with OutputFolder(root, enabled=dist.is_main, shared=True):
            for setting, cfg in zip(settings, configs):  # folders of another sweep refused before any run
                same_settings(cfg, root / run_name(setting))
            before = _before(root, base, dist)
            with FileLock(root / ".summary.lock", enabled=dist.is_main):  # one MLflow parent for every worker
                parent, group = _tracker_group(root, base, names, grid) if dist.is_main else (None, None)
            group = dist_utils.broadcast_object(group, dist)
            for setting, cfg in zip(settings, configs):
                _stop_if_requested(root / run_name(setting), dist)
                _run_one(root / run_name(setting), dataclasses.replace(cfg, tracker_group=group), before, dist)
            summary = None
            if dist.is_main:
                with FileLock(root / ".summary.lock"):
                    rows, software = _rows(root, settings, configs)
                    summary = {**summarize(rows, [k for k in SWEEPABLE if k in grid], before), "software": software}
                    write_summary(root, summary)
                    _summary_to_trackers(root, names, parent, group, summary)
            return dist_utils.broadcast_object(summary, dist)
    finally:
        dist_utils.shutdown(dist)


def check_sweep(base: FinetuneConfig, grid: dict[str, list]) -> tuple[list[dict], list[FinetuneConfig], tuple]:
    """Every combination's settings, the evaluator and the trackers checked at once, before the
    first run (or a SLURM submission): (settings, their configs, the trackers' names)."""
    settings = expand(grid)
    configs = [dataclasses.replace(base, **setting) for setting in settings]
    for cfg in configs:
        check_choices(cfg)
    check_evaluator(base.evaluator)
    return settings, configs, parse_report_to(base.report_to)


def _before(root: Path, base: FinetuneConfig, dist) -> dict | None:
    """The evaluation before fine-tuning (None with --no-eval-before), made once for the whole
    sweep into eval/before/ (the runs' own assembly and evaluation) and kept in before.json. The
    first worker makes it under a lock; the others wait on that lock and read it."""
    if not base.eval_before:
        return None
    with FileLock(root / ".before.lock", enabled=dist.is_main):
        before = dist_utils.broadcast_object(_shared_before(root, base) if dist.is_main else None, dist)
        if before is None:
            _say(dist, "evaluating the model before fine-tuning, once for every run", "bold")
            metrics = evaluate_start(dataclasses.replace(base, output=str(root)))
            if dist.is_main:
                write_json(root / "before.json", {"for": _before_identity(base), "metrics": metrics,
                                                  "eval_dir": "eval/before"})
            saved_progress()
            before = {**metrics, "eval_dir": str(root / "eval" / "before")}
    return before


def _stop_if_requested(next_run: Path, dist) -> None:
    """Between runs: a stop signal that came outside a run's loop (or during its last evaluation)
    ends the sweep before the next run starts, on every process (the same command continues)."""
    signum = dist_utils.max_over_processes(pending_stop(), dist)
    if signum:
        raise TrainingInterrupted(f"stopped before {next_run.name} ({signal.Signals(signum).name}); run the same "
                                  "dapft sweep command again to continue: finished runs are kept", signum)


def _say(dist, text: str, style: str) -> None:
    if dist.is_main:  # under torchrun the main process speaks for all
        console.print(text, markup=False, style=style)


def _run_one(run_dir: Path, cfg: FinetuneConfig, before: dict, dist) -> None:
    """One setting's run: finished or failed earlier (skipped), held by another worker (skipped),
    resumed, or run now, with its folder's lock held from the decision to the end. Under torchrun
    the main process decides and every process follows."""
    lock = OutputFolder(run_dir, enabled=dist.is_main)
    decision = _claim(run_dir, lock) if dist.is_main else None
    decision = dist_utils.broadcast_object(decision, dist)
    if decision == "finished":
        _say(dist, f"{run_dir.name}: finished earlier, skipped", "dim")
        return
    if decision == "failed":
        failure = json.loads((run_dir / FAILED).read_text(encoding="utf-8"))["error"]
        _say(dist, f"{run_dir.name}: failed earlier ({failure}); delete the folder to try it again", "dim")
        return
    if decision == RUNNING:
        _say(dist, f"{run_dir.name}: running in another worker, skipped", "dim")
        return
    resume = decision == "resume"
    _say(dist, run_dir.name + (" (resuming)" if resume else ""), "bold")
    try:
        finetune(dataclasses.replace(cfg, output=str(run_dir), resume=resume, before_metrics=before))
        saved_progress()  # its report
    except TrainingInterrupted as exc:  # its checkpoint is saved; the sweep resumes it
        raise TrainingInterrupted(
            f"sweep interrupted in {run_dir.name} ({exc}); run the same dapft sweep command again to "
            "continue: finished runs are kept, this one resumes", exc.signum) from exc
    except (FloatingPointError, RuntimeError) as exc:  # this setting diverged, or did not fit the memory
        if dist.enabled and dist_utils.peer_ended(exc):
            raise  # not this setting's failure: the run resumes when the same command runs again
        everywhere = isinstance(exc, FloatingPointError)
        if dist.is_main or not everywhere:
            failure = f"{type(exc).__name__}: {exc}"[:1000] + (f" (rank {dist.rank})" if dist.enabled else "")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / FAILED, {"error": failure})
            console.print(f"{run_dir.name} failed: {failure}", markup=False, style="red")
        if dist.enabled and not everywhere:
            # Divergence shows on every process at the same step (the weights are the same on all),
            # so all go on together. Another error may be this process's alone while the others
            # wait in a collective it will never join: it ends, torchrun ends the others, and the
            # same command goes on past the run recorded as failed.
            raise
    finally:
        lock.__exit__(None, None, None)


def _claim(run_dir: Path, lock: OutputFolder) -> str:
    """finished | failed | running (another worker holds it) | resume | new; for the last two the
    run folder's lock is taken (and released by the caller)."""
    if (run_dir / "report.json").exists():
        return "finished"
    if (run_dir / FAILED).exists():
        return "failed"
    try:
        lock.__enter__()
    except FolderInUseError:
        return RUNNING
    # Finished or failed by another worker between the look above and the lock
    done = "finished" if (run_dir / "report.json").exists() else "failed" if (run_dir / FAILED).exists() else None
    if done:
        lock.__exit__(None, None, None)
        return done
    return "resume" if (run_dir / "checkpoint-last").exists() or (run_dir / ".checkpoint-last.old").exists() else "new"


def _rows(root: Path, settings: list[dict], configs: list[FinetuneConfig]) -> tuple[list[dict], list[dict]]:
    """Every run's row from its folder: finished (its report), failed, running in another worker,
    or not finished (interrupted: the same command resumes it); and the code versions they ran on."""
    rows, software = [], []
    for setting, cfg in zip(settings, configs):
        run_dir = root / run_name(setting)
        report, failure, state = {}, None, "finished"
        if (run_dir / "report.json").exists():
            report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        elif (run_dir / FAILED).exists():
            failure, state = json.loads((run_dir / FAILED).read_text(encoding="utf-8"))["error"], "failed"
        else:
            state = RUNNING if _held(run_dir) else "unfinished"
        software += [s for s in report.get("software", []) if s not in software]
        errors = ((report.get("errors") or {}).get("after") or {})
        rows.append({**setting, "seed": cfg.seed, "run": run_name(setting), "failed": failure, "state": state,
                     **{m: (report.get("after") or {}).get(m) for m in METRICS},
                     **{m: (report.get("train_after") or {}).get(m[6:]) for m in TRAIN_METRICS},
                     **{f"dAP_{k}": errors.get("dAP", {}).get(k) for k in ERROR_TYPES}, "ECE": errors.get("ECE")})
    return rows, software


def _held(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock now."""
    path = run_dir / OutputFolder.NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        return not take_lock(fd, path)
    finally:
        os.close(fd)


def _tracker_group(root: Path, base: FinetuneConfig, names: tuple[str, ...], grid: dict) -> tuple:
    """Where the sweep's runs go in the trackers, as each groups runs: an MLflow parent run (kept in
    the sweep folder's trackers.json, so a sweep run again keeps it) with the runs as its children,
    and a W&B group named after the sweep folder. TensorBoard needs none: `tensorboard --logdir`
    on the sweep folder shows every run's. Returns (the parent's Trackers or None, the group)."""
    group, parent = {}, None
    if "mlflow" in names:
        params = {"grid": {k: ",".join(map(str, v)) for k, v in grid.items()}, "model": base.model,
                  "data": base.data, "command": base.command}
        parent = Trackers(root, ("mlflow",), run_name=root.resolve().name, params=params)
        if "mlflow" in parent.ids:
            group["mlflow"] = parent.ids["mlflow"]
    if "wandb" in names:
        where = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:6]  # two sweeps both named "ab"
        group["wandb"] = f"{root.resolve().name}-{where}"
    return parent, group or None


def _summary_to_trackers(root: Path, names: tuple[str, ...], parent: Trackers | None, group: dict | None,
                         summary: dict) -> None:
    """The sweep's means and paired comparisons: to the MLflow parent run, and to a W&B run of its
    own in the group (job type sweep-summary), as tables and as numbers."""
    metrics = summary["metrics"] + summary.get("errors", [])
    settings = [[s["setting"], len(s["seeds"])] + [s[m]["mean"] for m in metrics] for s in summary["settings"]]
    comparisons = [[c["setting"], c["baseline"], c["metric"], c["n"], c["mean_difference"],
                    *(c["ci95"] or (None, None))] for c in summary["comparisons"]]
    values = {f"mean_{m}/{s['setting']}": s[m]["mean"] for s in summary["settings"] for m in metrics
              if s[m]["mean"] is not None}
    values.update({f"vs_control_{c['metric']}/{c['setting']}": c["mean_difference"] for c in summary["comparisons"]})
    files = [root / name for name in ("sweep.md", "sweep.json", "sweep.png")]

    def send(trackers: Trackers) -> None:
        trackers.summary(values)
        trackers.table("settings", ["setting", "seeds", *(f"mean_{m}" for m in metrics)], settings)
        trackers.table("comparisons", ["setting", "baseline", "metric", "n", "mean_difference", "ci95_low",
                                       "ci95_high"], comparisons)
        trackers.files(files)
        trackers.close()

    if parent is not None:
        send(parent)
    if "wandb" in names and group:
        send(Trackers(root, ("wandb",), run_name=f"{root.resolve().name} (summary)",
                      params={"keys": summary["keys"]},
                      group={"wandb": group["wandb"], "wandb_job_type": "sweep-summary"}))


FAILED = "failed.json"  # a run's folder: the error that ended it, which a sweep run again reports


def same_settings(cfg: FinetuneConfig, run_dir: Path) -> None:
    """A sweep's run folder holds the run of these very settings, or nothing yet: a sweep run again
    into the same --output with another fixed setting (or another single --seed) must not report
    the old runs as its own."""
    if not (run_dir / "config.json").is_file():
        return
    saved = saved_settings(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    differing = [f"{f.name} = {saved[f.name]!r} (this sweep asks for {getattr(cfg, f.name)!r})"
                 for f in dataclasses.fields(FinetuneConfig)
                 if f.name not in RESUMABLE_CHANGES and f.name not in NOT_SETTINGS and f.name in saved
                 and getattr(cfg, f.name) is not None  # None: the recipe's value, which the run resolved
                 and saved[f.name] != getattr(cfg, f.name)]
    if differing:  # every one at once
        raise ValueError(f"{run_dir}: that run was made with {', '.join(differing)}; give this sweep another "
                         "--output (or delete that folder to redo the run)")


def _before_identity(base: FinetuneConfig) -> dict:
    """What the shared evaluation before fine-tuning depends on (not the evaluator: they agree)."""
    keys = ("model", "data", "val_images", "val_annotations", "max_eval_images", "label_map")
    return {k: getattr(base, k) for k in keys}


def _shared_before(root: Path, base: FinetuneConfig) -> dict | None:
    path = root / "before.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("for") != _before_identity(base):
        console.print(f"{path}: made for another model, data or evaluation subset; evaluating again",
                      markup=False, style="yellow")
        return None
    return {**saved["metrics"], **({"eval_dir": str(root / saved["eval_dir"])} if saved.get("eval_dir") else {})}
