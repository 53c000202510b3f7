"""Every setting of a fine-tuning run: the config, the recipe that fills what the user left unset
(the paper's schedule, sec. 4.1, relative to the model's original training), the checks made before
any work, and what a resumed run may change."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dapft.objective.detection_loss import LOSS_CONFIGS
from dapft.training.freeze import same_freezing

RECIPES_DIR = Path(__file__).parents[1] / "recipes"


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
    # The rate drops tenfold after each of these epochs (DETR's --lr_drop; several: a multi-step
    # schedule); None: for the last epoch only (the paper's fine-tuning schedule). From-scratch
    # trainings use it for a step schedule.
    lr_drop: list[int] | None = None
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
    num_workers: int | None = None  # None: from the CPUs each process may use (dapft.data.loader.default_num_workers)
    augment: bool = True
    eval_before: bool = True
    eval_every: int = 1  # evaluate every N epochs, and always after the last
    max_eval_images: int | None = None
    max_train_images: int | None = None
    train_eval_images: int | None = None  # also score this many training images (the first by id) at each evaluation
    evaluator: str = "hotcoco"  # or faster-coco-eval, pycocotools: the same numbers (tested); hotcoco is fastest
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
    # Trackers (dapft.utils.trackers): a comma list of tensorboard, mlflow, wandb, or none; None: TensorBoard
    # where it is installed. log_checkpoints: checkpoint-best to them too.
    report_to: str | None = None
    log_checkpoints: bool = False
    tracker_group: dict | None = None  # a sweep's: the MLflow parent run, the W&B group
    gallery: bool = True  # the report draws the validation images that changed most
    command: str | None = None  # how the run was started, for reports and model cards
    given: tuple[str, ...] | None = None  # settings the user gave (the CLI's flags); None: all non-defaults
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lr_drop = drop_list(self.lr_drop)


def drop_list(lr_drop) -> list[int] | None:
    """--lr-drop as a list of epochs: the library's callers may give one epoch or a tuple, and the
    config.json of a dapft before multi-step schedules holds one epoch."""
    if isinstance(lr_drop, int):
        return [lr_drop]
    return list(lr_drop) if isinstance(lr_drop, tuple) else lr_drop


# What `--resume` may change: where and how the run reports and works (the evaluators give the same
# numbers), and when it stops. Everything
# else (model, data, loss and its settings, schedule, recipe, precision) is the run's: a resumed run
# takes it from the run's config.json, and a flag that asks for another value is refused by name.
RESUMABLE_CHANGES = ("progress", "num_workers", "save_every", "eval_every", "device", "max_steps", "patience",
                     "report_to", "log_checkpoints", "gallery", "evaluator")
# Where the run is and how it was asked for; a sweep's shared evaluation before fine-tuning and its
# trackers' grouping.
NOT_SETTINGS = ("output", "resume", "command", "given", "extra", "before_metrics", "tracker_group")


def _as_flag(name: str, value) -> str:
    """A setting as the command line writes it: `--lr 0.001`, `--no-augment`, `--train-backbone`."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return "backbone freezing of its recipe" if name == "freeze_backbone" else f"{flag} of its recipe"
    if isinstance(value, bool):
        if name == "freeze_backbone":
            return "--freeze-backbone" if value else "--train-backbone"
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, list):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def saved_settings(saved: dict) -> dict:
    """A run's config.json as this version reads it: dapft before multi-step schedules saved
    --lr-drop as one epoch."""
    return {**saved, "lr_drop": drop_list(saved["lr_drop"])} if "lr_drop" in saved else saved


def _later_drops(asked: list[int] | None, saved: list[int] | None, reached: int) -> bool:
    """Whether --lr-drop `asked` only adds drops after the epoch the run is in to its step schedule
    `saved`: the rates of the epochs trained stay what they were."""
    return (saved is not None and asked is not None and asked[:len(saved)] == saved
            and all(d > reached for d in asked[len(saved):]))


def resumed_config(requested: FinetuneConfig, saved: dict, where: Path, reached: int = 0) -> FinetuneConfig:
    """The config a resumed run continues with: the run's own, but for RESUMABLE_CHANGES, and for a
    run with a step schedule (--lr-drop) more --epochs and further drops after `reached`, the
    (0-based) epoch its checkpoint is in."""
    may_change = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES)
    defaults = FinetuneConfig(model=requested.model)
    saved = saved_settings(saved)
    out, differing, hints = dataclasses.replace(requested), [], []
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in RESUMABLE_CHANGES or f.name in NOT_SETTINGS or f.name not in saved:
            continue
        asked = getattr(requested, f.name)
        given = f.name in requested.given if requested.given is not None else asked != getattr(defaults, f.name)
        same = asked == saved[f.name] or (f.name == "freeze_backbone" and same_freezing(
            asked, saved[f.name], saved.get("extra") or {}))  # --train-backbone where the recipe trains it all
        # Train longer, and lower the rate again later (DETR's --epochs with --resume): a step
        # schedule's rates so far depend neither on the total nor on drops still to come.
        if given and f.name == "epochs" and saved.get("lr_drop") is not None and asked > saved[f.name]:
            continue
        if given and f.name == "lr_drop" and _later_drops(asked, saved["lr_drop"], reached):
            continue
        if given and not same:
            differing.append(f"{_as_flag(f.name, asked)} differs from the run's {_as_flag(f.name, saved[f.name])}")
            if f.name == "epochs":
                hints.append("a run with the last-epoch rate drop cannot be lengthened: its last epoch trained at a "
                             "tenth of the rate; one with --lr-drop can")
            if f.name == "lr_drop" and saved["lr_drop"] is not None:
                hints.append(f"a resumed step schedule may gain later drops, of {reached + 1} or more: the run is "
                             f"in epoch {reached + 1}, and the rates it trained at stay")
        setattr(out, f.name, saved[f.name])
    hint = f" ({'; '.join(hints)})" if hints else ""
    if differing:  # all of them at once: one fix, not one refusal per flag
        raise ValueError(f"{where}: {'; '.join(differing)}; a resumed run keeps its settings (only {may_change} "
                         f"may change{hint}): drop the flag{'s' if len(differing) > 1 else ''}, or start a new run "
                         "in another --output")
    return out


MODEL_RECIPE = "dapft_recipe.yaml"  # a checkpoint may carry its own recipe (the bundled ones do)


def load_recipe(family: str, recipe: str | None = None, model: str | None = None) -> dict:
    """--recipe FILE, else the checkpoint's own dapft_recipe.yaml, else recipes/<family>.yaml."""
    from dapft.modeling.loading import resolve_model

    own = Path(resolve_model(model)) / MODEL_RECIPE if model else None
    path = Path(recipe) if recipe else (own if own is not None and own.is_file() else RECIPES_DIR / f"{family}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe not found" + ("" if recipe else f" for family {family}"))
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {cfg.precision!r}")
    if cfg.lr_drop is not None and (not cfg.lr_drop or any(b <= a for a, b in zip(cfg.lr_drop, cfg.lr_drop[1:]))
                                    or cfg.lr_drop[0] < 1):
        raise ValueError(f"--lr-drop must be epochs, at least 1 and increasing (100 or 100,450), got "
                         f"{','.join(map(str, cfg.lr_drop))}")
    for name, low in _AT_LEAST.items():  # None means: the recipe's value, or no limit
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for name, zero_allowed in (("sigma", False), ("ema_decay", False), ("momentum", True)):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)
                                      and value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must lie in {'[0, 1)' if zero_allowed else '(0, 1)'}, "
                             f"got {value}")


# Lower bounds of the numeric settings (0 steps, epochs or images would silently mean the recipe's
# value, no limit, or an AP computed on nothing).
_AT_LEAST = {"epochs": 1, "eval_every": 1, "max_steps": 1, "batch_size": 1, "grad_accum": 1, "bins": 2, "max_eval_images": 1,
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


def lr_factor(epoch: int, epochs: int, lr_drop: list[int] | None = None) -> float:
    """The factor on cfg.lr in (0-based) `epoch`: a tenth for each drop in `lr_drop` whose epochs
    are done. By default the drop comes for the last epoch only (the paper: a tenth of the original
    rate, in cfg.lr, then a hundredth in the last epoch); a one-epoch run keeps cfg.lr, since
    dropping would leave no epoch at the fine-tuning rate at all."""
    if lr_drop is None:
        lr_drop = [epochs - 1 if epochs >= 2 else epochs]
    return 10.0 ** -sum(epoch >= drop for drop in lr_drop)


def drops_text(cfg: FinetuneConfig) -> str:
    """The schedule's drops in words, for the start line and the report."""
    if cfg.lr_drop is None:
        return "/10 in the last epoch" if cfg.epochs >= 2 else "no drop"
    return "/10 after epoch " + " and again after ".join(map(str, cfg.lr_drop))
