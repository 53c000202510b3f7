"""Does the suite catch the bugs a reviewer would plant? Each mutant below is one small, plausible
change to the training path; every one is applied to a fresh copy of the project and the tests that
cover its module are run there. A mutant the tests fail on is caught; one they pass is a hole.

    python scripts/mutation_check.py                 # all mutants, their modules' tests
    python scripts/mutation_check.py --only dap      # the mutants of dapft/dap.py
    python scripts/mutation_check.py --list

Prints a table and the score (caught / all). The working tree is never modified: each mutant lives
in a temporary copy, imported first (PYTHONPATH), which the script checks before trusting a result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (module, original text, mutated text, what it breaks). Each original must occur exactly once.
# Left out as equivalent: L_int's segment taken left instead of right of an anchor (L_int is
# continuous: both sides give the same value there).
MUTANTS = [
    ("dap", "reached = (ious[:, None] >= iou_thresholds[None, :]).sum(1)",
     "reached = (ious[:, None] > iou_thresholds[None, :]).sum(1)", "IoU thresholds compared with > (COCO: >=)"),
    ("dap", "tail = 2 * cum[..., -1:, :] - prev[..., -1:, :]", "tail = cum[..., -1:, :]",
     "L_int's extrapolated anchor y_{K+1} replaced by y_K"),
    ("matcher", "score_gq = scores[gt_image, :, gt_labels]", "score_gq = scores[gt_image].amax(-1)",
     "momentum matcher scores the best class, not the ground truth's"),
    ("matcher", "precision = self.precision_ema if self.mode == \"momentum\" else None", "precision = None",
     "momentum matcher ignores its estimate"),
    ("matcher", "self.precision_ema.mul_(self.momentum).add_(p, alpha=1.0 - self.momentum)",
     "self.precision_ema.mul_(1.0).add_(p, alpha=0.0)", "momentum estimate never updated"),
    ("criterion", "self.matcher.update(precision[-groups:].mean((0, 1)))",
     "self.matcher.update(precision[:groups].mean((0, 1)))", "momentum estimate from the first decoder layer"),
    ("criterion", "layer_daps = daps.view(num_layers, groups).mean(1)",
     "layer_daps = daps.view(num_layers, groups).sum(1)", "Group DETR sums its groups' DAPs"),
    ("criterion", ' or (self.loss == "dap+box" and box):', ":", "dap+box drops its box terms"),
    ("criterion", "pos_index = (img_idx * queries + q_idx) * num_classes + gt_labels",
     "pos_index = (img_idx * queries + q_idx) * num_classes + (gt_labels + 1) % num_classes",
     "positives put on the wrong class"),
    ("criterion", "+ torch.arange(num_classes, device=device)).expand",
     "+ torch.arange(num_classes, device=device).flip(0)).expand", "per-class candidate labels in the wrong order"),
    ("engine", "return 0.1 if epochs >= 2 and epoch == epochs - 1 else 1.0", "return 1.0",
     "no /100 learning rate in the last epoch"),
    ("engine", 'self.criterion.load_state_dict(trainer_state["criterion"])', "pass",
     "matcher estimate not restored on --resume"),
    ("engine", "loss = out.loss / self.cfg.grad_accum", "loss = out.loss", "loss not divided by --grad-accum"),
    ("engine", '"backbone": cfg.backbone_lr_multiplier,', '"backbone": 1.0,', "backbone trained at the full rate"),
    ("engine", '"linear_proj": float(cfg.extra.get("linear_proj_lr_multiplier", 1.0))', '"linear_proj": 1.0',
     "Deformable DETR's sampling offsets and reference points at the full rate"),
    ("engine", 'self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else float("inf")',
     'max(self.cfg.clip_grad_norm, 0.1)', "--clip-grad-norm 0 still clips"),
    ("engine", "own if own is not None and own.is_file() else", "own if own is not None and own.is_file() and recipe else",
     "a checkpoint's own recipe ignored"),
    ("evaluate", 'idx = det["scores"].topk(k).indices', "idx = torch.arange(k)",
     "the 100-detection cap keeps the first queries, not the best"),
    ("evaluate", "p = precision[:, :, k, 0, -1]", "p = precision[:, :, k, 0, 0]",
     "per-class AP read at 1 detection an image, not 100"),
    ("evaluate", "ev.params.imgIds = sorted(image_ids)", "pass",
     "evaluation scores every image, not the --max-eval-images subset"),
    ("evaluate", 'data["annotations"] = [a for a in data["annotations"] if a.get("id") not in exclude]', "pass",
     "boxes skipped in training still scored"),
]

# The tests that cover each module (the whole suite would also do, in about 5 minutes a mutant).
TESTS = {
    "dap": ["tests/test_dap_vs_pycocotools.py", "tests/test_dap_properties.py", "tests/test_dap_kernel.py"],
    "matcher": ["tests/test_matcher.py", "tests/test_criterion.py",
                "tests/test_cli.py::test_momentum_matcher_resumes_with_its_estimate"],
    "criterion": ["tests/test_criterion.py", "tests/test_models.py"],
    "engine": ["tests/test_cli.py::test_the_schedule_follows_the_recipe_a_tenth_then_a_hundredth",
               "tests/test_cli.py::test_momentum_matcher_resumes_with_its_estimate",
               "tests/test_cli.py::test_grad_accum_2_of_batch_4_is_one_batch_of_8_for_the_original_loss",
               "tests/test_cli.py::test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees_and_0_turns_it_off",
               "tests/test_recipes.py::test_real_size_detr_like_trains_layer2_to_4_and_the_transformer_only",
               "tests/test_recipes.py::test_a_checkpoints_own_recipe_comes_before_the_familys_and_recipe_file_before_both"],
    "evaluate": ["tests/test_data_eval.py"],
}


def _copy(dest: Path) -> None:
    for name in ("dapft", "tests", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)


def _run(root: Path, tests: list[str]) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import dapft; print(dapft.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        raise SystemExit(f"the copy's dapft is not the one imported ({where}); cannot test mutants")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          env=env, capture_output=True, text=True)
    return proc.returncode == 0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="a module: " + ", ".join(TESTS))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if args.only in (None, m[0])]
    if args.list:
        for module, _, _, what in mutants:
            print(f"{module:10s} {what}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        _copy(baseline)
        for module in sorted({m[0] for m in mutants}):
            passed, _ = _run(baseline, TESTS[module])
            if not passed:
                raise SystemExit(f"the unmutated tests of {module} fail; fix them first")
        for i, (module, old, new, what) in enumerate(mutants):
            root = Path(tmp) / f"m{i}"
            _copy(root)
            path = root / "dapft" / f"{module}.py"
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {what!r}: its original text occurs {text.count(old)} times in {module}.py")
            path.write_text(text.replace(old, new))
            passed, seconds = _run(root, TESTS[module])
            rows.append((module, what, not passed, seconds))
            print(f"{'caught  ' if not passed else 'SURVIVED'} {module:9s} {what} ({seconds:.0f} s)", flush=True)
            shutil.rmtree(root)
    caught = sum(r[2] for r in rows)
    print("\n| module | mutant | caught |\n|---|---|---|")
    for module, what, ok, _ in rows:
        print(f"| {module} | {what} | {'yes' if ok else '**no**'} |")
    print(f"\nscore: {caught} / {len(rows)} caught ({100 * caught / max(1, len(rows)):.0f}%)")


if __name__ == "__main__":
    main()
