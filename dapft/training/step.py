"""One optimizer step: forward and backward of each micro-batch, the checks that stop a diverging
run before a NaN reaches the weights, clipping, the optimizer and the model EMA; and the step's line
in log.jsonl."""

from __future__ import annotations

import math

import torch


def forward_backward(run, batch: dict, step: int, grad_accum: int) -> dict[str, torch.Tensor]:
    """One micro-batch's forward and backward (of optimizer step `step`, counted from 1); its loss
    terms, detached, left on the device."""
    inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "labels") if k in batch}
    try:
        with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            out = run.ddp_model(**inputs)
    except (FloatingPointError, ValueError, RuntimeError) as exc:
        diverged = as_divergence(exc, run, step)
        if diverged is None:
            raise
        raise diverged from exc
    run.scaler.scale(out.loss / grad_accum).backward()
    terms = {k: v.detach() for k, v in (out.loss_dict or {}).items() if torch.is_tensor(v) and v.numel() == 1}
    return {**terms, "loss": out.loss.detach()}


def optimizer_step(run, terms: dict[str, torch.Tensor], losses: torch.Tensor, step: int,
                   clip_grad_norm: float) -> dict[str, float]:
    """Clip, check, step. The step's loss terms and gradient norm reach the host in one copy: the
    only wait for the device a step has, made before the optimizer so that a NaN never reaches
    the weights (`losses`: every micro-batch's)."""
    run.scaler.unscale_(run.optimizer)
    clip = clip_grad_norm if clip_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    values = torch.stack([norm.float(), losses.float().abs().max(), *(t.float() for t in terms.values())]).tolist()
    record = {"grad_norm": values[0], **dict(zip(terms, values[2:]))}
    if not math.isfinite(values[1]):
        raise FloatingPointError(f"non-finite loss at step {step}: "
                                 f"{ {k: v for k, v in record.items() if k != 'grad_norm'} }; " + diverged_hint(run))
    if not math.isfinite(values[0]) and not run.scaler.is_enabled():
        # Without fp16's scaler (which skips such steps itself) this step would write NaN into
        # every weight and the next forward would fail somewhere far from the cause.
        raise FloatingPointError(f"non-finite gradient at step {step}; " + diverged_hint(run))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return record


def as_divergence(exc: Exception, run, step: int) -> FloatingPointError | None:
    """What a failure inside the model's forward and loss is, said with the step: a NaN met by the
    DAP criterion (FloatingPointError, which does not know the step), or by the model's own loss
    code (transformers' box checks raise ValueError with the whole tensor in the message)."""
    if isinstance(exc, FloatingPointError):
        return FloatingPointError(f"step {step}: {exc}; " + diverged_hint(run))
    if "nan" in str(exc).lower() or not all(torch.isfinite(p).all() for p in run.model.parameters()):
        return FloatingPointError(f"step {step}: the model's outputs are not finite ({type(exc).__name__} in its "
                                  "loss); " + diverged_hint(run))
    return None


def diverged_hint(run) -> str:
    saved = (f"the checkpoints in {run.out} are from before it" if (run.out / "checkpoint-last").is_dir()
             else "nothing was saved yet")
    return f"training diverged at lr {run.cfg.lr:g} ({saved}); start again with a lower --lr or --clip-grad-norm"


def step_record(st: dict, run, values: dict[str, float], seconds: float, images: int) -> dict:
    """A step's line in log.jsonl: where it is, its rate, its time, and the values the optimizer
    step read back (the gradient norm and the loss terms)."""
    return {"type": "step", "epoch": st["epoch"] + 1, "global_step": st["global_step"],
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": values["grad_norm"],
            "step_seconds": round(seconds, 4), "images_per_second": round(images / max(seconds, 1e-9), 2), **values}


def bar_info(record: dict) -> str:
    return (f"loss {record['loss']:.4f} · lr {record['lr']:.2e} · {record['images_per_second']:.1f} img/s"
            + (f" · DAP {record['dap']:.3f}" if "dap" in record else ""))
