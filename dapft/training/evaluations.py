"""A run's evaluations: before fine-tuning (or a sweep's shared one), at an epoch's end, and on the
training subset (--train-eval-images); every process's predictions gathered on the main one."""

from __future__ import annotations

import dataclasses

import torch

from dapft.analysis.evaluate import evaluate_split
from dapft.analysis.metrics import STAT_NAMES
from dapft.training.assemble import assemble
from dapft.training.config import FinetuneConfig
from dapft.training.state import RunLog, record_evaluation
from dapft.utils import distributed as dist_utils
from dapft.utils.console import make_progress


def train_ap_text(metrics: dict) -> str:
    return f"; training subset AP {100 * metrics['train_AP']:.2f}" if "train_AP" in metrics else ""


def evaluate_before(run, log: RunLog) -> dict:
    """The evaluation before fine-tuning (the paper's r_o), or a sweep's shared one with only this
    run's own training subset (--train-eval-images) scored."""
    cfg = run.cfg
    shared = cfg.before_metrics is not None
    before = ({**{k: cfg.before_metrics[k] for k in STAT_NAMES}, **evaluate(run, "before", val=False)}
              if shared else evaluate(run, "before"))
    log.write({"type": "eval", "tag": "before", "epoch": 0, "global_step": 0, **before})
    run.log(f"before fine-tuning: AP {100 * before['AP']:.2f}"
            + (" (the sweep's evaluation, made once)" if shared else "") + train_ap_text(before))
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


def evaluate_epoch(run, state: dict, log: RunLog, tag: str) -> tuple[dict, bool]:
    """The evaluation at an epoch's end (or at --max-steps, `tag` naming the step), into the log and
    the run's state (its best, its patience): the metrics, and whether they are the best so far."""
    metrics = evaluate(run, tag)
    log.write({"type": "eval", "tag": "epoch", "epoch": state["epoch"], "global_step": state["global_step"],
               **metrics})
    return metrics, record_evaluation(state, metrics, tag, run.cfg)


def evaluation_line(state: dict, tag: str, metrics: dict, improved: bool) -> str:
    where = f"step {state['global_step']} (--max-steps)" if tag.startswith("step") else f"epoch {state['epoch']}"
    return (f"{where}: AP {100 * metrics['AP']:.2f}" + (" (best so far)" if improved else
                                                        f" (best {100 * state['best_ap']:.2f})") + train_ap_text(metrics))


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
