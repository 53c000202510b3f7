"""Multi-process runs under `torchrun`: the process group, and the collectives a run uses (gather,
broadcast, the largest value over processes) with the probe for parameters a step leaves
without a gradient. The DAP statistics' own all-reduce is dapft.objective.criterion's."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dapft.utils.signals import end_blocked_sigterm


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine (they share its CPUs for data loading)
    owner: bool = False  # this call made the process group (a sweep's runs share the sweep's)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owner = not dist.is_initialized()
    if owner:
        end_blocked_sigterm()
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", world)), owner)


def parameters_without_gradient(model: torch.nn.Module, inputs: dict, *, modules: tuple = (),
                                amp: torch.dtype | None = None) -> list[str]:
    """The trainable parameters of `model` that one forward and backward of `inputs` (its loss)
    leaves without a gradient: those DistributedDataParallel must be told to look for every step
    (`find_unused_parameters`), which costs a traversal of the autograd graph each step. Found by
    running the model, not listed by hand: it depends on the family, its configuration and the
    loss. Everything is left as it was: weights, gradients, the buffers of `model` and `modules`
    (batch-norm statistics, a matcher's running precision) and the random number generators."""
    owners = (model, *modules)
    buffers = [(b, b.detach().clone()) for m in owners for b in m.buffers()]
    device = next(model.parameters()).device
    was_training = model.training
    model.train()  # as in training: some parts run only then (RT-DETR's denoising queries)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(**inputs).loss
        loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return missing


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_processes(value: int, info: DistInfo) -> int:
    """The largest of every process's `value` (a signal number, 0 for none), on every process: so
    that all stop at the same step."""
    if not info.enabled:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def peer_ended(exc: BaseException) -> bool:
    """A collective's error because another process ended (killed, preempted, its machine lost, or
    failed itself), not this process's own failure."""
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL",
                            "Socket Timeout", "timed out", "ProcessGroup"))


PEER_ENDED = ("another process of this job ended (its machine lost, the process killed, or failed: see its "
              "log), so this one stopped; once every machine is back, continue with the same command and "
              "--resume (a sweep: the same command)")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Ends the process group where `info`'s call made it: a sweep's runs leave the sweep's."""
    if info.enabled and info.owner and dist.is_initialized():
        dist.destroy_process_group()
