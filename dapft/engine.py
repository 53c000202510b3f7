"""The fine-tuning engine behind `dapft finetune`: the paper's schedule (sec. 4.1) from a recipe,
evaluation before training and after every epoch, atomic resumable checkpoints, logs and report."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.markup import escape

from dapft import distributed as dist_utils
from dapft.checkpoint import CheckpointError, find_resumable, load_trainer_state, save_checkpoint, verify_checkpoint
from dapft.criterion import LOSS_CONFIGS, DAPCriterion, install_loss
from dapft.data import CocoDetection, EpochSampler, LabelMap, first_images, load_split, make_loader, resolve_split
from dapft.ema import ModelEMA
from dapft.evaluate import check_evaluator, evaluate_split
from dapft.freeze import FreezeSpec, apply_freezing
from dapft.metrics import STAT_NAMES
from dapft.models import load_detector
from dapft.runtime import (amp_dtype, atomic_write_text, check_writable, console, make_progress, pick_device,
                           seed_everything, write_json)

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class FinetuneConfig:
    """Every setting of a run. None means: taken from the family's recipe (recipes/<family>.yaml)."""

    model: str
    data: str | None = None
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    output: str = "runs/finetune"
    loss: str = "dap"
    # The model's own matcher by default: on our benchmark the paper's IoU-only `constant` cost hands
    # ground truths to queries the model does not rank first and lost AP (REPRODUCTION.md).
    matcher: str = "original"
    sigma: float = 0.05
    bins: int = 256
    average: str = "pooled"
    momentum: float = 0.99
    epochs: int | None = None
    # The rate drops tenfold after this many epochs (DETR's --lr_drop); None: for the last epoch only
    # (the paper's fine-tuning schedule). From-scratch trainings use it for a step schedule.
    lr_drop: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None  # the fine-tuning rate; default pretrain_lr / 10
    backbone_lr_multiplier: float | None = None
    weight_decay: float | None = None
    clip_grad_norm: float | None = None
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    num_workers: int = 2
    augment: bool = True
    eval_before: bool = True
    eval_every: int = 1  # evaluate every N epochs, and always after the last
    max_eval_images: int | None = None
    max_train_images: int | None = None
    train_eval_images: int | None = None  # also score this many training images (the first by id) at each evaluation
    evaluator: str = "faster-coco-eval"
    save_every: int | None = None  # also checkpoint every N optimizer steps (mid-epoch)
    label_map: str | None = None
    recipe: str | None = None
    resume: bool = False
    progress: bool = True
    # True: the whole backbone frozen; False: all its stages train (norm layers: the recipe's); None: the recipe
    freeze_backbone: bool | None = None
    ema: bool | None = None  # model EMA on/off; None: the recipe's (on for RT-DETR, D-FINE, LW, RF)
    ema_decay: float | None = None
    patience: int | None = None  # stop after this many evaluations without a better AP
    before_metrics: dict | None = None  # the evaluation before fine-tuning, when already made (a sweep's)
    command: str | None = None  # how the run was started, for reports and model cards
    given: tuple[str, ...] | None = None  # settings the user gave (the CLI's flags); None: all non-defaults
    extra: dict = field(default_factory=dict)


# What `--resume` may change: where and how the run reports and works, and when it stops. Everything
# else (model, data, loss and its settings, schedule, recipe, precision) is the run's: a resumed run
# takes it from the run's config.json, and a flag that asks for another value is refused by name.
RESUMABLE_CHANGES = ("progress", "num_workers", "save_every", "eval_every", "device", "max_steps", "patience")
# Where the run is and how it was asked for; a sweep's shared evaluation before fine-tuning.
_NOT_SETTINGS = ("output", "resume", "command", "given", "extra", "before_metrics")


def _as_flag(name: str, value) -> str:
    """A setting as the command line writes it: `--lr 0.001`, `--no-augment`, `--train-backbone`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        if name == "freeze_backbone":
            return "--freeze-backbone" if value else "--train-backbone"
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def resumed_config(requested: FinetuneConfig, saved: dict, where: Path) -> FinetuneConfig:
    """The config a resumed run continues with: the run's own, but for RESUMABLE_CHANGES."""
    may_change = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES)
    defaults = FinetuneConfig(model=requested.model)
    out = dataclasses.replace(requested)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in RESUMABLE_CHANGES or f.name in _NOT_SETTINGS or f.name not in saved:
            continue
        asked = getattr(requested, f.name)
        given = f.name in requested.given if requested.given is not None else asked != getattr(defaults, f.name)
        if given and asked != saved[f.name]:
            raise ValueError(f"{where}: {_as_flag(f.name, asked)} differs from the run's "
                             f"{_as_flag(f.name, saved[f.name])}; a resumed run keeps its settings (only "
                             f"{may_change} may change): drop the flag, or start a new run in another --output")
        setattr(out, f.name, saved[f.name])
    return out


MODEL_RECIPE = "dapft_recipe.yaml"  # a checkpoint may carry its own recipe (the bundled ones do)


def load_recipe(family: str, recipe: str | None = None, model: str | None = None) -> dict:
    """--recipe FILE, else the checkpoint's own dapft_recipe.yaml, else recipes/<family>.yaml."""
    from dapft.models import resolve_model

    own = Path(resolve_model(model)) / MODEL_RECIPE if model else None
    path = Path(recipe) if recipe else (own if own is not None and own.is_file() else RECIPES_DIR / f"{family}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe not found" + ("" if recipe else f" for family {family}"))
    data = yaml.safe_load(path.read_text()) or {}
    required = ("pretrain_lr", "epochs", "batch_size")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: recipe lacks {missing}; see recipes/detr.yaml for the fields")
    return data


def check_choices(cfg: FinetuneConfig) -> None:
    if cfg.loss not in LOSS_CONFIGS:
        raise ValueError(f"--loss must be one of {', '.join(LOSS_CONFIGS)}, got {cfg.loss!r}")
    if cfg.matcher not in ("constant", "momentum", "original"):
        raise ValueError(f"--matcher must be constant, momentum or original, got {cfg.matcher!r}")
    if cfg.average not in ("pooled", "per_class"):
        raise ValueError(f"--average must be pooled or per_class, got {cfg.average!r}")
    check_evaluator(cfg.evaluator)
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {cfg.precision!r}")
    for name, low in _AT_LEAST.items():  # None means: the recipe's value, or no limit
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for name, zero_allowed in (("sigma", False), ("ema_decay", False), ("momentum", True)):
        value = getattr(cfg, name)
        if value is not None and not ((value >= 0 if zero_allowed else value > 0) and value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must lie in {'[0, 1)' if zero_allowed else '(0, 1)'}, "
                             f"got {value}")


# Lower bounds of the numeric settings (0 steps, epochs or images would silently mean the recipe's
# value, no limit, or an AP computed on nothing).
_AT_LEAST = {"epochs": 1, "lr_drop": 1, "eval_every": 1, "max_steps": 1, "batch_size": 1, "grad_accum": 1, "bins": 2, "max_eval_images": 1,
             "max_train_images": 1, "train_eval_images": 1, "save_every": 1, "patience": 1, "num_workers": 0, "lr": 0.0,
             "backbone_lr_multiplier": 0.0, "weight_decay": 0.0, "clip_grad_norm": 0.0}


def resolve(cfg: FinetuneConfig, family: str) -> FinetuneConfig:
    """Fill what the user left unset from the recipe, following the paper's schedule."""
    check_choices(cfg)
    recipe = load_recipe(family, cfg.recipe, cfg.model)
    out = dataclasses.replace(cfg)
    out.epochs = cfg.epochs or min(12, recipe["epochs"])
    out.batch_size = cfg.batch_size or recipe["batch_size"]
    out.lr = cfg.lr if cfg.lr is not None else recipe["pretrain_lr"] / 10
    out.backbone_lr_multiplier = (cfg.backbone_lr_multiplier if cfg.backbone_lr_multiplier is not None
                                  else recipe.get("backbone_lr_multiplier", 0.1))
    out.weight_decay = cfg.weight_decay if cfg.weight_decay is not None else recipe.get("weight_decay", 1e-4)
    out.clip_grad_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else recipe.get("clip_grad_norm", 0.1)
    # EMA: the recipe's (its authors' training), unless --ema/--no-ema or --ema-decay say otherwise.
    out.ema = cfg.ema if cfg.ema is not None else (cfg.ema_decay is not None or recipe.get("ema_decay") is not None)
    out.ema_decay = (cfg.ema_decay or recipe.get("ema_decay") or 0.9999) if out.ema else None
    out.extra = {**recipe, **cfg.extra}
    return out


def lr_factor(epoch: int, epochs: int, lr_drop: int | None = None) -> float:
    """The factor on cfg.lr in (0-based) `epoch`: 0.1 once `lr_drop` epochs are done. By default the
    drop comes for the last epoch only (the paper: a tenth of the original rate, in cfg.lr, then a
    hundredth in the last epoch); a one-epoch run keeps cfg.lr, since dropping would leave no epoch
    at the fine-tuning rate at all."""
    if lr_drop is None:
        lr_drop = epochs - 1 if epochs >= 2 else epochs
    return 0.1 if epoch >= lr_drop else 1.0


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


def record_evaluation(state: dict, metrics: dict, tag: str, cfg: FinetuneConfig) -> bool:
    """The evaluation and checkpoint policy: add an evaluation to the run's history, keep the best
    AP (its weights become checkpoint-best), and apply --patience. Returns whether AP improved."""
    state["history"].append({"epoch": state["epoch"], "global_step": state["global_step"], "tag": tag, **metrics})
    improved = metrics["AP"] > state["best_ap"]
    if improved:
        state["best_ap"], state["evals_since_best"] = metrics["AP"], 0
    else:
        state["evals_since_best"] += 1
    if cfg.patience and state["evals_since_best"] >= cfg.patience and state["epoch"] < cfg.epochs:
        state["stopped_early"] = (f"stopped early after epoch {state['epoch']}: {cfg.patience} evaluations "
                                  f"without a better AP (--patience {cfg.patience})")
    return improved


def _train_part(metrics: dict) -> str:
    return f"; training subset AP {100 * metrics['train_AP']:.2f}" if "train_AP" in metrics else ""


class TrainingInterrupted(Exception):
    """Ctrl-C during fine-tuning, raised once a resumable checkpoint of the last step is saved."""


class _CtrlC:
    """SIGINT handling for the length of a run: the first Ctrl-C asks the loop to save a resumable
    checkpoint at the next step boundary and stop; a second one stops at once."""

    def __init__(self, log):
        self.count, self.log, self.previous = 0, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        self.log("interrupted: saving a resumable checkpoint at the end of this step (Ctrl-C again to quit "
                 "at once, losing the steps since the last checkpoint)")


class Trainer:
    def __init__(self, cfg: FinetuneConfig):
        self.requested = cfg
        self.out = Path(cfg.output)

    # ------------------------------------------------------------------ set-up (all checks first)
    def setup(self) -> None:
        cfg = self.requested
        check_choices(cfg)  # instant mistakes first
        self.device = pick_device(cfg.device)
        self.dist = dist_utils.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.log = console.print if self.dist.is_main else (lambda *a, **k: None)
        if self.out.exists() and any(self.out.iterdir()) and not cfg.resume and (self.out / "config.json").exists():
            raise FileExistsError(f"{self.out}: a run already exists here; pass --resume to continue it, "
                                  "or choose another --output")
        if cfg.resume and (self.out / "config.json").is_file():
            cfg = self.requested = resumed_config(cfg, json.loads((self.out / "config.json").read_text()), self.out)
        # Data first: bad input must fail before a model is downloaded or loaded.
        train_src = resolve_split(cfg.data, "train", cfg.train_images, cfg.train_annotations)
        val_src = resolve_split(cfg.data, "val", cfg.val_images, cfg.val_annotations)
        self.train_split = load_split(train_src, max_images=cfg.max_train_images, progress=cfg.progress)
        self.val_split = load_split(val_src, max_images=cfg.max_eval_images, progress=cfg.progress)
        # A fixed subset of the training images, scored as the validation split is (no augmentation):
        # tells "the loss did not move the model" from "it moved, but the change did not transfer".
        self.train_eval_split = (first_images(self.train_split, cfg.train_eval_images)
                                 if cfg.train_eval_images else None)
        if self.dist.is_main:
            check_writable(self.out)  # a read-only or full disk shows now, not at the first checkpoint

        seed_everything(cfg.seed)
        id2label = {i: c["name"] for i, c in enumerate(sorted(self.train_split.categories, key=lambda c: c["id"]))}
        from transformers import AutoConfig

        from dapft.models import family_of, resolve_model

        model_cfg = AutoConfig.from_pretrained(resolve_model(cfg.model))
        family = family_of(model_cfg)
        self.cfg = resolve(cfg, family.name)
        # Keep the checkpoint's label set when the dataset's classes are all in it (COCO fine-tuning);
        # otherwise resize the classifier to the dataset's classes.
        new_labels = None
        if cfg.label_map is None:
            try:
                LabelMap.build(self.train_split.categories, model_cfg.id2label)
            except ValueError:
                new_labels = id2label
        self.model, self.processor, self.family = load_detector(cfg.model, id2label=new_labels, log=self.log)
        if new_labels is not None and self.cfg.loss == "dap":
            self.log("[yellow]warning[/]: the label set changed and --loss dap gives the new classes no "
                     "classification gradient until their matched boxes reach IoU 0.5 (DAP's precision is flat "
                     "below it); --loss dap+original trains them from the first step")
        if self.cfg.extra.get("auxiliary_loss", True):
            self.model.config.auxiliary_loss = True  # DETR's recipe supervises every decoder layer
        self.label_map = LabelMap.build(self.train_split.categories, self.model.config.id2label, cfg.label_map)
        self.freezing = apply_freezing(self.model, FreezeSpec.from_recipe(self.cfg.extra, self.cfg.freeze_backbone))
        self.model.to(self.device)
        # Before the loss is installed: the average is a plain copy of the model, for evaluation.
        self.ema = (ModelEMA(self.model, self.cfg.ema_decay, self.cfg.extra.get("ema_warmup_steps", 0))
                    if self.cfg.ema else None)

        scale = float(self.dist.world_size)
        self.criterion = None
        if self.cfg.loss != "original":
            self.criterion = DAPCriterion(
                self.family, self.model.config, matcher=self.cfg.matcher, sigma=self.cfg.sigma,
                num_bins=self.cfg.bins, average=self.cfg.average, momentum=self.cfg.momentum,
                reduce_stats=dist_utils.all_reduce_statistics, dap_scale=scale).to(self.device)
        install_loss(self.model, self.family, self.cfg.loss, self.criterion)
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = _optimizer(self.model, self.cfg)
        self.amp = amp_dtype(self.cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)

        per_process = self.cfg.batch_size // self.dist.world_size
        if per_process * self.dist.world_size != self.cfg.batch_size:
            raise ValueError(f"--batch-size {self.cfg.batch_size} is not divisible by {self.dist.world_size} processes")
        self.sampler = EpochSampler(len(self.train_split.images), seed=self.cfg.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.train_loader = make_loader(CocoDetection(self.train_split, self.label_map, self._augment()),
                                        self.processor, batch_size=per_process, train=self.cfg.augment,
                                        num_workers=self.cfg.num_workers, sampler=self.sampler)
        val_sampler = list(range(len(self.val_split.images)))[self.dist.rank :: self.dist.world_size]
        self.val_loader = make_loader(CocoDetection(self.val_split, self.label_map), self.processor,
                                      batch_size=per_process, train=False, num_workers=self.cfg.num_workers,
                                      sampler=val_sampler)
        self.train_eval_loader = None
        if self.train_eval_split is not None:
            self.train_eval_loader = make_loader(
                CocoDetection(self.train_eval_split, self.label_map), self.processor, batch_size=per_process,
                train=False, num_workers=self.cfg.num_workers,
                sampler=list(range(len(self.train_eval_split.images)))[self.dist.rank :: self.dist.world_size])
        self.batches_per_epoch = math.ceil(len(self.sampler) / per_process)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.grad_accum)

        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best_ap": -1.0, "history": [],
                      "before": None, "elapsed": 0.0, "evals_since_best": 0, "stopped_early": None,
                      "skipped": {"train": self.train_split.skipped, "val": self.val_split.skipped}}
        if cfg.resume:
            self._resume()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", {**dataclasses.asdict(self.cfg), "family": self.family.name,
                                                  "world_size": self.dist.world_size,
                                                  "num_labels": len(self.model.config.id2label),
                                                  "parameters": dataclasses.asdict(self.freezing)})

    def _augment(self):
        if not self.cfg.augment:
            return None
        from dapft.data import train_augmentation

        size = max(self.train_split.images[0]["width"], self.train_split.images[0]["height"])
        return train_augmentation(size)

    def _resume(self) -> None:
        ckpt = find_resumable(self.out)
        if ckpt is None:
            raise CheckpointError(f"{self.out}: --resume given but there is no checkpoint-last to resume from")
        manifest = verify_checkpoint(ckpt)
        trainer_state = load_trainer_state(ckpt)
        from transformers import AutoModelForObjectDetection

        saved = AutoModelForObjectDetection.from_pretrained(ckpt)
        if (trainer_state.get("ema") is not None) != (self.ema is not None):
            had = "with" if trainer_state.get("ema") is not None else "without"
            raise CheckpointError(f"{ckpt}: the run was trained {had} model EMA; resume it with "
                                  f"{'--ema' if had == 'with' else '--no-ema'} (a run's recipe cannot change midway)")
        if self.ema is not None:  # the checkpoint's model is the average; the raw weights are kept apart
            self.ema.load_state_dict(trainer_state["ema"], saved.state_dict())
            self.model.load_state_dict(trainer_state["model"])
        else:
            self.model.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scaler.load_state_dict(trainer_state["scaler"])
        if self.criterion is not None and trainer_state.get("criterion") is not None:
            self.criterion.load_state_dict(trainer_state["criterion"])
        self.state = {"evals_since_best": 0, "stopped_early": None, **trainer_state["state"]}
        _set_rng_state(trainer_state["rng"])
        self.log(f"resuming from {escape(str(ckpt))} (epoch {self.state['epoch'] + 1}, step {self.state['global_step']}, "
                 f"saved {manifest.get('saved_at', '?')})")
        # Forget log lines the interrupted run wrote after this checkpoint.
        log = self.out / "log.jsonl"
        if log.exists() and self.dist.is_main:
            keep = [line for line in log.read_text().splitlines()
                    if json.loads(line).get("global_step", 0) <= self.state["global_step"]]
            atomic_write_text(log, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop
    def evaluate(self, tag: str, val: bool = True) -> dict:
        """COCO's 12 numbers on the validation split (unless `val` is False), and with
        --train-eval-images the same on the training subset as `train_<name>`."""
        splits = ([("", self.val_split, self.val_loader)] if val else []) + (
            [("train_", self.train_eval_split, self.train_eval_loader)] if self.train_eval_split is not None else [])
        stats = {}
        for prefix, split, loader in splits:
            with make_progress(disable=not (self.cfg.progress and self.dist.is_main)) as bar:
                # With EMA the average is what is evaluated and saved: the weights users deploy.
                model = self.ema.module if self.ema is not None else self.model
                metrics = evaluate_split(model, self.processor, split, self.label_map, loader,
                                         device=self.device, output=self.out / "eval" / (prefix + tag),
                                         evaluator=self.cfg.evaluator, amp_dtype=self.amp, progress=bar,
                                         gather=self._gather)
            # Per-class AP and timings are in eval/<tag>/metrics.json; the run keeps COCO's 12 numbers.
            part = dist_utils.broadcast_object(metrics.stats if metrics is not None else None, self.dist)
            stats.update({prefix + k: v for k, v in part.items()})
        self.model.train()
        return stats

    def _gather(self, results: list[dict]) -> list[dict] | None:
        parts = dist_utils.gather_objects(results, self.dist)
        return [r for part in parts for r in part] if self.dist.is_main else None

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("global_step", "epoch"):
                        self.tb.add_scalar(f"{record['type']}/{k}", v, record.get("global_step", 0))

    def _save(self, best: bool = False) -> None:
        if not self.dist.is_main:
            return
        from dapft.report import model_card

        # The checkpoint's model is what is evaluated (the EMA when on); the raw weights the
        # optimizer works on then travel in the trainer state, with the EMA's own state.
        ema = self.ema is not None
        weights = self.ema.module if ema else self.model
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "criterion": self.criterion.state_dict() if self.criterion is not None else None,
                         "model": self.model.state_dict() if ema else None,
                         "ema": self.ema.state_dict() if ema else None,
                         "state": self.state, "rng": _rng_state()}
        info = {"saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": self.state["epoch"],
                "global_step": self.state["global_step"], "weights": "ema" if ema else "model"}
        card = lambda which: model_card(self.cfg, self.family.name, self.state, which)  # noqa: E731
        save_checkpoint(self.out / "checkpoint-last", weights, self.processor, trainer_state, info, card=card("last"))
        if best:
            save_checkpoint(self.out / "checkpoint-best", weights, self.processor, None,
                            {**info, "AP": self.state["best_ap"]}, card=card("best"))

    def train(self) -> dict:
        self.setup()
        cfg, st = self.cfg, self.state
        self.tb = None
        if self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                pass
        self.log(f"[bold]dapft finetune[/] {escape(cfg.model)} ({self.family.name}) · loss {cfg.loss} · matcher {cfg.matcher} · "
                 f"sigma {cfg.sigma} · bins {cfg.bins} · {cfg.epochs} epochs · batch {cfg.batch_size} · lr {cfg.lr:g} "
                 f"· {self.device} x{self.dist.world_size}")
        self.log(f"{self.freezing.summary()} · "
                 + (f"model EMA decay {cfg.ema_decay:g} (warm-up {cfg.extra.get('ema_warmup_steps', 0)} steps): "
                    "evaluated and saved" if self.ema is not None else "no model EMA"))
        with _CtrlC(self.log) as self._ctrl_c:
            if st["before"] is None and (cfg.eval_before or cfg.before_metrics is not None):
                shared = cfg.before_metrics is not None
                # A sweep's shared evaluation: only this run's own training subset, if any, is scored.
                st["before"] = ({**{k: cfg.before_metrics[k] for k in STAT_NAMES}, **self.evaluate("before", val=False)}
                                if shared else self.evaluate("before"))
                self._log({"type": "eval", "tag": "before", "epoch": 0, "global_step": 0, **st["before"]})
                self.log(f"before fine-tuning: AP {100 * st['before']['AP']:.2f}"
                         + (" (the sweep's evaluation, made once)" if shared else "") + _train_part(st["before"]))
            self.model.train()
            t_start = time.perf_counter() - st["elapsed"]
            stop = False
            with make_progress(disable=not (cfg.progress and self.dist.is_main)) as bar:
                epoch_task = bar.add_task("epochs", total=cfg.epochs, completed=st["epoch"], info="")
                step_task = bar.add_task("steps", total=self.steps_per_epoch, info="")
                while st["epoch"] < cfg.epochs and not stop:
                    self._stop_if_interrupted(t_start)
                    if (cfg.max_steps and st["global_step"] >= cfg.max_steps) or st["stopped_early"]:
                        break  # a resumed run that had already reached --max-steps or its patience
                    epoch = st["epoch"]
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["base_lr"] * lr_factor(epoch, cfg.epochs, cfg.lr_drop)
                    per_process = cfg.batch_size // self.dist.world_size
                    self.sampler.set_epoch(epoch, skip_samples=st["batch_in_epoch"] * per_process)
                    bar.update(step_task, completed=st["batch_in_epoch"] // cfg.grad_accum, total=self.steps_per_epoch)
                    # Each step's own wall time: waiting for data, its micro-batches, the optimizer step
                    # (a checkpoint written after it is not part of it).
                    t_step, n_step = time.perf_counter(), 0
                    self.optimizer.zero_grad(set_to_none=True)
                    for batch in self.train_loader:
                        terms = self._forward_backward(batch)
                        st["batch_in_epoch"] += 1
                        n_step += len(batch["image_ids"]) * self.dist.world_size
                        if st["batch_in_epoch"] % cfg.grad_accum and st["batch_in_epoch"] < self.batches_per_epoch:
                            continue  # accumulating
                        grad_norm = self._optimizer_step()
                        st["global_step"] += 1
                        step_seconds = time.perf_counter() - t_step
                        ips = n_step / max(step_seconds, 1e-9)
                        lr = self.optimizer.param_groups[0]["lr"]
                        record = {"type": "step", "epoch": epoch + 1, "global_step": st["global_step"], "lr": lr,
                                  "grad_norm": grad_norm, "step_seconds": round(step_seconds, 4),
                                  "images_per_second": round(ips, 2), **terms}
                        self._log(record)
                        bar.update(step_task, advance=1, info=f"loss {terms['loss']:.4f} · lr {lr:.2e} · {ips:.1f} img/s"
                                   + (f" · DAP {terms['dap']:.3f}" if "dap" in terms else ""))
                        if cfg.save_every and st["global_step"] % cfg.save_every == 0:
                            st["elapsed"] = time.perf_counter() - t_start
                            self._save()
                        self._stop_if_interrupted(t_start)
                        if cfg.max_steps and st["global_step"] >= cfg.max_steps:
                            stop = True
                            break
                        t_step, n_step = time.perf_counter(), 0
                    # An epoch is complete also when --max-steps lands on its last batch: a
                    # resumed run must not evaluate the same weights again as that epoch's end.
                    complete = not stop or st["batch_in_epoch"] >= self.batches_per_epoch
                    if complete:
                        st["epoch"] += 1
                        st["batch_in_epoch"] = 0
                    tag = f"epoch{st['epoch']:03d}" if complete else f"step{st['global_step']}"
                    if complete and not stop and st["epoch"] < cfg.epochs and st["epoch"] % cfg.eval_every:
                        # --eval-every: no evaluation after this epoch; its end is still a checkpoint.
                        st["elapsed"] = time.perf_counter() - t_start
                        self._save()
                        bar.update(epoch_task, completed=st["epoch"])
                        continue
                    metrics = self.evaluate(tag)
                    self._log({"type": "eval", "tag": "epoch", "epoch": st["epoch"], "global_step": st["global_step"],
                               **metrics})
                    improved = record_evaluation(st, metrics, tag, cfg)
                    stop = stop or st["stopped_early"] is not None
                    st["elapsed"] = time.perf_counter() - t_start
                    self._save(best=improved)
                    bar.update(epoch_task, completed=st["epoch"])
                    where = f"step {st['global_step']} (--max-steps)" if tag.startswith("step") else f"epoch {st['epoch']}"
                    self.log(f"{where}: AP {100 * metrics['AP']:.2f}"
                             + (f" (best {100 * st['best_ap']:.2f})" if not improved else " (best so far)")
                             + _train_part(metrics))
                    if st["stopped_early"]:
                        self.log(st["stopped_early"])
        st["elapsed"] = time.perf_counter() - t_start
        report = {}
        if self.dist.is_main:
            from dapft.report import write_run_report

            report = write_run_report(self.out, self.cfg, self.family.name, st, self.freezing)
        dist_utils.barrier(self.dist)
        dist_utils.shutdown(self.dist)
        if self.tb is not None:
            self.tb.close()
        return report

    def _stop_if_interrupted(self, t_start: float) -> None:
        """At a step boundary, after a Ctrl-C on any process: save a resumable checkpoint and stop."""
        if not dist_utils.any_process(self._ctrl_c.count > 0, self.dist):
            return
        self.state["elapsed"] = time.perf_counter() - t_start
        self._save()
        raise TrainingInterrupted(f"interrupted at step {self.state['global_step']}; checkpoint saved in "
                                  f"{self.out / 'checkpoint-last'}: continue with the same command and --resume")

    def _forward_backward(self, batch: dict) -> dict:
        inputs = {"pixel_values": batch["pixel_values"].to(self.device, non_blocking=True),
                  "labels": [{k: v.to(self.device) for k, v in t.items()} for t in batch["labels"]]}
        if "pixel_mask" in batch:
            inputs["pixel_mask"] = batch["pixel_mask"].to(self.device, non_blocking=True)
        try:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.ddp_model(**inputs)
        except FloatingPointError as exc:  # raised inside the loss, which does not know the step
            raise FloatingPointError(f"step {self.state['global_step'] + 1}: {exc}; " + self._diverged_hint()) from exc
        except (ValueError, RuntimeError) as exc:
            # A model's own loss code may meet NaN outputs first (transformers' box checks raise
            # ValueError with the whole tensor in the message): say what happened, not that.
            if "nan" in str(exc).lower() or not all(torch.isfinite(p).all() for p in self.model.parameters()):
                raise FloatingPointError(f"step {self.state['global_step'] + 1}: the model's outputs are not finite "
                                         f"({type(exc).__name__} in its loss); " + self._diverged_hint()) from exc
            raise
        loss = out.loss / self.cfg.grad_accum
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.state['global_step'] + 1}: {out.loss_dict}; "
                                     + self._diverged_hint())
        self.scaler.scale(loss).backward()
        terms = {k: float(v.detach()) for k, v in (out.loss_dict or {}).items() if torch.is_tensor(v) and v.numel() == 1}
        terms["loss"] = float(out.loss.detach())
        return terms

    def _diverged_hint(self) -> str:
        saved = (f"the checkpoints in {self.out} are from before it" if (self.out / "checkpoint-last").is_dir()
                 else "nothing was saved yet")
        return f"training diverged at lr {self.cfg.lr:g} ({saved}); start again with a lower --lr or --clip-grad-norm"

    def _optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else float("inf"))
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            # Without fp16's scaler (which skips such steps itself) this step would write NaN into
            # every weight and the next forward would fail somewhere far from the cause.
            raise FloatingPointError(f"non-finite gradient at step {self.state['global_step'] + 1}; "
                                     + self._diverged_hint())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return float(norm)


def finetune(cfg: FinetuneConfig) -> dict:
    """Library entry point of `dapft finetune`: returns the report (before/after metrics, config)."""
    return Trainer(cfg).train()
