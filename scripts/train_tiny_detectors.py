"""Reproduce the bundled tiny detectors (dapft/checkpoints/tiny-*-shapes): each is trained from
random initialisation with its own original loss on the generated shapes dataset, on CPU.

    python scripts/train_tiny_detectors.py --work runs/bundled            # all bundled families
    python scripts/train_tiny_detectors.py --work runs/bundled --family rt_detr --epochs 30
    python scripts/train_tiny_detectors.py --work /tmp/t --family rt_detr --quick       # a smoke test

The best validation checkpoint is copied into the package with `bundled.json`, which records the
command, the data seed and the validation AP the tests check it reproduces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dapft.data.shapes import CLASSES, make_shapes_dataset  # noqa: E402
from dapft.modeling.tiny import save_tiny_checkpoint  # noqa: E402
from dapft.training.config import FinetuneConfig, load_recipe  # noqa: E402
from dapft.training.trainer import finetune  # noqa: E402
from dapft.utils.signals import TrainingInterrupted  # noqa: E402

# Architecture of each bundled model and the from-scratch schedule that trains it.
BUNDLED = {
    # DETR gets the original DETR code's initialisation (reference_detr_init) and small batches (more
    # steps per second). It is not bundled yet: on 2 CPU cores it stays on the class-prior plateau
    # (REPRODUCTION.md, "The tiny DETR"); this is the run to repeat with more compute.
    "detr": dict(arch=dict(d_model=64, decoder_layers=3, num_queries=30, width=16), lr=4e-4, epochs=150, batch=2,
                 name="tiny-detr-shapes"),
    # RT-DETR to a plateau: 40 epochs (the first bundled model) and 60 were still gaining 6 AP a
    # quarter. A step schedule (DETR's --lr_drop): the rate /10 after 130 of 200 epochs, so that the
    # last quarter of the evaluations (every 4 epochs) all come 20 or more epochs after the drop.
    "rt_detr": dict(arch=dict(d_model=64, decoder_layers=3, num_queries=30, width=16), lr=2e-4, epochs=200,
                    lr_drop=[130], eval_every=4, batch=8, name="tiny-rtdetr-shapes"),
    # Deformable DETR with iterative box refinement (the paper's Deformable baseline; focal loss, which
    # ignores localisation quality). It starts from the backbone an RT-DETR learnt on the same training
    # images, as Deformable DETR starts from an ImageNet backbone, and trains it with the rest: the
    # first bundled RT-DETR's (40 epochs), read from git at the commit that added it (the bundled
    # RT-DETR has been replaced since), its file hash checked.
    # Not the two-stage variant: transformers computes no loss for its encoder proposals, so from
    # scratch they would never learn to select anything. The official matching cost (classification
    # 2, L1 5, GIoU 2; transformers' default weighs the classification 1). The official loss weights
    # are 2 : 5 : 2 too; transformers fixes the classification term's at 1 and takes integer box
    # weights, so its 1 : 5 : 2 stays. Batch 8 (the step costs little more than batch 4's on CPU).
    # 20 epochs of this at a constant rate (2026-11-30, REPRODUCTION.md) left the class-prior plateau
    # slowly (loss_ce 0.535 -> 0.481, AP 3.3): hence 150 epochs, the rate /10 after 100, evaluated
    # every 5 epochs. Those 150 gained 0.92 AP over the last quarter of the evaluations (19.76 by
    # epoch 115, 20.68 at 150): not a plateau, so the run went on at the lowered rate (resumed with
    # more --epochs; the same as the longer schedule from the start): 200 epochs gained 0.88 (21.11 by
    # epoch 190, 21.56 at 200), so 300; by 245 it reached 23.16 against 22.26 by 225, so 400; by 345
    # it reached 25.86 against 23.93 by 300 (about 1.4 AP per 50 epochs still), so 600. By 420 it
    # reached 26.98, still rising about 2 AP per 100 epochs at 2e-5 with no sign of flattening since
    # epoch 200: the first drop came too early (at 2e-4 it was still gaining 3 AP per 10 epochs), and
    # a plateau at 2e-5 was a thousand or more epochs away. So a second drop, after 450 (a
    # multi-step schedule, as mmdetection's step configs have), and 600 epochs: the last quarter of
    # the evaluations (455-600) all at 2e-6. The paper's fine-tune of it runs at its rate / 10, 2e-5,
    # where it was still learning: the original-loss control measures what that adds. At 2e-6 it
    # rose from 27.1 to about 27.7 by epoch 505 and stayed there, but 28.00 at 565 against 27.41 by
    # 450 put the last quarter of 600 at +0.59: 700 epochs (last quarter 530-700).
    "deformable_detr_box_refine": dict(arch=dict(d_model=64, decoder_layers=3, num_queries=100, width=16,
                                                 encoder_layers=3, n_points=4), config=dict(class_cost=2),
                                       lr=2e-4, epochs=700, lr_drop=[100, 450], eval_every=5, batch=8,
                                       backbone_from=dict(name="tiny-rtdetr-shapes", commit="96b5d43", sha256=(
                                           "054bc9a378bd33762588aef8c935fb528eb2378a2a9a153de113cab1915e72a7")),
                                       backbone_lr_multiplier=1.0, name="tiny-deformable-detr-shapes"),
}
DATA = dict(train_images=800, val_images=200, image_size=192, seed=0)
PROCESSED_SIZE = 160  # the processor's resize: shortest edge (DETR) or square side (RT-DETR)
PLATEAU = 0.005  # trained to a plateau: at most 0.5 AP points gained over the last quarter of training


def plateau_gain(history: list[float]) -> float:
    """Validation AP gained over the last quarter of training: the best AP of the last quarter of
    evaluations against the best before it (a plateau gains <= PLATEAU)."""
    cut = len(history) - max(1, len(history) // 4)
    if cut < 1:
        return float("inf")
    return max(history[cut:]) - max(history[:cut])


def machine() -> str:
    """Where a training ran, for bundled.json: CPU model, cores, torch version."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def reference_detr_init(path: Path) -> None:
    """Re-initialise a DETR checkpoint as facebookresearch/detr does: Xavier-uniform transformer
    matrices, N(0, 1) object queries, PyTorch defaults for the heads and input projection.

    transformers' `_init_weights` draws all of these from N(0, 0.02) instead, which is harmless when
    loading pretrained weights but makes from-scratch cross-attention start near-uniform:
    query-key logits are ~40x smaller than with Xavier weights and N(0, 1) queries."""
    import torch
    from transformers import DetrForObjectDetection

    torch.manual_seed(0)
    model = DetrForObjectDetection.from_pretrained(path)
    with torch.no_grad():
        for module in (model.model.encoder, model.model.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    torch.nn.init.xavier_uniform_(p)
        torch.nn.init.normal_(model.model.query_position_embeddings.weight)
        model.class_labels_classifier.reset_parameters()
        for layer in model.bbox_predictor.layers:
            layer.reset_parameters()
        model.model.input_projection.reset_parameters()
    model.save_pretrained(path)


def set_config(path: Path, values: dict) -> None:
    """Change config values of the checkpoint at `path` (loss weights, matching costs)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for key, value in values.items():
        setattr(config, key, value)
    config.save_pretrained(path)


def transplant_backbone(path: Path, source: Path) -> None:
    """Give the checkpoint at `path` the backbone of the trained checkpoint `source`: its config,
    its weights, and its processor's pixel normalisation (the features were learnt on those inputs)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection

    config, src_config = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(source)
    config.backbone_config = src_config.backbone_config
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_config(config)
    weights = AutoModelForObjectDetection.from_pretrained(source).state_dict()
    backbone = {k: v for k, v in weights.items() if k.startswith("model.backbone.")}
    missing = [k for k in model.state_dict() if k.startswith("model.backbone.") and k not in backbone]
    if missing:
        raise SystemExit(f"{source} has no weights for {len(missing)} backbone tensors, e.g. {missing[0]}")
    model.load_state_dict(backbone, strict=False)
    model.save_pretrained(path)
    processor, src_processor = AutoImageProcessor.from_pretrained(path), AutoImageProcessor.from_pretrained(source)
    for key in ("do_normalize", "image_mean", "image_std"):
        setattr(processor, key, getattr(src_processor, key))
    processor.save_pretrained(path)


INIT_RECORD = "dapft_init.json"  # what the starting weights were made from


def checkpoint_at_commit(name: str, commit: str, dest: Path) -> Path:
    """The bundled checkpoint `name` as it was at `commit`, written under `dest` (git show)."""
    import subprocess

    folder = f"dapft/checkpoints/{name}"
    out = dest / name
    out.mkdir(parents=True)
    for file in ("config.json", "preprocessor_config.json", "model.safetensors"):
        proc = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{folder}/{file}"], capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"cannot read {folder}/{file} at commit {commit} ({proc.stderr.decode().strip()}); "
                             "this reproduction needs a git clone of dapft with its history")
        (out / file).write_bytes(proc.stdout)
    return out


def make_init(family: str, spec: dict, init: Path) -> None:
    """The starting checkpoint: random weights of the family's tiny architecture (DETR's with the
    original code's initialisation), a transplanted backbone where the spec says so, its config
    changes; and a record of what it was made from (the backbone's source, by file hash, since the
    bundled checkpoint of that name may be replaced later)."""
    import hashlib

    save_tiny_checkpoint(family, init, dict(enumerate(CLASSES)), image_size=PROCESSED_SIZE, **spec["arch"])
    record = {}
    if family == "detr":
        reference_detr_init(init)
    if "backbone_from" in spec:
        src = spec["backbone_from"]
        with tempfile.TemporaryDirectory() as tmp:
            source = checkpoint_at_commit(src["name"], src["commit"], Path(tmp))
            digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
            if digest != src["sha256"]:
                raise SystemExit(f"{source}: model.safetensors at commit {src['commit']} has sha256 {digest}, "
                                 f"not {src['sha256']}; the starting weights would differ from the bundled run's")
            transplant_backbone(init, source)
        record["backbone_from"] = {"checkpoint": f"dapft/{src['name']}", "commit": src["commit"],
                                   "model.safetensors sha256": digest}
    if spec.get("config"):
        set_config(init, spec["config"])
    (init / INIT_RECORD).write_text(json.dumps(record, indent=2))


def main() -> None:
    from dapft.utils.console import quiet_transformers

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bundled", help="Where the data and the training runs go.")
    ap.add_argument("--family", action="append", choices=sorted(BUNDLED), help="Default: all.")
    ap.add_argument("--epochs", type=int, help="Override the schedule's epochs.")
    ap.add_argument("--lr", type=float, help="Override the schedule's rate (trials).")
    ap.add_argument("--batch", type=int, help="Override the schedule's batch size (trials).")
    ap.add_argument("--eval-every", type=int, help="Override the schedule's evaluation interval.")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--save-every", type=int, help="Also checkpoint every N steps (a kill then costs less).")
    ap.add_argument("--install", action="store_true", help="Copy the result into dapft/checkpoints/.")
    ap.add_argument("--quick", action="store_true", help="A smoke test of the script: one epoch of batch 4 on 16 "
                    "generated images (8 validation), nothing installed.")
    args = ap.parse_args()
    if args.quick and args.install:
        ap.error("--quick trains nothing worth installing; leave out --install")
    work = Path(args.work)
    data = work / ("shapes-quick" if args.quick else "shapes")
    if not (data / "annotations" / "instances_val2017.json").exists():
        make_shapes_dataset(data, **{**DATA, **({"train_images": 16, "val_images": 8} if args.quick else {})})
    for family in args.family or sorted(BUNDLED):
        spec = BUNDLED[family]
        init = work / f"init-{family}"
        if not (init / INIT_RECORD).exists():  # made once: a resumed training keeps the start it had
            make_init(family, spec, init)
        run = work / f"train-{family}"
        spec = {**spec, **{k: v for k, v in (("lr", args.lr), ("batch", args.batch), ("eval_every", args.eval_every))
                           if v is not None}, **({"batch": 4, "lr_drop": None, "eval_every": 1} if args.quick else {})}
        epochs = 1 if args.quick else args.epochs or spec["epochs"]
        t0 = time.time()
        # From scratch: the method's own loss, one rate for the whole model (lr 1e-3 made the tiny
        # RT-DETR collapse to a loss plateau; 2e-4 trains), /10 in the last epoch (lr_factor). A
        # random backbone must train (no recipe freezing), and no EMA: each epoch's AP is the
        # model's own, so that the plateau below reads the training, not the average's lag.
        try:
            report = finetune(FinetuneConfig(
                model=str(init), data=str(data), output=str(run), loss="original", epochs=epochs,
                batch_size=spec["batch"], lr=spec["lr"], lr_drop=spec.get("lr_drop"),
                eval_every=spec.get("eval_every", 1), seed=0, device="cpu", save_every=args.save_every,
                backbone_lr_multiplier=spec.get("backbone_lr_multiplier", 1.0),
                num_workers=args.num_workers, eval_before=False, freeze_backbone=False, ema=False,
                resume=(run / "checkpoint-last").exists()))
        except TrainingInterrupted as stopped:  # Ctrl-C / SIGTERM: checkpoint saved; the same command resumes
            print(f"{stopped} (this script adds --resume itself: rerun it as it was)", file=sys.stderr)
            sys.exit(stopped.exit_code)
        best = report["best"]
        evals = [h for h in report["history"] if h["tag"] != "before"]
        history = [h["AP"] for h in evals]
        gain = plateau_gain(history)
        # The plateau counts only once the rate has been lowered (a step schedule, or the last epoch's drop).
        drops = spec.get("lr_drop") or [epochs - 1]
        drop = drops[0]
        plateau = gain <= PLATEAU and drop < evals[-1]["epoch"]
        print(f"{family}: best val AP {100 * best['AP']:.2f} at epoch {best['epoch']} ({time.time() - t0:.0f} s "
              f"this invocation, {report['train_seconds']:.0f} s in all); AP gained over the last quarter of the "
              f"evaluations {100 * gain:+.2f} points ({'a plateau' if plateau else 'not a plateau'}: <= "
              f"{100 * PLATEAU:.1f} after the rate drop at epoch {drop} is one)")
        if args.install:
            dest = REPO / "dapft" / "checkpoints" / spec["name"]
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run / "checkpoint-best", dest)
            for run_only in ("dapft_checkpoint.json", "README.md"):  # the run's manifest and model card
                (dest / run_only).unlink(missing_ok=True)
            model_family = "deformable_detr" if family.startswith("deformable_detr") else family  # recipe name
            # Its own recipe, so that `dapft finetune` applies the paper's schedule relative to how
            # this model was trained: rate / 10 (/ 100 in the last epoch), 10% of its epochs.
            (dest / "dapft_recipe.yaml").write_text(yaml.safe_dump({
                "family": model_family, "pretrain_lr": spec["lr"],
                "backbone_lr_multiplier": spec.get("backbone_lr_multiplier", 1.0), "weight_decay": 1e-4,
                "optimizer": "adamw", "clip_grad_norm": 0.1, "pretrain_epochs": epochs, "pretrain_lr_drop": drops,
                "epochs": max(1, round(epochs / 10)), "batch_size": spec["batch"], "auxiliary_loss": True,
                # the family's per-parameter rates it was trained with (Deformable DETR's offsets)
                **{k: v for k, v in load_recipe(model_family).items() if k.startswith("linear_proj")}}))
            (dest / "bundled.json").write_text(json.dumps({
                "family": family, "data": {"kind": "shapes", **DATA}, "val": report["best"],
                "val_history": [round(ap, 5) for ap in history],
                "val_epochs": [h["epoch"] for h in evals], "last_quarter_gain": round(gain, 5),
                "plateau": plateau, "lr_drop_epoch": drop, "lr_drop_epochs": drops,
                "command": f"python scripts/train_tiny_detectors.py --family {family} --epochs {epochs}"
                           + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("lr", args.lr), ("batch", args.batch),
                                                                                 ("eval_every", args.eval_every)) if v)
                           + " --install",
                "train_seconds": report["train_seconds"], "machine": machine(),
                "init": json.loads((init / INIT_RECORD).read_text()),
                "schedule": {**spec, "epochs": epochs}}, indent=2))
            print(f"installed {dest}")


if __name__ == "__main__":
    main()
