"""`dapft finetune`'s loop, as the DETR code's engine holds it: evaluate before, then epochs of steps
at the schedule's rate, an evaluation every --eval-every epochs and after the last, a resumable
checkpoint after every epoch (and every --save-every steps), and the report. The run it works on is
assembled by dapft.training.assemble; its state is dapft.training.state's; one step is
dapft.training.step's.

Two classes by job, as detectron2's trainers are layered: `StepTrainer` runs an epoch's steps and
what happens at a step's boundary (saving, stopping); `Trainer` is the run around them (set-up or
resume, the evaluation before, the epochs and their evaluations, the report)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from dapft.training.assemble import assemble, write_config
from dapft.training.config import FinetuneConfig, lr_factor
from dapft.training.evaluations import evaluate_before, evaluate_epoch, evaluation_line
from dapft.training.run_report import announce, finish, model_card, open_trackers
from dapft.training.state import RunLog, apply_patience, new_state, resume_run, save_run
from dapft.training.step import bar_info, forward_backward, optimizer_step, step_record
from dapft.utils import distributed as dist_utils
from dapft.utils.console import make_progress
from dapft.utils.files import OutputFolder
from dapft.utils.provenance import software
from dapft.utils.signals import StopRequests, TrainingInterrupted, may_stop_now, saved_progress


class StepTrainer:
    """An epoch's steps, and saving and stopping at a step's boundary. Works on what `Trainer` sets
    up: `run` (dapft.training.assemble.Run), `cfg`, `state`, `log`, `stops`, `t_start`, `step_bar`."""

    def _train_one_epoch(self, bar) -> bool:
        """One epoch, or what is left of it after a resume. True when --max-steps ended it."""
        run, cfg, st = self.run, self.cfg, self.state
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(st["epoch"], cfg.epochs, cfg.lr_drop)
        run.sampler.set_epoch(st["epoch"], skip_samples=st["batch_in_epoch"] * (cfg.batch_size // run.dist.world_size))
        bar.update(self.step_bar, completed=st["batch_in_epoch"] // cfg.grad_accum, total=run.steps_per_epoch)
        run.optimizer.zero_grad(set_to_none=True)
        # Each step's own wall time: waiting for data, its micro-batches, the optimizer step (not a
        # checkpoint written after it).
        t_step, images, losses = time.perf_counter(), 0, []
        for batch in run.loaders["train"]:
            terms = self._forward_backward(batch)
            losses.append(terms["loss"])
            st["batch_in_epoch"] += 1
            images += len(batch["image_ids"]) * run.dist.world_size
            if st["batch_in_epoch"] % cfg.grad_accum and st["batch_in_epoch"] < run.batches_per_epoch:
                continue  # accumulating
            values = self._optimizer_step(terms, torch.stack(losses))
            st["global_step"] += 1
            record = step_record(st, run, values, time.perf_counter() - t_step, images)
            self.log.write(record)
            bar.update(self.step_bar, advance=1, info=bar_info(record))
            if cfg.save_every and st["global_step"] % cfg.save_every == 0:
                self._save()
            self._stop_if_requested(after_step=True)
            if cfg.max_steps and st["global_step"] >= cfg.max_steps:
                return True
            t_step, images, losses = time.perf_counter(), 0, []
        return False

    def _forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        return forward_backward(self.run, batch, self.state["global_step"] + 1, self.cfg.grad_accum)

    def _optimizer_step(self, terms: dict[str, torch.Tensor], losses: torch.Tensor) -> dict[str, float]:
        return optimizer_step(self.run, terms, losses, self.state["global_step"] + 1, self.cfg.clip_grad_norm)

    def _save(self, best: bool = False) -> None:
        self.state["elapsed"] = time.perf_counter() - self.t_start
        run, state = self.run, self.state
        save_run(run, state, best, card=lambda which: model_card(run.cfg, run.family.name, state, which))
        saved_progress()
        self.log.flush()  # what the trackers have never runs ahead of a checkpoint by more than a flush

    def _stop_if_requested(self, after_step: bool = False) -> None:
        """At a step boundary, after Ctrl-C or SIGTERM on any process: save a resumable checkpoint and
        stop (every process at the same step). A SLURM worker's stop waits for a step when nothing
        new is saved yet (dapft.utils.signals.stop_after_progress)."""
        wanted = self.stops.signum if after_step or may_stop_now() else 0
        signum = dist_utils.max_over_processes(wanted, self.run.dist)
        if not signum:
            return
        self._save()
        raise TrainingInterrupted(f"interrupted at step {self.state['global_step']} ({signal.Signals(signum).name}); "
                                  f"checkpoint saved in {self.run.out / 'checkpoint-last'}: continue with the same command and "
                                  "--resume", signum)


class Trainer(StepTrainer):
    """A fine-tuning run from its settings to its report (`train`); resumed with cfg.resume."""

    def __init__(self, cfg: FinetuneConfig):
        self.requested = cfg

    def setup(self) -> None:
        self.run = run = assemble(self.requested)
        self.cfg = run.cfg
        self.log = RunLog(run.out, run.dist.is_main, open_trackers(run) if run.dist.is_main else None)
        skipped = {"train": run.splits["train"].skipped, "val": run.splits["val"].skipped}
        self.state = resume_run(run) if self.cfg.resume else new_state(skipped)
        apply_patience(self.state, self.cfg)
        # The code this run trained under (plain strings: trainer_state.pt loads weights-only); a
        # resume under other code adds an entry, which the report names.
        ran_on, now = self.state.setdefault("software", []), software()
        if not ran_on or ran_on[-1] != now:
            ran_on.append(now)
        self.log.truncate(self.state["global_step"])
        write_config(run)

    def train(self) -> dict:
        # The output folder is this process's from before the first check to the report.
        with OutputFolder(Path(self.requested.output), enabled=int(os.environ.get("RANK", "0")) == 0):
            self.setup()
            announce(self.run)
            try:
                return self._loop()
            except BaseException as exc:  # the trackers' run ends as the run does; --resume continues it
                self.log.close("KILLED" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)) else "FAILED")
                raise

    def _loop(self) -> dict:
        run, cfg, st = self.run, self.cfg, self.state
        with StopRequests(run.log) as self.stops:
            if st["before"] is None and (cfg.eval_before or cfg.before_metrics is not None):
                st["before"] = evaluate_before(run, self.log)
            run.model.train()
            self.t_start = time.perf_counter() - st["elapsed"]
            with make_progress(disable=not (cfg.progress and run.dist.is_main)) as bar:
                self.epoch_bar = bar.add_task("epochs", total=cfg.epochs, completed=st["epoch"], info="")
                self.step_bar = bar.add_task("steps", total=run.steps_per_epoch, info="")
                done = False
                while st["epoch"] < cfg.epochs and not done:
                    self._stop_if_requested()
                    if (cfg.max_steps and st["global_step"] >= cfg.max_steps) or st["stopped_early"]:
                        break  # a resumed run that had already reached --max-steps or its patience
                    stopped = self._train_one_epoch(bar)
                    done = self._end_of_epoch(stopped, bar)
        self.state["elapsed"] = time.perf_counter() - self.t_start
        return finish(run, self.state, self.log)

    def _end_of_epoch(self, stopped: bool, bar) -> bool:
        """Checkpoint, and evaluate when due (every --eval-every epochs, the last, a stop). True when
        the run ends here."""
        run, cfg, st = self.run, self.cfg, self.state
        # An epoch is complete also when --max-steps lands on its last batch: a resumed run must not
        # evaluate the same weights again as that epoch's end.
        complete = not stopped or st["batch_in_epoch"] >= run.batches_per_epoch
        if complete:
            st["epoch"], st["batch_in_epoch"] = st["epoch"] + 1, 0
        bar.update(self.epoch_bar, completed=st["epoch"])
        if complete and not stopped and st["epoch"] < cfg.epochs and st["epoch"] % cfg.eval_every:
            self._save()
            return False
        tag = f"epoch{st['epoch']:03d}" if complete else f"step{st['global_step']}"
        metrics, improved = evaluate_epoch(run, st, self.log, tag)
        self._save(best=improved)
        run.log(evaluation_line(st, tag, metrics, improved))
        if st["stopped_early"]:
            run.log(st["stopped_early"])
        return stopped or st["stopped_early"] is not None


def finetune(cfg: FinetuneConfig) -> dict:
    """Library entry point of `dapft finetune`: returns the report (before/after metrics, config)."""
    return Trainer(cfg).train()
