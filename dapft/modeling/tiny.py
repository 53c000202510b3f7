"""Tiny, randomly initialised detectors of every supported family, built offline from configs.

They are what the tests, the CPU benchmarks and the bundled shapes detectors use: the real
transformers architectures, with small backbones (no pretrained weights) and one or two layers.
"""

from __future__ import annotations

from transformers import (
    ConditionalDetrConfig,
    ConvNextConfig,
    DabDetrConfig,
    DeformableDetrConfig,
    DetrConfig,
    DFineConfig,
    HGNetV2Config,
    LwDetrConfig,
    LwDetrViTConfig,
    RfDetrConfig,
    RfDetrDinov2Config,
    RTDetrConfig,
    RTDetrResNetConfig,
    RTDetrV2Config,
)

TINY_FAMILIES = (
    "detr", "conditional_detr", "dab_detr", "deformable_detr", "deformable_detr_box_refine",
    "deformable_detr_two_stage", "rt_detr", "rt_detr_v2", "d_fine", "lw_detr", "rf_detr",
)


def _convnext(out_features, width: int = 8):
    # ConvNeXt rather than ResNet: transformers freezes a non-timm ResNet backbone entirely (its
    # name filter expects 'stage.N' where the modules are 'stages.N'), and a tiny model should train.
    return ConvNextConfig(hidden_sizes=[width, 2 * width, 4 * width, 6 * width], depths=[1, 1, 1, 1],
                          out_features=out_features)


def tiny_config(family: str, id2label: dict[int, str], *, num_queries: int = 20, d_model: int = 32,
                decoder_layers: int = 2, width: int = 8, encoder_layers: int = 1, n_points: int = 2):
    """A small config of `family` (one of TINY_FAMILIES) for the given labels (`n_points`: the
    deformable attention's sampling points, Deformable DETR only)."""
    labels = dict(id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    detr_like = dict(d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                     decoder_ffn_dim=2 * d_model, num_queries=num_queries, auxiliary_loss=True, dropout=0.0, **labels)
    rt_like = dict(d_model=d_model, encoder_hidden_dim=d_model, encoder_layers=encoder_layers,
                   encoder_ffn_dim=2 * d_model, encoder_attention_heads=2, decoder_layers=decoder_layers,
                   decoder_attention_heads=2, decoder_ffn_dim=2 * d_model, num_queries=num_queries,
                   decoder_in_channels=[d_model] * 3, num_denoising=10,
                   encoder_in_channels=[2 * width, 4 * width, 6 * width], feat_strides=[8, 16, 32], **labels)
    if family == "detr":
        return DetrConfig(backbone_config=_convnext(["stage4"], width), **detr_like)
    if family == "conditional_detr":
        return ConditionalDetrConfig(backbone_config=_convnext(["stage4"], width), **detr_like)
    if family == "dab_detr":
        cfg = {k: v for k, v in detr_like.items() if k != "d_model"}
        return DabDetrConfig(backbone_config=_convnext(["stage4"], width), hidden_size=d_model, **cfg)
    if family.startswith("deformable_detr"):
        return DeformableDetrConfig(
            backbone_config=_convnext(["stage2", "stage3", "stage4"], width), num_feature_levels=3,
            encoder_n_points=n_points, decoder_n_points=n_points, with_box_refine=family != "deformable_detr",
            two_stage=family == "deformable_detr_two_stage", two_stage_num_proposals=num_queries, **detr_like)
    if family in ("rt_detr", "rt_detr_v2"):
        backbone = RTDetrResNetConfig(embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width, 6 * width],
                                      depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage2", "stage3", "stage4"])
        cls = RTDetrConfig if family == "rt_detr" else RTDetrV2Config
        return cls(backbone_config=backbone, **rt_like)
    if family == "d_fine":
        backbone = HGNetV2Config(
            embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], stem_channels=[3, 8, 8],
            stage_in_channels=[8, 16, 32, 48], stage_mid_channels=[8, 8, 16, 16],
            stage_out_channels=[16, 32, 48, 64], stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
            out_features=["stage2", "stage3", "stage4"])
        return DFineConfig(backbone_config=backbone, **{**rt_like, "encoder_in_channels": [32, 48, 64]},
                           lqe_hidden_dim=16, max_num_bins=8, decoder_n_points=[2, 2, 2])
    if family == "lw_detr":
        backbone = LwDetrViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                   image_size=128, pretrain_image_size=128, patch_size=16, num_windows=4,
                                   num_windows_side=2, window_block_indices=[0], out_features=["stage1", "stage2"])
        return LwDetrConfig(backbone_config=backbone, projector_scale_factors=[1.0], d_model=d_model,
                            decoder_layers=decoder_layers, decoder_self_attention_heads=2,
                            decoder_cross_attention_heads=2, decoder_ffn_dim=2 * d_model,
                            num_queries=num_queries, group_detr=2, c2f_num_blocks=1, **labels)
    if family == "rf_detr":
        backbone = RfDetrDinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                      image_size=128, patch_size=16, num_windows=2, window_block_indexes=[0],
                                      out_features=["stage1", "stage2"])
        return RfDetrConfig(backbone_config=backbone, d_model=d_model, decoder_layers=decoder_layers,
                            decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                            decoder_ffn_dim=2 * d_model, num_queries=num_queries, group_detr=2, c2f_num_blocks=1,
                            intermediate_size=2 * d_model, **labels)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, id2label: dict[int, str], **kwargs):
    from transformers import AutoModelForObjectDetection

    return AutoModelForObjectDetection.from_config(tiny_config(family, id2label, **kwargs))


__all__ = ["TINY_FAMILIES", "save_tiny_checkpoint", "tiny_config", "tiny_model", "tiny_processor"]


def tiny_processor(family: str, image_size: int = 128):
    """The family's image processor, resizing to `image_size` (DETR-style: shortest edge)."""
    import transformers

    from dapft.modeling.families import FAMILIES

    key = family.replace("_box_refine", "").replace("_two_stage", "").replace("dab_detr", "dab-detr")
    cls = getattr(transformers, FAMILIES[key].processor)
    if "RTDetr" in cls.__name__ or "RfDetr" in cls.__name__:
        return cls(size={"height": image_size, "width": image_size})
    return cls(size={"shortest_edge": image_size, "longest_edge": int(image_size * 5 / 3)})


def save_tiny_checkpoint(family: str, path, id2label: dict[int, str], *, image_size: int = 128, seed: int = 0,
                         **kwargs):
    """A randomly initialised tiny detector and its processor, as a `from_pretrained` directory."""
    import torch

    torch.manual_seed(seed)
    model = tiny_model(family, id2label, **kwargs)
    model.save_pretrained(path)
    tiny_processor(family, image_size).save_pretrained(path)
    return path
