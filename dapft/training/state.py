"""A run's state: its counters and evaluation history (what `checkpoint-last/trainer_state.pt`
carries with the optimizer, EMA, matcher and RNG states), the evaluation policy (best AP,
`--patience`), saving and resuming, and the step log `log.jsonl`."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.markup import escape

from dapft.utils.checkpoint import (
    CheckpointError,
    find_resumable,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from dapft.utils.distributed import gather_objects


def new_state(skipped: dict) -> dict:
    """The counters of a run that has not started. Plain values only: trainer_state.pt loads with
    torch.load(weights_only=True), so resuming runs no pickled code."""
    return {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best_ap": -1.0, "history": [], "before": None,
            "elapsed": 0.0, "evals_since_best": 0, "stopped_early": None, "skipped": skipped}


def record_evaluation(state: dict, metrics: dict, tag: str, cfg) -> bool:
    """The evaluation and checkpoint policy: add an evaluation to the run's history, keep the best
    AP (its weights become checkpoint-best), and apply --patience. Returns whether AP improved."""
    state["history"].append({"epoch": state["epoch"], "global_step": state["global_step"], "tag": tag, **metrics})
    improved = metrics["AP"] > state["best_ap"]
    if improved:
        state["best_ap"], state["evals_since_best"] = metrics["AP"], 0
    else:
        state["evals_since_best"] += 1
    apply_patience(state, cfg)
    return improved


def apply_patience(state: dict, cfg) -> None:
    """Whether --patience stops the run now; a resumed run applies its own --patience afresh, so a
    run stopped early trains again when resumed with more patience (or none)."""
    if cfg.patience and state["evals_since_best"] >= cfg.patience and state["epoch"] < cfg.epochs:
        state["stopped_early"] = (f"stopped early after epoch {state['epoch']}: {cfg.patience} evaluations "
                                  f"without a better AP (--patience {cfg.patience})")
    else:
        state["stopped_early"] = None


def _rng_state() -> dict:
    # Tensors, numbers and tuples only, so that trainer_state.pt loads with weights_only=True.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _every_process_rng(dist) -> list[dict]:
    """Every process's generator states, on the main process: they part ways as each draws for its
    own images (RT-DETR's denoising noise is as long as its boxes), and a resume gives each its own
    back. Gathered as torch.save's bytes (the collective's pickling of the tensors fails)."""
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gather_objects(buffer.getvalue(), dist)]


def save_run(run, state: dict, best: bool = False, card: Callable[[str], str] | None = None) -> None:
    """checkpoint-last (and checkpoint-best): the evaluated weights (the EMA when on) as a
    save_pretrained directory, and in checkpoint-last everything needed to continue exactly.
    `card(which)` writes each one's README.md ('last' or 'best'): the report layer's model card,
    passed in so that the state stays below the report that reads it."""
    rngs = _every_process_rng(run.dist)
    if not run.dist.is_main:
        return
    ema = run.ema is not None
    weights = run.ema.module if ema else run.model
    trainer_state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "criterion": run.criterion.state_dict() if run.criterion is not None else None,
                     "model": run.model.state_dict() if ema else None,  # the raw weights the optimizer works on
                     "ema": run.ema.state_dict() if ema else None, "state": state, "rng": rngs[0],
                     "rng_by_rank": rngs}
    info = {"saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": state["epoch"],
            "global_step": state["global_step"], "weights": "ema" if ema else "model"}
    save_checkpoint(run.out / "checkpoint-last", weights, run.processor, trainer_state, info,
                    card=card("last") if card else None)
    if best:
        save_checkpoint(run.out / "checkpoint-best", weights, run.processor, None, {**info, "AP": state["best_ap"]},
                        card=card("best") if card else None)


def resume_run(run) -> dict:
    """Load checkpoint-last into the run's model, EMA, optimizer, scaler and matcher; restore the RNGs;
    return the run's state."""
    from transformers import AutoModelForObjectDetection

    ckpt = find_resumable(run.out)
    if ckpt is None:
        raise CheckpointError(f"{run.out}: --resume given but there is no checkpoint-last to resume from")
    manifest = verify_checkpoint(ckpt)
    trainer_state = load_trainer_state(ckpt)
    saved = AutoModelForObjectDetection.from_pretrained(ckpt)
    if (trainer_state.get("ema") is not None) != (run.ema is not None):
        had = "with" if trainer_state.get("ema") is not None else "without"
        raise CheckpointError(f"{ckpt}: the run was trained {had} model EMA; resume it with "
                              f"{'--ema' if had == 'with' else '--no-ema'} (a run's recipe cannot change midway)")
    if run.ema is not None:  # the checkpoint's model is the average; the raw weights are kept apart
        run.ema.load_state_dict(trainer_state["ema"], saved.state_dict())
        run.model.load_state_dict(trainer_state["model"])
    else:
        run.model.load_state_dict(saved.state_dict())
    run.optimizer.load_state_dict(trainer_state["optimizer"])
    run.scaler.load_state_dict(trainer_state["scaler"])
    if run.criterion is not None and trainer_state.get("criterion") is not None:
        run.criterion.load_state_dict(trainer_state["criterion"])
    state = {"evals_since_best": 0, "stopped_early": None, **trainer_state["state"]}
    by_rank = trainer_state.get("rng_by_rank") or []
    # Each process its own; under another number of processes (or from a checkpoint that kept only
    # the main process's) the main process's, as one process's run would continue.
    _set_rng_state(by_rank[run.dist.rank] if len(by_rank) == run.dist.world_size else trainer_state["rng"])
    run.log(f"resuming from {escape(str(ckpt))} (epoch {state['epoch'] + 1}, step {state['global_step']}, "
            f"saved {manifest.get('saved_at', '?')})")
    return state


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl. A line a kill cut short (the last one) is not a record: dropped."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class RunLog:
    """log.jsonl (every step and every evaluation, one JSON object a line), and the same records to
    the run's trackers (dapft.utils.trackers); written by the main process only."""

    def __init__(self, out: Path, enabled: bool, trackers=None):
        self.path, self.enabled, self.trackers = out / "log.jsonl", enabled, trackers

    def truncate(self, global_step: int) -> None:
        """Forget what an interrupted run logged after the checkpoint it resumes from."""
        if not (self.enabled and self.path.exists()):
            return
        from dapft.utils.files import atomic_write_text

        keep = [json.dumps(r) for r in read_log(self.path) if r.get("global_step", 0) <= global_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def flush(self) -> None:
        """At a checkpoint: the trackers get every step it holds."""
        if self.trackers is not None:
            self.trackers.flush()

    def close(self, status: str = "FINISHED") -> None:
        if self.trackers is not None:
            self.trackers.close(status)
