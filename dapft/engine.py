"""The two runs the command line starts on a model, as the DETR code's engine holds its training
loop and its evaluation:

- `finetune` (`dapft finetune`): evaluate before, then epochs of steps at the schedule's rate, an
  evaluation every --eval-every epochs and after the last, a resumable checkpoint after every epoch
  (and every --save-every steps), and the report. The run it works on is assembled by
  dapft.assemble; its state is dapft.state's.
- `evaluate_model` (`dapft eval`): one checkpoint on one split, its predictions, metrics and report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from rich.markup import escape

from dapft import distributed as dist_utils
from dapft.assemble import assemble, write_config
from dapft.config import FinetuneConfig, drops_text, lr_factor
from dapft.data import LabelMap, load_split, resolve_split
from dapft.evaluate import Evaluator, check_evaluator, evaluate_split
from dapft.export import load_model
from dapft.gallery import read_evaluation, write_changed, write_worst
from dapft.loader import BatchLoader, CocoDetection, default_num_workers
from dapft.metrics import STAT_NAMES
from dapft.report import model_card, write_eval_report, write_run_report
from dapft.runtime import (OutputFolder, StopRequests, TrainingInterrupted, amp_dtype, console, make_progress,
                           may_stop_now, pick_device, saved_progress, software)
from dapft.state import RunLog, apply_patience, new_state, record_evaluation, resume_run, save_run
from dapft.trackers import Trackers, parse_report_to

__all__ = ["FinetuneConfig", "Trainer", "TrainingInterrupted", "evaluate_model", "finetune"]


def _train_part(metrics: dict) -> str:
    return f"; training subset AP {100 * metrics['train_AP']:.2f}" if "train_AP" in metrics else ""


class Trainer:
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

    # ------------------------------------------------------------------ an epoch and its end
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
            record = _step_record(st, run, values, time.perf_counter() - t_step, images)
            self.log.write(record)
            bar.update(self.step_bar, advance=1, info=_bar_info(record))
            if cfg.save_every and st["global_step"] % cfg.save_every == 0:
                self._save()
            self._stop_if_requested(after_step=True)
            if cfg.max_steps and st["global_step"] >= cfg.max_steps:
                return True
            t_step, images, losses = time.perf_counter(), 0, []
        return False

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
        metrics = evaluate(run, tag)
        self.log.write({"type": "eval", "tag": "epoch", "epoch": st["epoch"], "global_step": st["global_step"],
                        **metrics})
        improved = record_evaluation(st, metrics, tag, cfg)
        self._save(best=improved)
        where = f"step {st['global_step']} (--max-steps)" if tag.startswith("step") else f"epoch {st['epoch']}"
        run.log(f"{where}: AP {100 * metrics['AP']:.2f}" + (" (best so far)" if improved else
                                                            f" (best {100 * st['best_ap']:.2f})") + _train_part(metrics))
        if st["stopped_early"]:
            run.log(st["stopped_early"])
        return stopped or st["stopped_early"] is not None

    # ------------------------------------------------------------------ a step
    def _forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One micro-batch's forward and backward; its loss terms, detached, left on the device."""
        run = self.run
        inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "labels") if k in batch}
        try:
            with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
                out = run.ddp_model(**inputs)
        except (FloatingPointError, ValueError, RuntimeError) as exc:
            diverged = _as_divergence(exc, run, self.state["global_step"] + 1)
            if diverged is None:
                raise
            raise diverged from exc
        run.scaler.scale(out.loss / self.cfg.grad_accum).backward()
        terms = {k: v.detach() for k, v in (out.loss_dict or {}).items() if torch.is_tensor(v) and v.numel() == 1}
        return {**terms, "loss": out.loss.detach()}

    def _optimizer_step(self, terms: dict[str, torch.Tensor], losses: torch.Tensor) -> dict[str, float]:
        """Clip, check, step. The step's loss terms and gradient norm reach the host in one copy: the
        only wait for the device a step has, made before the optimizer so that a NaN never reaches
        the weights (`losses`: every micro-batch's)."""
        run = self.run
        run.scaler.unscale_(run.optimizer)
        clip = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        values = torch.stack([norm.float(), losses.float().abs().max(), *(t.float() for t in terms.values())]).tolist()
        record = {"grad_norm": values[0], **dict(zip(terms, values[2:]))}
        if not math.isfinite(values[1]):
            raise FloatingPointError(f"non-finite loss at step {self.state['global_step'] + 1}: "
                                     f"{ {k: v for k, v in record.items() if k != 'grad_norm'} }; " + _diverged_hint(self.run))
        if not math.isfinite(values[0]) and not run.scaler.is_enabled():
            # Without fp16's scaler (which skips such steps itself) this step would write NaN into
            # every weight and the next forward would fail somewhere far from the cause.
            raise FloatingPointError(f"non-finite gradient at step {self.state['global_step'] + 1}; "
                                     + _diverged_hint(self.run))
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.model)
        return record

    # ------------------------------------------------------------------ saving, stopping
    def _save(self, best: bool = False) -> None:
        self.state["elapsed"] = time.perf_counter() - self.t_start
        run, state = self.run, self.state
        save_run(run, state, best, card=lambda which: model_card(run.cfg, run.family.name, state, which))
        saved_progress()
        self.log.flush()  # what the trackers have never runs ahead of a checkpoint by more than a flush

    def _stop_if_requested(self, after_step: bool = False) -> None:
        """At a step boundary, after Ctrl-C or SIGTERM on any process: save a resumable checkpoint and
        stop (every process at the same step). A SLURM worker's stop waits for a step when nothing
        new is saved yet (runtime.stop_after_progress)."""
        wanted = self.stops.signum if after_step or may_stop_now() else 0
        signum = dist_utils.max_over_processes(wanted, self.run.dist)
        if not signum:
            return
        self._save()
        raise TrainingInterrupted(f"interrupted at step {self.state['global_step']} ({signal.Signals(signum).name}); "
                                  f"checkpoint saved in {self.run.out / 'checkpoint-last'}: continue with the same command and "
                                  "--resume", signum)


def _step_record(st: dict, run, values: dict[str, float], seconds: float, images: int) -> dict:
    """A step's line in log.jsonl: where it is, its rate, its time, and the values the optimizer
    step read back (the gradient norm and the loss terms)."""
    return {"type": "step", "epoch": st["epoch"] + 1, "global_step": st["global_step"],
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": values["grad_norm"],
            "step_seconds": round(seconds, 4), "images_per_second": round(images / max(seconds, 1e-9), 2), **values}


def _bar_info(record: dict) -> str:
    return (f"loss {record['loss']:.4f} · lr {record['lr']:.2e} · {record['images_per_second']:.1f} img/s"
            + (f" · DAP {record['dap']:.3f}" if "dap" in record else ""))


def announce(run) -> None:
    """The run's start lines: what trains how, on what."""
    cfg = run.cfg
    run.log(f"[bold]dapft finetune[/] {escape(cfg.model)} ({run.family.name}) · loss {cfg.loss} · matcher "
            f"{cfg.matcher} · sigma {cfg.sigma} · bins {cfg.bins} · {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} "
            f"· batch {cfg.batch_size} · lr {cfg.lr:g} ({drops_text(cfg)}) · {run.device} x{run.dist.world_size} · "
            f"{cfg.num_workers} data workers")
    run.log(f"{run.freezing.summary()} · " + (
        f"model EMA decay {cfg.ema_decay:g} (warm-up {cfg.extra.get('ema_warmup_steps', 0)} steps): evaluated "
        "and saved" if run.ema is not None else "no model EMA"))


def _as_divergence(exc: Exception, run, step: int) -> FloatingPointError | None:
    """What a failure inside the model's forward and loss is, said with the step: a NaN met by the
    DAP criterion (FloatingPointError, which does not know the step), or by the model's own loss
    code (transformers' box checks raise ValueError with the whole tensor in the message)."""
    if isinstance(exc, FloatingPointError):
        return FloatingPointError(f"step {step}: {exc}; " + _diverged_hint(run))
    if "nan" in str(exc).lower() or not all(torch.isfinite(p).all() for p in run.model.parameters()):
        return FloatingPointError(f"step {step}: the model's outputs are not finite ({type(exc).__name__} in its "
                                  "loss); " + _diverged_hint(run))
    return None


def _diverged_hint(run) -> str:
    saved = (f"the checkpoints in {run.out} are from before it" if (run.out / "checkpoint-last").is_dir()
             else "nothing was saved yet")
    return f"training diverged at lr {run.cfg.lr:g} ({saved}); start again with a lower --lr or --clip-grad-norm"


def evaluate_before(run, log: RunLog) -> dict:
    """The evaluation before fine-tuning (the paper's r_o), or a sweep's shared one with only this
    run's own training subset (--train-eval-images) scored."""
    cfg = run.cfg
    shared = cfg.before_metrics is not None
    before = ({**{k: cfg.before_metrics[k] for k in STAT_NAMES}, **evaluate(run, "before", val=False)}
              if shared else evaluate(run, "before"))
    log.write({"type": "eval", "tag": "before", "epoch": 0, "global_step": 0, **before})
    run.log(f"before fine-tuning: AP {100 * before['AP']:.2f}"
            + (" (the sweep's evaluation, made once)" if shared else "") + _train_part(before))
    return before


def evaluate(run, tag: str, val: bool = True) -> dict:
    """COCO's 12 numbers on the validation split (unless `val` is False), and with
    --train-eval-images the same on the training subset as `train_<name>`."""
    parts = (["val"] if val else []) + (["train_eval"] if run.splits["train_eval"] is not None else [])

    def gather(results: list[dict]) -> list[dict] | None:  # every process's predictions, on the main one
        shards = dist_utils.gather_objects(results, run.dist)
        return [r for shard in shards for r in shard] if run.dist.is_main else None

    stats = {}
    for part in parts:
        prefix = "train_" if part == "train_eval" else ""
        with make_progress(disable=not (run.cfg.progress and run.dist.is_main)) as bar:
            # With EMA the average is what is evaluated and saved: the weights users deploy.
            model = run.ema.module if run.ema is not None else run.model
            metrics = evaluate_split(model, run.processor, run.splits[part], run.label_map, run.loaders[part],
                                     device=run.device, output=run.out / "eval" / (prefix + tag),
                                     evaluator=run.cfg.evaluator, amp_dtype=run.amp, progress=bar, gather=gather)
        # Per-class AP and timings are in eval/<tag>/metrics.json; the run keeps COCO's 12 numbers.
        numbers = dist_utils.broadcast_object(metrics.stats if metrics is not None else None, run.dist)
        stats.update({prefix + k: v for k, v in numbers.items()})
    run.model.train()
    return stats


def finish(run, state: dict, log: RunLog) -> dict:
    """The report (main process), then the processes part."""
    report = {}
    if run.dist.is_main:
        before_eval = run.out / "eval" / "before"
        if not before_eval.is_dir() and run.cfg.before_metrics and run.cfg.before_metrics.get("eval_dir"):
            before_eval = Path(run.cfg.before_metrics["eval_dir"])  # a sweep's, made once in the sweep's folder
        report = write_run_report(run.out, run.cfg, run.family.name, state, run.freezing, before_eval,
                                  _changed_gallery(run, state, before_eval))
        if log.trackers is not None:
            best = run.out / "checkpoint-best"
            log.trackers.summary(summary_values(report))
            log.trackers.files([run.out / name for name in ("report.md", "report.json", "curves.png", "confusion.png")
                                if (run.out / name).is_file()],
                               best if run.cfg.log_checkpoints and best.is_dir() else None)
    dist_utils.barrier(run.dist)
    dist_utils.shutdown(run.dist)
    log.close()
    return report


def _changed_gallery(run, state: dict, before_eval: Path) -> list[tuple[Path, str]]:
    """The before/after pictures of the validation images that changed most (none without both
    evaluations, or with --no-gallery)."""
    history = state["history"]
    if not history or not run.cfg.gallery:
        return []
    before, after = read_evaluation(before_eval), read_evaluation(run.out / "eval" / str(history[-1]["tag"]))
    if before is None or after is None:
        return []
    return write_changed(run.out / "gallery", run.splits["val"], before, after)


def open_trackers(run) -> Trackers | None:
    """The run's trackers (--report-to; TensorBoard where installed by default), with its settings,
    the resolved recipe among them, as parameters."""
    cfg = run.cfg
    names = parse_report_to(cfg.report_to)
    if not names:
        return None
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("before_metrics", "tracker_group", "given")}
    params["recipe"] = params.pop("extra")
    params["family"] = run.family.name
    return Trackers(run.out, names, run_name=run.out.name, params=params, group=cfg.tracker_group)


def summary_values(report: dict) -> dict[str, float]:
    """A run's before / after / best COCO numbers and the change, as the trackers' summary."""
    values = {f"{tag}/{k}": v for tag in ("before", "after", "best") for k, v in (report.get(tag) or {}).items()
              if k in STAT_NAMES}
    if report.get("delta_AP") is not None:
        values["delta/AP"] = report["delta_AP"]
    return values


def finetune(cfg: FinetuneConfig) -> dict:
    """Library entry point of `dapft finetune`: returns the report (before/after metrics, config)."""
    return Trainer(cfg).train()


def evaluate_start(cfg: FinetuneConfig) -> dict:
    """The evaluation before fine-tuning alone, as a run of `cfg` makes it (its assembly, loaders and
    evaluation), into cfg.output/eval/before: a sweep's, made once for all its runs. Returns COCO's
    12 numbers (on every process under torchrun)."""
    run = assemble(dataclasses.replace(cfg, train_eval_images=None, resume=False, report_to="none"))
    stats = evaluate(run, "before")
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs after it need the memory
    return stats


def evaluate_model(model: str, data: str | None = None, *, split: str = "val", images: str | None = None,
                   annotations: str | None = None, output: str | Path = "runs/eval", batch_size: int = 8,
                   evaluator: Evaluator = "hotcoco", max_images: int | None = None,
                   label_map: str | None = None, device: str | None = None, precision: str = "auto",
                   num_workers: int | None = None, progress: bool = True, report_to: str | None = None,
                   gallery: bool = True) -> dict:
    """`dapft eval`: everything checked first, then inference, predictions.json, metrics (with the
    error breakdown), report (with its worst images drawn unless `gallery` is False), and the
    numbers to the trackers (--report-to)."""
    out = Path(output)
    check_evaluator(evaluator)
    trackers = parse_report_to(report_to)  # before any work: an unknown tracker, or one not installed
    if (out / "config.json").is_file() and (out / "log.jsonl").is_file():
        # A fine-tuning run's own report.md and metrics are there: an evaluation must not replace them.
        raise FileExistsError(f"{out}: a fine-tuning run's directory; write this evaluation into a folder of "
                              f"its own, e.g. --output {out / 'eval' / 'dapft-eval'}")
    if (out / "metrics.json").is_file() or (out / "predictions.json").is_file():
        raise FileExistsError(f"{out}: holds an evaluation already (metrics.json, predictions.json); choose another "
                              "--output, or delete it to evaluate again")
    if batch_size < 1 or (num_workers is not None and num_workers < 0):
        raise ValueError(f"--batch-size must be at least 1 and --num-workers at least 0, got {batch_size} and "
                         f"{num_workers}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1 (or left out: every image), got {max_images}")
    dev = pick_device(device)
    amp = amp_dtype(precision, dev)  # an unknown --precision fails here, not after inference
    with OutputFolder(out):
        source = resolve_split(data, split, images, annotations)
        coco = load_split(source, max_images=max_images, progress=progress)
        detector, processor, _family = load_model(model, log=console.print)  # a checkpoint, or an exported file
        mapping = LabelMap.build(coco.categories, detector.config.id2label, label_map, where=str(source.annotations))
        detector.to(dev)
        loader = BatchLoader(CocoDetection(coco, mapping), processor, batch_size=batch_size, train=False,
                             num_workers=default_num_workers(dev) if num_workers is None else num_workers, device=dev)
        with make_progress(disable=not progress) as bar:
            metrics = evaluate_split(detector, processor, coco, mapping, loader, device=dev, output=out,
                                     evaluator=evaluator, amp_dtype=amp, progress=bar)
        info = {"model": model, "annotations": source.annotations, "images": len(coco), "skipped": coco.skipped}
        shown = read_evaluation(out) if gallery else None
        write_eval_report(out, metrics, info, write_worst(out / "gallery", coco, *shown) if shown else [])
        if trackers:
            params = {**info, "annotations": str(source.annotations), "evaluator": evaluator, "batch_size": batch_size,
                      "max_images": max_images, "label_map": label_map, "precision": precision}
            tracked = Trackers(out, trackers, run_name=out.name, params=params, group={"wandb_job_type": "eval"})
            tracked.log({"type": "eval", "global_step": 0, **metrics.stats})
            tracked.summary({f"eval/{k}": v for k, v in metrics.stats.items()})
            tracked.files([out / name for name in ("report.md", "metrics.json", "pr_curves.png", "per_class_ap.png",
                                                   "confusion.png") if (out / name).is_file()])
            tracked.close()
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
