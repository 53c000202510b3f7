"""Which parts of the backbone train, as recipe data, applied by dapft itself after loading.

transformers decides `requires_grad` by name filters that miss (a timm ResNet trains entirely, a
transformers ResNet freezes entirely), so dapft never relies on what the model class did: it sets
`requires_grad` on every backbone parameter from the recipe, the way each family's original code
trains (the recipe files cite it):

    freeze_backbone_stem: true      # the stem (first convolutions, patch embedding)
    freeze_backbone_stages: 1       # and the first N stages after it (ResNet layer1 = stage 0)
    freeze_backbone_norm: true      # every normalisation layer of the backbone: no affine
                                    # update and, for BatchNorm, no running-statistics update

A backbone's parts are told apart by parameter name, for the layouts the supported checkpoints
use: timm ResNet (`conv1`/`bn1`, `layer1..4`), transformers ResNet / RT-DETR ResNet / HGNetV2 /
ConvNeXt (`embedder`/`embeddings`, `encoder.stages.N`). Parameters of neither kind (a ViT's blocks,
projectors) train unless the whole backbone is frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_STAGE = re.compile(r"\.(?:layer(\d+)|stages\.(\d+))\.")  # timm: layer1 = stage 0; HF: stages.0
_STEM = re.compile(r"\.(?:conv1|bn1|embedder|embeddings|stem)\.")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class FreezeSpec:
    stem: bool = False
    stages: int = 0
    norm: bool = False
    whole: bool | None = None  # True: freeze the whole backbone; False: train all of it (norms per `norm`)

    @classmethod
    def from_recipe(cls, recipe: dict, override: bool | None = None) -> "FreezeSpec":
        """The recipe's spec; `override` is --freeze-backbone (True) / --train-backbone (False)."""
        return cls(stem=bool(recipe.get("freeze_backbone_stem", False)),
                   stages=int(recipe.get("freeze_backbone_stages", 0)),
                   norm=bool(recipe.get("freeze_backbone_norm", False)), whole=override)


def same_freezing(a: bool | None, b: bool | None, recipe: dict) -> bool:
    """Whether two --freeze-backbone (True) / --train-backbone (False) / recipe (None) settings freeze
    the same parts of the backbone under `recipe`."""
    def parts(override: bool | None) -> tuple:
        spec = FreezeSpec.from_recipe(recipe, override)
        if spec.whole:
            return ("all",)
        return (spec.stem, spec.stages, spec.norm) if spec.whole is None else (False, 0, spec.norm)

    return parts(a) == parts(b)


@dataclass
class FreezeReport:
    trainable: int
    total: int
    backbone_trainable: int
    backbone_total: int
    frozen: list[str]  # parts frozen, in words
    frozen_norms: int

    def summary(self) -> str:
        what = "frozen: " + ", ".join(self.frozen) if self.frozen else "nothing frozen"
        return (f"trainable {self.trainable / 1e6:.2f}M / {self.total / 1e6:.2f}M parameters; backbone "
                f"{self.backbone_trainable / 1e6:.2f}M / {self.backbone_total / 1e6:.2f}M trainable ({what})")


def backbone_part(name: str) -> str:
    """'stem', 'stage<k>' or 'other' for a parameter name inside the backbone."""
    stage = _STAGE.search(name)
    if stage:
        return f"stage{int(stage.group(1)) - 1}" if stage.group(1) else f"stage{int(stage.group(2))}"
    return "stem" if _STEM.search(name) else "other"


def _frozen_by_spec(name: str, spec: FreezeSpec) -> bool:
    if spec.whole is not None:
        return spec.whole
    part = backbone_part(name)
    if part == "stem":
        return spec.stem
    return part.startswith("stage") and int(part[5:]) < spec.stages


def _keep_in_eval(module: nn.Module, args) -> None:
    # A frozen BatchNorm must normalise with its stored statistics in training too; model.train()
    # would switch it back on every call, so the module resets itself before each forward.
    module.training = False


def apply_freezing(model: nn.Module, spec: FreezeSpec) -> FreezeReport:
    """Set `requires_grad` of every backbone parameter (and freeze its norms) from `spec`."""
    norm_params: set[int] = set()
    frozen_norms = 0
    for name, module in model.named_modules():
        if "backbone" not in name:
            continue
        if isinstance(module, _NORM_TYPES) and (spec.norm or spec.whole):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_keep_in_eval)
            frozen_norms += 1
        elif "FrozenBatchNorm" in type(module).__name__:
            frozen_norms += 1  # buffers only: frozen by construction
    parts: dict[str, bool] = {}  # backbone part -> whether any of it trains
    backbone = []
    for name, p in model.named_parameters():
        if "backbone" not in name:
            continue
        frozen = id(p) in norm_params or _frozen_by_spec(name, spec)
        p.requires_grad_(not frozen)
        part = backbone_part(name)
        if id(p) not in norm_params:  # the norm layers are counted apart: a part is named for its other weights
            parts[part] = parts.get(part, False) or not frozen
        backbone.append(p)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    order = sorted(parts, key=lambda k: (k != "stem", int(k[5:]) if k.startswith("stage") else 0))
    frozen_parts = [("stage " + k[5:]) if k.startswith("stage") else k for k in order if not parts[k]]
    if spec.whole:
        frozen_parts = ["the whole backbone"]
    elif frozen_norms:  # by the recipe, or by their class (FrozenBatchNorm2d)
        frozen_parts.append(f"{frozen_norms} norm layers")
    return FreezeReport(trainable, total, sum(p.numel() for p in backbone if p.requires_grad),
                        sum(p.numel() for p in backbone), frozen_parts, frozen_norms)
