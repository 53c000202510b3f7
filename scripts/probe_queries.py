"""How much class information a detector's matched queries carry: a linear probe on the last
decoder layer's output of the query the Hungarian matcher gives each ground truth.

    python scripts/probe_queries.py dapft/checkpoints/tiny-rtdetr-shapes --data runs/bundled/shapes

Runs the model over the first `--batches` x 8 training images, matches each ground truth to a query
(transformers' Deformable DETR matcher: class 1, L1 5, GIoU 2), trains a logistic regression on the
first half of those (query output, class) pairs and prints its top-1 accuracy on the second half,
next to the model's own class head and the commonest class's share. Used in REPRODUCTION.md to
tell "the queries carry no class information" from "the head did not learn to read it".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    from dapft.data.labels import LabelMap
    from dapft.data.loader import BatchLoader, CocoDetection
    from dapft.data.splits import load_split, resolve_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint directory")
    ap.add_argument("--data", default="runs/bundled/shapes", help="a COCO-layout root (its train split is used)")
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForObjectDetection.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    split = load_split(resolve_split(args.data, "train"))
    labels = LabelMap.build(split.categories, model.config.id2label)
    loader = BatchLoader(CocoDetection(split, labels), processor, batch_size=8, train=False, num_workers=0)
    matcher = DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    features, classes, head = [], [], []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == args.batches:
                break
            out = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"))
            for j, (q, g) in enumerate(matcher({"logits": out.logits, "pred_boxes": out.pred_boxes}, batch["labels"])):
                features.append(out.last_hidden_state[j, q])
                classes.append(batch["labels"][j]["class_labels"][g])
                head.append(out.logits[j, q].argmax(-1))
    x, y, own = torch.cat(features), torch.cat(classes), torch.cat(head)
    half = len(y) // 2
    x = (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:half] @ weight + bias, y[:half]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        opt.step()
    probe = ((x[half:] @ weight + bias).argmax(-1) == y[half:]).float().mean()
    print(f"| {args.model} | {len(y)} ground truths | class head {100 * (own == y).float().mean():.0f}% | "
          f"linear probe (held out) {100 * probe:.0f}% | commonest class {100 * torch.bincount(y).max() / len(y):.0f}% |")


if __name__ == "__main__":
    main()
