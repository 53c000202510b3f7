"""The assembly of a fine-tuning run from its config: every check first (settings, the output
folder, the data), then the model with its recipe (freezing, EMA, the loss), the optimizer and the
data loaders. What the training loop (dapft.training.trainer) works with is one `Run`."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.markup import escape

from dapft.analysis.evaluate import check_evaluator
from dapft.data.flat_split import CocoSplit, first_images
from dapft.data.labels import LabelMap, read_label_map
from dapft.data.loader import BatchLoader, CocoDetection, EpochSampler, TrainAugmentation, default_num_workers
from dapft.data.splits import load_split, resolve_split
from dapft.modeling.families import Family
from dapft.objective.criterion import DAPCriterion, all_reduce_statistics
from dapft.objective.detection_loss import install_loss
from dapft.training.config import FinetuneConfig, check_choices, resolve, resumed_config
from dapft.training.ema import ModelEMA
from dapft.training.freeze import FreezeReport, FreezeSpec, apply_freezing
from dapft.utils import distributed as dist_utils
from dapft.utils.checkpoint import MANIFEST, find_resumable
from dapft.utils.console import console
from dapft.utils.device import amp_dtype, pick_device, seed_everything
from dapft.utils.files import write_json
from dapft.utils.trackers import parse_report_to


@dataclass
class Run:
    """Everything a fine-tuning run works with."""

    cfg: FinetuneConfig  # resolved: no setting left to the recipe
    out: Path
    dist: dist_utils.DistInfo
    device: torch.device
    log: Callable[..., None]  # the console on the main process, silent on the others
    splits: dict[str, CocoSplit | None]  # train, val, train_eval (--train-eval-images)
    label_map: LabelMap
    family: Family
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # the model, wrapped for DistributedDataParallel under torchrun
    processor: object
    freezing: FreezeReport
    ema: ModelEMA | None
    criterion: DAPCriterion | None  # None: the model's own loss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    sampler: EpochSampler
    loaders: dict[str, BatchLoader | None]  # train, val, train_eval
    batches_per_epoch: int
    steps_per_epoch: int


def assemble(requested: FinetuneConfig) -> Run:
    check_choices(requested)  # instant mistakes first
    check_evaluator(requested.evaluator)
    parse_report_to(requested.report_to)  # an unknown tracker, or one not installed
    device = pick_device(requested.device)
    dist = dist_utils.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(requested.output)
    cfg = _settings_of_this_run(requested, out, dist.is_main)
    splits = _load_data(cfg)  # bad input fails before a model is downloaded or loaded
    seed_everything(cfg.seed)
    log = console.print if dist.is_main else (lambda *a, **k: None)
    cfg, model, processor, family, label_map = _load_model(cfg, splits, log)
    freezing = apply_freezing(model, FreezeSpec.from_recipe(cfg.extra, cfg.freeze_backbone))
    model.to(device)
    # Before the loss is installed: the average is a plain copy of the model, for evaluation.
    ema = ModelEMA(model, cfg.ema_decay, cfg.extra.get("ema_warmup_steps", 0)) if cfg.ema else None
    criterion = None
    if cfg.loss != "original":
        criterion = DAPCriterion(family, model.config, matcher=cfg.matcher, sigma=cfg.sigma, num_bins=cfg.bins,
                                 average=cfg.average, momentum=cfg.momentum,
                                 reduce_stats=all_reduce_statistics,
                                 dap_scale=float(dist.world_size)).to(device)
    install_loss(model, family, cfg.loss, criterion)
    amp = amp_dtype(cfg.precision, device)
    per_process = cfg.batch_size // dist.world_size
    if per_process * dist.world_size != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {dist.world_size} processes")
    ddp_model = _for_ddp(model, criterion, splits["train"], label_map, processor, device, amp, dist, log) \
        if dist.enabled else model
    if cfg.num_workers is None:
        cfg = dataclasses.replace(cfg, num_workers=default_num_workers(device, dist.local_world_size))
    sampler = EpochSampler(len(splits["train"]), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    loaders = _loaders(cfg, splits, label_map, processor, sampler, dist, device)
    batches = math.ceil(len(sampler) / per_process)
    return Run(cfg, out, dist, device, log, splits, label_map, family, model, ddp_model, processor, freezing, ema,
               criterion, _optimizer(model, cfg), torch.amp.GradScaler(enabled=amp == torch.float16), amp, sampler,
               loaders, batches, math.ceil(batches / cfg.grad_accum))


def _for_ddp(model, criterion, train: CocoSplit, label_map: LabelMap, processor, device: torch.device,
             amp: torch.dtype | None, dist: dist_utils.DistInfo, log) -> torch.nn.Module:
    """The model wrapped for DistributedDataParallel. Some configurations leave parameters without
    a gradient (two-stage Deformable DETR's proposal head, which no loss reaches; RF-DETR's mask
    token): DDP must then look for them every step, a traversal of the autograd graph that the
    others should not pay. Which they are is found on a training image of each process."""
    probe = BatchLoader(CocoDetection(train, label_map), processor, batch_size=1, train=False, num_workers=0,
                        sampler=[dist.rank % len(train)], device=device)
    batch = next(iter(probe))
    inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "labels") if k in batch}
    unused = dist_utils.parameters_without_gradient(model, inputs, modules=(criterion,) if criterion else (), amp=amp)
    find_unused = bool(dist_utils.max_over_processes(int(bool(unused)), dist))
    if find_unused and unused:
        log(f"[dim]{len(unused)} parameters get no gradient with this model and loss (e.g. {escape(unused[0])}): "
            "DistributedDataParallel looks for unused parameters every step[/]")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def _settings_of_this_run(requested: FinetuneConfig, out: Path, main: bool) -> FinetuneConfig:
    """The requested settings, or, for --resume, the run's own (config.json) but for what may change.
    A run that started but never saved a checkpoint (killed or failed in its first epoch) has
    nothing to lose: it starts afresh, with the run's settings under --resume."""
    started = (out / "config.json").is_file()
    if started and find_resumable(out) is None:
        cfg = requested
        if requested.resume:
            cfg = dataclasses.replace(resumed_config(requested, _read_config(out), out), resume=False)
        if main:
            console.print(f"{escape(str(out))}: the run there never saved a checkpoint; "
                          + ("resuming it from step 0 with its settings" if requested.resume else "starting it afresh"),
                          highlight=False)
            for stale in ("eval", "tensorboard"):
                shutil.rmtree(out / stale, ignore_errors=True)
            for stale in ("log.jsonl", "config.json"):
                (out / stale).unlink(missing_ok=True)
        return cfg
    if started and not requested.resume:
        raise FileExistsError(f"{out}: a run already exists here; pass --resume to continue it, "
                              "or choose another --output")
    if requested.resume and started:
        return resumed_config(requested, _read_config(out), out, reached=_epoch_reached(find_resumable(out)))
    return requested


def _epoch_reached(checkpoint: Path) -> int:
    """The (0-based) epoch a checkpoint was saved in; 0 where its manifest is unreadable (resuming
    from it then stops on that, with its own message)."""
    try:
        return int(json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _read_config(out: Path) -> dict:
    try:
        return json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out / 'config.json'}: unreadable ({exc}); the run's settings are lost: start a new "
                         "run in another --output") from None


def _load_data(cfg: FinetuneConfig) -> dict[str, CocoSplit | None]:
    train = load_split(resolve_split(cfg.data, "train", cfg.train_images, cfg.train_annotations),
                       max_images=cfg.max_train_images, progress=cfg.progress)
    val = load_split(resolve_split(cfg.data, "val", cfg.val_images, cfg.val_annotations),
                     max_images=cfg.max_eval_images, progress=cfg.progress)
    if cfg.label_map is not None:
        read_label_map(cfg.label_map)  # its form now; whether it fits the model once the model is known
    # A fixed subset of the training images, scored as the validation split is (no augmentation):
    # tells "the loss did not move the model" from "it moved, but the change did not transfer".
    train_eval = first_images(train, cfg.train_eval_images) if cfg.train_eval_images else None
    return {"train": train, "val": val, "train_eval": train_eval}


def _load_model(requested: FinetuneConfig, splits: dict, log):
    """The detector with the label set the data needs, its processor and family; the config with
    the family's recipe filled in."""
    from transformers import AutoConfig

    from dapft.modeling.families import family_of
    from dapft.modeling.loading import load_detector, resolve_model

    categories = splits["train"].categories
    model_cfg = AutoConfig.from_pretrained(resolve_model(requested.model))
    cfg = resolve(requested, family_of(model_cfg).name)
    # Keep the checkpoint's label set when the dataset's classes are all in it (COCO fine-tuning);
    # otherwise resize the classifier to the dataset's classes.
    new_labels = None
    if cfg.label_map is None:
        try:
            LabelMap.build(categories, model_cfg.id2label)
        except ValueError:
            new_labels = {i: c["name"] for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    model, processor, family = load_detector(cfg.model, id2label=new_labels, log=log)
    if new_labels is not None and cfg.loss == "dap":
        log("[yellow]warning[/]: the label set changed and --loss dap gives the new classes no classification "
            "gradient until their matched boxes reach IoU 0.5 (DAP's precision is flat below it); --loss "
            "dap+original trains them from the first step")
    if cfg.extra.get("auxiliary_loss", True):
        model.config.auxiliary_loss = True  # DETR's recipe supervises every decoder layer
    label_map = LabelMap.build(categories, model.config.id2label, cfg.label_map)
    return cfg, model, processor, family, label_map


def _loaders(cfg: FinetuneConfig, splits: dict, label_map: LabelMap, processor, sampler: EpochSampler,
             dist: dist_utils.DistInfo, device: torch.device) -> dict[str, BatchLoader | None]:
    common = dict(batch_size=cfg.batch_size // dist.world_size, num_workers=cfg.num_workers, device=device)
    augment = None
    if cfg.augment:  # the crop's scale from the images' size (DETR: 384-600 px crops of ~800 px images)
        augment = TrainAugmentation(int(splits["train"].sizes[0].max()))
    loaders = {"train": BatchLoader(CocoDetection(splits["train"], label_map, augment), processor,
                                    train=cfg.augment, sampler=sampler, **common)}
    for name in ("val", "train_eval"):
        split = splits[name]
        loaders[name] = None if split is None else BatchLoader(
            CocoDetection(split, label_map), processor, train=False,
            sampler=list(range(len(split)))[dist.rank :: dist.world_size], **common)
    return loaders


def _optimizer(model, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    # Deformable DETR's official configs train the deformable sampling offsets and reference points
    # at a tenth of the rate (lr_linear_proj_mult): a recipe's linear_proj_lr_multiplier, matched by
    # parameter name as the original code does.
    proj_names = tuple(cfg.extra.get("linear_proj_names", ("sampling_offsets", "reference_points")))
    multipliers = {"rest": 1.0, "backbone": cfg.backbone_lr_multiplier,
                   "linear_proj": float(cfg.extra.get("linear_proj_lr_multiplier", 1.0))}
    params: dict[str, list] = {k: [] for k in multipliers}
    for name, p in model.named_parameters():
        if p.requires_grad:
            projection = multipliers["linear_proj"] != 1.0 and any(n in name for n in proj_names)
            group = "backbone" if "backbone" in name else "linear_proj" if projection else "rest"
            params[group].append(p)
    groups = [{"params": params[k], "lr": cfg.lr * m, "base_lr": cfg.lr * m, "name": k}
              for k, m in multipliers.items() if params[k] or k == "rest"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def write_config(run: Run) -> None:
    """config.json: every setting of the run as resolved, which --resume continues with."""
    if run.dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "config.json", {**dataclasses.asdict(run.cfg), "family": run.family.name,
                                             "world_size": run.dist.world_size,
                                             "num_labels": len(run.model.config.id2label),
                                             "parameters": dataclasses.asdict(run.freezing)})
