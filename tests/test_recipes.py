"""Fine-tuning the way each family's authors trained it: backbone freezing and model EMA as recipe
data, applied by dapft whatever transformers did, and the run features that go with them."""

from __future__ import annotations

import math

import pytest
import torch

from dapft.data.shapes import CLASSES
from dapft.modeling.families import FAMILIES, family_of
from dapft.modeling.tiny import tiny_model, tiny_processor
from dapft.objective.criterion import DAPCriterion
from dapft.training.config import FinetuneConfig, load_recipe
from dapft.training.ema import ModelEMA
from dapft.training.freeze import FreezeSpec, apply_freezing, backbone_part
from dapft.training.trainer import Trainer

LABELS = dict(enumerate(CLASSES))


@pytest.mark.parametrize("name, part", [
    ("model.backbone.model.conv1.weight", "stem"),  # timm ResNet (the Hub DETR checkpoints)
    ("model.backbone.model.layer1.0.conv1.weight", "stage0"),
    ("model.backbone.model.layer4.2.conv3.weight", "stage3"),
    ("model.backbone.conv_encoder.model.embedder.embedder.convolution.weight", "stem"),  # transformers ResNet
    ("model.backbone.model.encoder.stages.2.layers.0.shortcut.convolution.weight", "stage2"),  # RT-DETR
    ("model.backbone.model.embedder.stem1.convolution.weight", "stem"),  # HGNetV2
    ("model.backbone.backbone.encoder.layer.3.attention.qkv.weight", "other"),  # a ViT block
])
def test_backbone_parts_are_named_for_every_layout(name, part):
    assert backbone_part(name) == part


def _real_size(family: str):
    from transformers import AutoModelForObjectDetection, DeformableDetrConfig, DetrConfig

    cls = {"detr": DetrConfig, "deformable_detr": DeformableDetrConfig}[family]
    labels = {i: c for i, c in LABELS.items()}
    config = cls(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, id2label=labels,
                 label2id={v: k for k, v in labels.items()}, num_queries=20)
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_config(config)
    # timm zero-initialises each block's last BatchNorm scale, which (frozen) would cut every residual
    # branch off from the gradient; a pretrained checkpoint's scales are not zero.
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "backbone" in name and name.endswith("bn3.weight"):
                buffer.fill_(0.2)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["detr", "deformable_detr"])
def test_real_size_detr_like_trains_layer2_to_4_and_the_transformer_only(family, tmp_path, shapes_root):
    """As the Hub checkpoints are built (timm ResNet-50, whose parameters transformers leaves all
    trainable): 2 steps of `dap+original` leave the stem and layer1 as they were."""
    model = _real_size(family)
    assert all(p.requires_grad for n, p in model.named_parameters() if "backbone" in n)  # what transformers did
    model.save_pretrained(tmp_path / "model")
    tiny_processor(family, 96).save_pretrained(tmp_path / "model")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(model=str(tmp_path / "model"), data=str(shapes_root), output=str(tmp_path / "run"),
                         loss="dap+original", max_steps=2, batch_size=2, device="cpu", num_workers=0,
                         progress=False, eval_before=False, max_eval_images=2, augment=False)
    trainer = Trainer(cfg)
    report = trainer.train()
    after = dict(trainer.run.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    backbone = [n for n in before if n.startswith("model.backbone.model.")]
    assert len(backbone) == 53
    for n in backbone:
        frozen = backbone_part(n) in ("stem", "stage0")
        assert (n not in changed) == frozen, f"{n}: {'trained' if frozen else 'did not train'}"
    transformer = [n for n in before if "backbone" not in n and ("encoder.layers" in n or "decoder.layers" in n)]
    # (DETR's first decoder self-attention sees zero inputs: its q/k/v weights get no gradient.)
    assert transformer and len(changed & set(transformer)) >= 0.9 * len(transformer)
    assert report["parameters"]["frozen"][:2] == ["stem", "stage 0"]
    # Deformable DETR's official rate of a tenth for its sampling offsets and reference points.
    groups = {g["name"]: g for g in trainer.run.optimizer.param_groups}
    name_of = {id(p): n for n, p in trainer.run.model.named_parameters()}
    projections = {n for n, p in trainer.run.model.named_parameters()
                   if p.requires_grad and ("sampling_offsets" in n or "reference_points" in n)}
    if family == "deformable_detr":
        assert len(projections) == 26  # 12 layers' sampling offsets and the reference points (weight, bias)
        assert {name_of[id(p)] for p in groups["linear_proj"]["params"]} == projections
        assert groups["linear_proj"]["base_lr"] == pytest.approx(groups["rest"]["base_lr"] * 0.1)
    else:
        assert "linear_proj" not in groups and not projections


def test_a_transformers_resnet_frozen_whole_by_its_class_is_trained_as_the_recipe_says():
    from transformers import AutoModelForObjectDetection, DetrConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    model = AutoModelForObjectDetection.from_config(DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5))
    params = {n: p for n, p in model.named_parameters() if "backbone" in n}
    assert not any(p.requires_grad for p in params.values())  # what transformers did
    report = apply_freezing(model, FreezeSpec.from_recipe(load_recipe("detr")))
    trains = {backbone_part(n) for n, p in params.items() if p.requires_grad}
    frozen = {backbone_part(n) for n, p in params.items() if not p.requires_grad}
    assert trains == {"stage1", "stage2", "stage3"} and {"stem", "stage0"} <= frozen
    assert 0 < report.backbone_trainable < report.backbone_total
    whole = apply_freezing(model, FreezeSpec.from_recipe(load_recipe("detr"), override=False))  # --train-backbone
    assert whole.backbone_trainable == whole.backbone_total
    none = apply_freezing(model, FreezeSpec.from_recipe(load_recipe("detr"), override=True))  # --freeze-backbone
    assert none.backbone_trainable == 0 and none.frozen == ["the whole backbone"]


def test_frozen_batchnorm_keeps_its_statistics_in_training():
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    apply_freezing(model, FreezeSpec(norm=True))
    model.train()
    stats = model.backbone[1].running_mean.clone()
    model.backbone(torch.randn(2, 3, 8, 8) * 5 + 3)
    assert torch.equal(model.backbone[1].running_mean, stats)
    assert not model.backbone[1].weight.requires_grad and model.backbone[0].weight.requires_grad


@pytest.mark.parametrize("family, on", [("detr", False), ("deformable_detr", False), ("conditional_detr", False),
                                        ("dab-detr", False), ("rt_detr", True), ("rt_detr_v2", True),
                                        ("d_fine", True), ("lw_detr", True), ("rf_detr", True)])
def test_recipes_turn_ema_on_where_the_authors_use_it(family, on):
    recipe = load_recipe(family)
    assert (recipe.get("ema_decay") is not None) == on
    assert FAMILIES[family].name == family


def test_ema_follows_rt_detrs_warm_up_and_averages_float_state_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup_steps=10)
    ema.update(model)  # the first update copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    old = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 7
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 10))
    torch.testing.assert_close(ema.module[0].weight, d * old + (1 - d) * model[0].weight)
    assert int(ema.module[1].num_batches_tracked) == 7
    assert ema.updates == 2 and ema.decay_at(10_000) == pytest.approx(0.9)
    assert ModelEMA(model, decay=0.5).decay_at(1) == 0.5  # no warm-up: constant decay


def test_a_non_finite_matching_cost_names_the_layer():
    model = tiny_model("detr", LABELS)
    family = family_of(model.config)
    criterion = DAPCriterion(family, model.config)
    boxes = torch.rand(2, 20, 4) * 0.2 + 0.4
    layers = [{"logits": torch.randn(2, 20, 7), "pred_boxes": boxes.clone()} for _ in range(3)]
    layers[1]["pred_boxes"][1, 3] = float("nan")
    targets = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    with pytest.raises(FloatingPointError, match="decoder layer 1 of 3.*image 1"):
        criterion(layers, targets)


def test_a_checkpoints_own_recipe_comes_before_the_familys_and_recipe_file_before_both(tmp_path):
    import yaml

    from dapft.modeling.tiny import save_tiny_checkpoint
    from dapft.training.config import resolve

    model = save_tiny_checkpoint("detr", tmp_path / "model", LABELS, image_size=96)
    family = load_recipe("detr")
    assert resolve(FinetuneConfig(model=str(model)), "detr").lr == pytest.approx(family["pretrain_lr"] / 10)
    (model / "dapft_recipe.yaml").write_text(yaml.safe_dump({**family, "pretrain_lr": 5e-3, "epochs": 3,
                                                             "batch_size": 5, "backbone_lr_multiplier": 0.5}))
    own = resolve(FinetuneConfig(model=str(model)), "detr")
    assert (own.lr, own.epochs, own.batch_size, own.backbone_lr_multiplier) == (pytest.approx(5e-4), 3, 5, 0.5)
    file = tmp_path / "mine.yaml"
    file.write_text(yaml.safe_dump({**family, "pretrain_lr": 7e-3, "epochs": 2, "batch_size": 6}))
    given = resolve(FinetuneConfig(model=str(model), recipe=str(file)), "detr")
    assert (given.lr, given.epochs, given.batch_size) == (pytest.approx(7e-4), 2, 6)
    flags = resolve(FinetuneConfig(model=str(model), recipe=str(file), lr=1e-6, epochs=1), "detr")
    assert (flags.lr, flags.epochs) == (1e-6, 1)  # a flag over any recipe


@pytest.mark.parametrize("freeze", [True, None])
def test_freeze_backbone_keeps_batchnorm_statistics_where_the_recipe_trains_norms(freeze, tmp_path, shapes_root):
    """LW-DETR's recipe leaves the backbone's norm layers trainable; --freeze-backbone freezes them
    whole, running statistics included (its projector has BatchNorm), which the recipe alone moves."""
    from dapft.modeling.tiny import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint("lw_detr", tmp_path / "lw", LABELS, image_size=96)
    cfg = FinetuneConfig(model=str(model_dir), data=str(shapes_root), output=str(tmp_path / "run"), loss="dap+original",
                         max_steps=2, batch_size=4, device="cpu", num_workers=0, progress=False, eval_before=False,
                         max_eval_images=1, augment=False, freeze_backbone=freeze, lr=1e-3)
    trainer = Trainer(cfg)
    trainer.train()
    torch.manual_seed(0)  # the initialisation save_tiny_checkpoint saved
    before = tiny_model("lw_detr", LABELS).state_dict()
    stats = {n: b for n, b in trainer.run.model.state_dict().items()
             if "backbone" in n and n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    assert len(stats) == 12
    moved = [n for n, b in stats.items() if not torch.equal(b, before[n])]
    assert (moved == []) if freeze else len(moved) == 12


def _owner(model, name: str):
    return model.get_submodule(name.rsplit(".", 1)[0])


@pytest.mark.parametrize("family", ["detr", "deformable_detr_box_refine", "rt_detr", "d_fine", "lw_detr", "rf_detr"])
def test_every_familys_recipe_freezes_what_it_says(family):
    """Each recipe's stem, stages and norm layers, applied to its family's tiny model as written; the
    report counts the norm layers frozen (by the recipe, or by their class) and names them when there are any."""
    recipe = load_recipe("deformable_detr" if family.startswith("deformable") else family)
    model = tiny_model(family, LABELS)
    report = apply_freezing(model, FreezeSpec.from_recipe(recipe))
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    params = {n: p for n, p in model.named_parameters()
              if "backbone" in n and not isinstance(_owner(model, n), norm_types)}
    for name, p in params.items():
        part = backbone_part(name)
        frozen = (recipe.get("freeze_backbone_stem", False) if part == "stem" else
                  part.startswith("stage") and int(part[5:]) < recipe.get("freeze_backbone_stages", 0))
        assert p.requires_grad is not frozen, (family, name)
    norms = [m for n, m in model.named_modules() if "backbone" in n and isinstance(m, norm_types)]
    by_class = sum("FrozenBatchNorm" in type(m).__name__ for n, m in model.named_modules() if "backbone" in n)
    assert report.frozen_norms == by_class + (len(norms) if recipe.get("freeze_backbone_norm") else 0)
    assert (f"{report.frozen_norms} norm layers" in report.summary()) is bool(report.frozen_norms)
    # In words, in the backbone's order: the stem, the frozen stages, then the norm layers' count.
    stages = recipe.get("freeze_backbone_stages", 0)
    assert report.frozen == (["stem"] if recipe.get("freeze_backbone_stem") else []) + [
        f"stage {i}" for i in range(stages)] + ([f"{report.frozen_norms} norm layers"] if report.frozen_norms else [])
    assert all(p.requires_grad is not bool(recipe.get("freeze_backbone_norm")) for m in norms
               for p in m.parameters(recurse=False))


def test_a_recipe_without_freezing_keys_freezes_nothing():
    # The bundled detectors' own recipes name no freezing: they were trained from scratch, all of it.
    assert FreezeSpec.from_recipe({"pretrain_lr": 2e-4, "epochs": 4, "batch_size": 8}) == FreezeSpec()


def test_an_ema_decay_outside_0_and_1_is_refused_and_a_one_step_warm_up_ramps():
    model = torch.nn.Linear(2, 2)
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="EMA decay must lie in"):
            ModelEMA(model, decay=decay)
    assert ModelEMA(model, decay=0.9, warmup_steps=1).decay_at(1) == pytest.approx(0.9 * (1 - math.exp(-1)))
