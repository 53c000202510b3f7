"""Does the suite catch bugs nobody listed? Mutants are generated mechanically from the code (AST
operators: comparison and arithmetic swaps, `and`/`or`, a removed `not`, changed constants, a
dropped statement, swapped call arguments) inside the functions that decide what a run computes;
each is applied to a fresh copy of the project and the tests that cover its module run there. A
mutant the tests fail on (or that hangs) is caught; one they pass survives, and is either a hole
(a test is owed) or equivalent (the reason is listed in EQUIVALENT below).

    python scripts/mutation_check.py --list                     # what would be generated, per module
    python scripts/mutation_check.py --per-module 15 --seed 0   # a seeded sample of each module's mutants
    python scripts/mutation_check.py --module dap --all         # every mutant of one module
    python scripts/mutation_check.py --planted                  # the hand-written mutants of issue #13

Prints every mutant's verdict, the survivors with their source line, and the score over the
non-equivalent mutants. The working tree is never modified: each mutant lives in a temporary copy,
imported first (PYTHONPATH), which the script checks before trusting a result.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Where mutants are generated (target -> functions; "*" = every function of the file), the file of
# each target (below dapft/), and the tests that cover each target. The decision functions only, for
# the sweep, config, state and the training loop.
TARGETS = {
    "dap": "*",
    "matcher": "*",
    "criterion": "*",
    "detection_loss": "*",
    "freeze": "*",
    "ema": "*",
    "sweep_settings": ["expand", "run_name"],
    "sweep_statistics": ["summarize", "paired"],
    "sweep": ["same_settings", "_before_identity", "_shared_before"],
    "config": ["resumed_config", "check_choices", "resolve", "lr_factor", "_as_flag"],
    "state": ["record_evaluation", "apply_patience", "new_state", "read_log", "truncate"],
    "trainer": ["_train_one_epoch", "_end_of_epoch"],
    "step": ["optimizer_step"],
    "evaluations": ["evaluate_epoch"],
    "evaluate": ["to_coco_results", "_top", "coco_evaluate", "predict"],
    # the data path: what a model is shown (files to tensors, augmentation, batches, data order)
    "splits": "*",
    "coco_file": "*",
    "flat_split": "*",
    "image_check": "*",
    "labels": "*",
    "loader": "*",
    "preprocess": "*",
    # issue #39: what gives a wrong answer or a lost hour without a crash
    "errors": "*",
    "trackers": "*",
    "checkpoint": "*",
    "distributed": "*",
    "predict": "*",
    "gallery": ["errors_of", "most_changed", "worst", "detections_by_image", "_xyxy", "_image_parts",
                "write_worst", "write_changed", "read_evaluation"],  # what it selects, not how it draws
    "slurm": ["check", "__call__", "submit_sweep"],
    "files": ["take_lock", "__enter__", "__exit__", "atomic_write_text"],  # the output folders' locks
    "signals": ["also_stop_on", "stop_after_progress", "_record_stop", "saved_progress", "may_stop_now", "pending_stop",
                "__enter__", "__exit__", "_handle", "_raise_for", "stopped_by_sigterm", "defer_interrupts",
                "deliver_interrupts"],
    "sweep_grid": ["_claim", "_held", "_rows", "_run_one", "_stop_if_requested", "_before", "sweep"],
}
FILE_OF = {
    "dap": "objective/dap", "matcher": "objective/matcher", "criterion": "objective/criterion",
    "detection_loss": "objective/detection_loss", "freeze": "training/freeze", "ema": "training/ema",
    "sweep_settings": "sweeps/settings", "sweep_statistics": "sweeps/statistics", "sweep": "sweeps/grid",
    "config": "training/config", "state": "training/state", "trainer": "training/trainer", "step": "training/step",
    "evaluations": "training/evaluations", "assemble": "training/assemble", "evaluate": "analysis/evaluate",
    "splits": "data/splits", "coco_file": "data/coco_file", "flat_split": "data/flat_split",
    "image_check": "data/image_check", "labels": "data/labels", "loader": "data/loader",
    "preprocess": "data/preprocess", "errors": "analysis/errors", "trackers": "utils/trackers",
    "checkpoint": "utils/checkpoint", "distributed": "utils/distributed", "predict": "analysis/predict",
    "gallery": "analysis/gallery", "slurm": "sweeps/slurm", "files": "utils/files", "signals": "utils/signals",
    "sweep_grid": "sweeps/grid",
}
CLI = "tests/test_cli.py::"
REAL = "tests/test_real_world.py::"
SPREAD = "tests/test_sweep_spread.py::"
# The data path's tests that need files as users have them (EXIF photos, annotation files as tools
# write them, the image-check cache) or several workers.
DATA_REAL_WORLD = [REAL + "test_photos_stored_rotated_with_an_exif_orientation_score_as_upright",
                   REAL + "test_repeated_annotation_ids_are_refused_naming_the_id",
                   REAL + "test_missing_iscrowd_and_area_mean_0_and_the_box_area",
                   REAL + "test_annotation_files_with_missing_ids_or_text_ids_are_refused_before_any_work",
                   REAL + "test_the_image_check_cache_rechecks_a_file_replaced_in_place_and_survives_a_bad_cache"]
LOADER_REAL_WORLD = [REAL + "test_photos_stored_rotated_with_an_exif_orientation_score_as_upright",
                     REAL + "test_the_number_of_workers_does_not_change_the_trained_weights"]
TESTS = {
    "dap": ["tests/test_dap_vs_pycocotools.py", "tests/test_dap_properties.py", "tests/test_dap_kernel.py"],
    "matcher": ["tests/test_matcher.py", "tests/test_criterion.py",
                CLI + "test_momentum_matcher_resumes_with_its_estimate"],
    # with the two-process test: the DAP statistics' all-reduce lives in objective/criterion.py
    "criterion": ["tests/test_criterion.py", "tests/test_models.py",
                  "tests/test_distributed.py::test_two_processes_match_one_process_on_the_concatenated_batch"],
    "detection_loss": ["tests/test_criterion.py", "tests/test_models.py"],
    "freeze": ["tests/test_recipes.py", "tests/test_run_rules.py"],
    "ema": ["tests/test_recipes.py", CLI + "test_with_an_ema_the_reported_best_and_last_ap_are_those_of_the_saved_weights",
            CLI + "test_rtdetr_keeps_an_ema_and_a_killed_run_resumes_to_the_same_ema_and_weights"],
    "sweep_settings": ["tests/test_run_rules.py"],
    "sweep_statistics": ["tests/test_run_rules.py", CLI + "test_sweep_over_loss_and_seed_pairs_each_setting_with_the_original_loss"],
    "sweep": ["tests/test_run_rules.py", CLI + "test_sweep_over_loss_and_seed_pairs_each_setting_with_the_original_loss",
              "tests/test_real_world.py::test_a_sweep_run_again_with_other_fixed_settings_is_refused_and_a_stale_before_is_redone",
              "tests/test_real_world.py::test_a_sweep_killed_in_its_first_run_continues_when_run_again"],
    "config": ["tests/test_run_rules.py", CLI + "test_the_schedule_follows_the_recipe_a_tenth_then_a_hundredth",
               "tests/test_recipes.py::test_a_checkpoints_own_recipe_comes_before_the_familys_and_recipe_file_before_both",
               CLI + "test_resume_continues_with_the_runs_settings_and_refuses_different_ones"],
    "state": ["tests/test_run_rules.py", CLI + "test_patience_stops_the_run_and_the_report_says_so",
              CLI + "test_checkpoint_best_holds_the_best_evaluation_and_a_half_swapped_last_still_resumes",
              "tests/test_real_world.py::test_a_torn_last_log_line_does_not_stop_a_resume",
              "tests/test_real_world.py::test_more_patience_on_resume_trains_again"],
    "trainer": [CLI + "test_eval_every_evaluates_every_n_epochs_and_after_the_last",
               CLI + "test_grad_accum_2_of_batch_4_is_one_batch_of_8_for_the_original_loss",
               CLI + "test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees_and_0_turns_it_off",
               CLI + "test_a_diverging_run_stops_at_the_bad_step_and_keeps_finite_checkpoints",
               CLI + "test_killed_run_resumes_to_the_same_weights",
               CLI + "test_the_schedule_follows_the_recipe_a_tenth_then_a_hundredth",
               CLI + "test_checkpoint_best_holds_the_best_evaluation_and_a_half_swapped_last_still_resumes"],
    "step": [CLI + "test_grad_accum_2_of_batch_4_is_one_batch_of_8_for_the_original_loss",
             CLI + "test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees_and_0_turns_it_off",
             CLI + "test_a_diverging_run_stops_at_the_bad_step_and_keeps_finite_checkpoints",
             CLI + "test_killed_run_resumes_to_the_same_weights"],
    "evaluations": [CLI + "test_eval_every_evaluates_every_n_epochs_and_after_the_last",
                    CLI + "test_checkpoint_best_holds_the_best_evaluation_and_a_half_swapped_last_still_resumes",
                    CLI + "test_patience_stops_the_run_and_the_report_says_so"],
    "evaluate": ["tests/test_data_eval.py"],
    **{target: ["tests/test_data_eval.py", "tests/test_augment.py", *DATA_REAL_WORLD]
       for target in ("splits", "coco_file", "flat_split", "image_check", "labels")},
    "loader": ["tests/test_augment.py", "tests/test_preprocess.py", "tests/test_data_eval.py", *LOADER_REAL_WORLD],
    "preprocess": ["tests/test_preprocess.py", "tests/test_augment.py",
                   "tests/test_data_eval.py::test_collated_boxes_frame_the_objects_after_processing"],
    "errors": ["tests/test_errors.py", "tests/test_data_eval.py"],
    "trackers": ["tests/test_trackers.py"],
    "checkpoint": ["tests/test_checkpoint.py", CLI + "test_a_corrupted_checkpoint_is_refused_before_it_is_used",
                   CLI + "test_corrupt_or_partial_checkpoints_are_refused",
                   CLI + "test_checkpoint_best_holds_the_best_evaluation_and_a_half_swapped_last_still_resumes",
                   CLI + "test_killed_run_resumes_to_the_same_weights",
                   REAL + "test_a_run_that_never_checkpointed_starts_afresh_or_resumes_from_step_0"],
    "distributed": ["tests/test_distributed.py", SPREAD + "test_finetune_on_two_machines_one_lost_mid_run_resumes_to_one_machines_weights",
                    SPREAD + "test_a_sweep_on_two_machines_one_lost_mid_run_continues_and_ends_at_one_machines_weights",
                    SPREAD + "test_torchruns_sigterm_ends_a_process_blocked_on_a_hung_peer_with_a_line_saying_so"],
    "predict": ["tests/test_predict.py"],
    "gallery": ["tests/test_errors.py", "tests/test_predict.py"],
    "slurm": ["tests/test_slurm.py"],
    "signals": [REAL + "test_sigterm_and_ctrl_c_save_a_checkpoint_and_resume_to_the_same_weights",
                      REAL + "test_ctrl_c_and_sigterm_at_start_up_in_eval_and_twice_in_training_exit_by_the_signal_with_one_line",
                      REAL + "test_a_second_process_on_the_same_output_is_refused_naming_the_holder",
                      CLI + "test_an_output_that_cannot_be_written_is_refused_before_inference",
                      CLI + "test_ctrl_c_in_a_sweep_saves_the_run_and_the_same_command_continues_it",
                      "tests/test_slurm.py::test_a_worker_signalled_before_its_first_step_stops_after_one_step_saved",
                      "tests/test_slurm.py::test_a_sweep_worker_signalled_while_nothing_is_saved_keeps_its_evaluation_"
                      "before_and_starts_no_run",
                      SPREAD + "test_a_run_another_worker_holds_is_left_to_it_and_the_summary_says_so",
                      SPREAD + "test_two_workers_divide_a_grid_each_run_made_once_and_the_summary_one_workers"],
    "sweep_grid": ["tests/test_sweep_spread.py", "tests/test_slurm.py::test_a_worker_signalled_before_its_first_step_stops_after_one_step_saved",
                   "tests/test_slurm.py::test_a_sweep_worker_signalled_while_nothing_is_saved_keeps_its_evaluation_"
                   "before_and_starts_no_run",
                   CLI + "test_ctrl_c_in_a_sweep_saves_the_run_and_the_same_command_continues_it",
                   CLI + "test_sweep_over_loss_and_seed_pairs_each_setting_with_the_original_loss",
                   REAL + "test_a_diverging_grid_value_is_recorded_as_failed_and_the_others_run",
                   REAL + "test_a_sweep_killed_in_its_first_run_continues_when_run_again"],
}

TESTS["files"] = TESTS["signals"]  # the output folders' locks: the tests of who holds a folder and stops

# Mutants that cannot change behaviour, by (module, function, source line as written, operator),
# with the reason. A survivor not listed here is a hole in the suite.
EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    # issue #39's modules
    ("signals", "_record_stop", '"evaluation before fine-tuning, a training step, a run)", markup=False)',
     "constant False->True"):
        "the line holds no [brackets] for rich to read as markup: printed alike either way",
    ("gallery", "most_changed", "take_better = min(len(better), max(n // 2, n - len(worse)))", "swap arguments"):
        "min is symmetric in its two arguments",
    ("gallery", "write_changed", 'word = "fewer" if change < 0 else "more"', "constant 0->1"):
        "most_changed gives only images whose error count changed (c < 0 or c > 0): change is never 0, and "
        "for every other integer `change < 1` is `change < 0`",
    ("criterion", "matched_candidates", "matched_iou = box_iou(", "swap arguments"):
        "IoU is symmetric: box_iou(b, a) is box_iou(a, b) transposed, and the diagonal is read",
    ("freeze", "parts", 'return ("all",)', "drop statement"):
        "the whole backbone frozen is then marked None instead of ('all',): either differs from every "
        "(stem, stages, norm) triple and equals only itself",
    ("freeze", "parts", "return (spec.stem, spec.stages, spec.norm) if spec.whole is None else (False, 0, spec.norm)",
     "Is->IsNot"):
        "swaps which of the recipe (None) and --train-backbone (False) gets which tuple; both sides of the "
        "comparison are mapped alike, so which pairs compare equal is unchanged",
    ("state", "truncate", 'keep = [json.dumps(r) for r in read_log(self.path) if r.get("global_step", 0) <= '
                          'global_step]', "constant 0->1"):
        "the default of a record without global_step: every record dapft writes has one",
    # the data path
    ("image_check", "_verdict_cache", 'return root / "checked-images" / (hashlib.sha1(str(images.resolve()).encode())'
                               '.hexdigest()[:16] + ".json")', "constant 16->17"):
        "the length of the cache file's name: any name fixed per image folder serves (a cache written under "
        "the other name is not found, and the images are checked once more)",
    ("loader", "_read_with_pil", 'top = 65535.0 if im.mode.startswith("I;16") or deep.max() <= 65535 else '
                                 'float(deep.max())', "LtE->Lt"):
        "at the boundary deep.max() == 65535 both branches give top = 65535",
    ("loader", "_read_with_pil", "im = Image.fromarray(np.clip(deep / top * 255.0 + 0.5, 0, 255).astype(np.uint8))",
     "constant 255->256"):
        "top is at least deep.max(), so deep / top * 255 + 0.5 is at most 255.5, which uint8 truncates to 255 "
        "under either bound",
    ("loader", "default_num_workers", "return max(1, min(cap, cpus // max(1, processes_per_node) - 1))",
     "swap arguments"):
        "min and max are symmetric in their two arguments",
    ("loader", "__call__", "ch, cw = rng.randint(min(self.lo, h), min(h, self.hi)), rng.randint(min(self.lo, w), "
                           "min(w, self.hi))", "swap arguments"):
        "a min's arguments swapped is the same min; randint's swapped raises for any crop range wider than "
        "one pixel (caught)",
    ("preprocess", "processor_settings", 'return dict(size=size, pixels=pixels, pad=bool(_get(processor, "do_pad", '
                                         'False)),', "constant False->True"):
        "the default is read only for a processor without do_pad, and every DETR-family processor has one; for "
        "one without, the probe batch (reproduces) would refuse a wrong guess and use the processor itself",
    ("loader", "__iter__", "yield (i, (self.seed * 7_919 + self.epoch) * 1_000_003 + i)", "Add->Sub"):
        "the sample seeds are arbitrary numbers: what a run relies on is that they differ between images and "
        "epochs and stay the same for a (seed, epoch, image), which the mutant keeps and the tests hold",
    ("loader", "_order", "g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)",
     "constant 1000003->1000004"):
        "the data order's seed is an arbitrary number: another multiplier gives another order, still fixed by "
        "(seed, epoch) and different between epochs, which the tests hold",
    ("loader", "__iter__", "yield (i, (self.seed * 7_919 + self.epoch) * 1_000_003 + i)", "constant 7919->7920"):
        "as above: another arbitrary multiplier, the seeds still distinct by image and epoch",
}

# The hand-written mutants of issue #13 (module, original text, mutated text, what it breaks).
PLANTED = [
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
    ("detection_loss", ' or (self.loss == "dap+box" and box):', ":", "dap+box drops its box terms"),
    ("criterion", "pos_index = (img_idx * queries + q_idx) * num_classes + gt_labels",
     "pos_index = (img_idx * queries + q_idx) * num_classes + (gt_labels + 1) % num_classes",
     "positives put on the wrong class"),
    ("criterion", "+ torch.arange(num_classes, device=device)).expand",
     "+ torch.arange(num_classes, device=device).flip(0)).expand", "per-class candidate labels in the wrong order"),
    ("config", "    return 10.0 ** -sum(epoch >= drop for drop in lr_drop)", "    return 1.0",
     "no /100 learning rate in the last epoch"),
    ("state", 'run.criterion.load_state_dict(trainer_state["criterion"])', "pass",
     "matcher estimate not restored on --resume"),
    ("step", "run.scaler.scale(out.loss / grad_accum).backward()", "run.scaler.scale(out.loss).backward()",
     "loss not divided by --grad-accum"),
    ("assemble", '"backbone": cfg.backbone_lr_multiplier,', '"backbone": 1.0,', "backbone trained at the full rate"),
    ("assemble", '"linear_proj": float(cfg.extra.get("linear_proj_lr_multiplier", 1.0))', '"linear_proj": 1.0',
     "Deformable DETR's sampling offsets and reference points at the full rate"),
    ("step", 'clip_grad_norm if clip_grad_norm > 0 else float("inf")',
     'max(clip_grad_norm, 0.1)', "--clip-grad-norm 0 still clips"),
    ("config", "own if own is not None and own.is_file() else", "own if own is not None and own.is_file() and recipe else",
     "a checkpoint's own recipe ignored"),
    ("evaluate", 'idx = det["scores"].topk(k).indices', "idx = torch.arange(k)",
     "the 100-detection cap keeps the first queries, not the best"),
    ("evaluate", "p = precision[:, :, k, 0, -1]", "p = precision[:, :, k, 0, 0]",
     "per-class AP read at 1 detection an image, not 100"),
    ("evaluate", "ev.params.imgIds = sorted(image_ids)", "pass",
     "evaluation scores every image, not the --max-eval-images subset"),
    ("flat_split", "rows = np.flatnonzero(self.use != SKIPPED)", "rows = np.flatnonzero(self.use == TRAINED)",
     "crowd regions left out of the evaluation's ground truth (detections on them count as false positives)"),
    # issue #19's behaviours, each with the test written for it
    ("freeze", "if isinstance(module, _NORM_TYPES) and (spec.norm or spec.whole):",
     "if isinstance(module, _NORM_TYPES) and spec.norm:", "--freeze-backbone leaves BatchNorm statistics moving"),
    ("evaluations", "model = run.ema.module if run.ema is not None else run.model", "model = run.model",
     "the raw weights evaluated (and chosen as best) while the EMA is saved"),
    ("sweep_statistics", 'shared = [k for k in setting_keys if k not in DAP_ONLY and k != "loss"]', "shared = []",
     "a DAP run paired with the original-loss run of another lr or batch size"),
    ("config", "if given and not same:", 'if given and not same and f.name != "weight_decay":',
     "--weight-decay accepted on resume though it differs"),
    ("config", "and all(d > reached for d in asked[len(saved):])", "",
     "a resumed run adds a rate drop inside the epochs it already trained"),
    ("config", "lr_drop = [epochs - 1 if epochs >= 2 else epochs]", "lr_drop = [epochs - 1]",
     "a one-epoch run trains at a hundredth of the original rate"),
]
PLANTED_TESTS = {**TESTS, "freeze": ["tests/test_recipes.py"],
                 "state": TESTS["state"] + [CLI + "test_momentum_matcher_resumes_with_its_estimate"],
                 "step": TESTS["step"] + TESTS["ema"][1:],
                 "evaluations": TESTS["evaluations"] + TESTS["ema"][1:],
                 "assemble": [CLI + "test_the_schedule_follows_the_recipe_a_tenth_then_a_hundredth",
                                       "tests/test_recipes.py::test_real_size_detr_like_trains_layer2_to_4_and_the_transformer_only"],
                 "flat_split": ["tests/test_data_eval.py"]}


# ---------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Mutant:
    module: str
    function: str
    line: int
    operator: str
    source: str  # the original line, stripped
    index: int  # which eligible node of the module (in walk order) the operator applies to

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.module, self.function, self.source, self.operator)


SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


def _operators(node: ast.AST) -> list[str]:
    """The mutations that apply to `node`."""
    ops = []
    if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
        ops.append(f"{type(node.ops[0]).__name__}->{SWAPS[type(node.ops[0])].__name__}")
    elif isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
        ops.append(f"{type(node.op).__name__}->{SWAPS[type(node.op)].__name__}")
    elif isinstance(node, ast.BoolOp):
        ops.append(f"{type(node.op).__name__}->{SWAPS[type(node.op)].__name__}")
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        ops.append("drop not")
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        ops.append(f"constant {node.value!r}->{_changed(node.value)!r}")
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr, ast.Raise, ast.Return)) and not _inert(node):
        ops.append("drop statement")
    if isinstance(node, ast.Call) and len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]):
        ops.append("swap arguments")
    return ops


def _changed(value):
    """A constant's mutant: True and False swapped, an integer plus one, a float doubled (0.0: 1.0)."""
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else (value * 2 if value else 1.0)


def _inert(node: ast.AST) -> bool:
    """A docstring, or a `return` of nothing or None (dropping it would write it again)."""
    value = getattr(node, "value", None)
    if not isinstance(node, (ast.Expr, ast.Return)):
        return False
    return value is None or (isinstance(value, ast.Constant) and (isinstance(node, ast.Expr) or value.value is None))


def _in_message(node: ast.AST, parents: dict) -> bool:
    """Inside an f-string or a raised exception's arguments: text, not behaviour."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.Call) and isinstance(parents.get(node), ast.Raise):
            return True
    return False


def _eligible(tree: ast.Module, functions) -> list[tuple[ast.AST, str, str]]:
    """(node, enclosing function, operator) for every mutation inside the target functions."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (functions != "*" and fn.name not in functions):
            continue
        for node in ast.walk(fn):
            if node is fn or _in_message(node, parents):
                continue
            for op in _operators(node):
                out.append((node, fn.name, op))
    return out


def generate(module: str) -> list[Mutant]:
    path = REPO / "dapft" / f"{FILE_OF[module]}.py"
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    return [Mutant(module, fn, node.lineno, op, lines[node.lineno - 1].strip(), i)
            for i, (node, fn, op) in enumerate(_eligible(tree, TARGETS[module]))]


def apply(mutant: Mutant, text: str) -> str:
    tree = ast.parse(text)
    node, _, op = _eligible(tree, TARGETS[mutant.module])[mutant.index]
    if op == "drop statement":
        replacement = ast.Pass() if not isinstance(node, ast.Return) else ast.Return(value=ast.Constant(None))
        ast.copy_location(replacement, node)
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if isinstance(value, list) and node in value:
                    value[value.index(node)] = replacement
    elif op == "swap arguments":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    elif op == "drop not":
        node.op = ast.UAdd()  # +x is x for the bools and tensors used here
        node.operand = ast.Call(func=ast.Name("bool", ast.Load()), args=[node.operand], keywords=[]) \
            if not isinstance(node.operand, ast.Call) else node.operand
    elif op.startswith("constant"):
        node.value = _changed(node.value)
    else:
        new = SWAPS[type(node.ops[0] if isinstance(node, ast.Compare) else node.op)]()
        if isinstance(node, ast.Compare):
            node.ops[0] = new
        else:
            node.op = new
    return ast.unparse(ast.fix_missing_locations(tree))


# ---------------------------------------------------------------------------------------------- running


def _copy(dest: Path) -> None:
    for name in ("dapft", "tests", "recipes", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
        else:
            shutil.copy2(src, dest / name)


def _run(root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import dapft; print(dapft.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        raise SystemExit(f"the copy's dapft is not the one imported ({where}); cannot test mutants")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - t0


def _baselines(tmp: Path, modules: list[str], tests: dict) -> dict[str, float]:
    root = tmp / "baseline"
    _copy(root)
    seconds = {}
    for module in modules:
        verdict, seconds[module] = _run(root, tests[module], timeout=3600)
        if verdict != "passed":
            raise SystemExit(f"the unmutated tests of {module} fail; fix them first")
        print(f"baseline {module}: {seconds[module]:.0f} s", flush=True)
    return seconds


def _survivors_of(log: Path) -> set[tuple[str, str, int, str]]:
    """(module, function, line, operator kind) of the mutants an earlier run's log says survived."""
    found = set()
    for line in log.read_text().splitlines():
        if line.startswith("SURVIVED"):
            where, kind = line.split()[1], line.split()[2]
            module_function, number = where.rsplit(":", 1)
            module, function = module_function.split(".", 1)
            found.add((module, function, int(number), kind))
    return found


def run_generated(args) -> None:
    modules = [args.module] if args.module else list(TARGETS)
    again = _survivors_of(args.survivors) if args.survivors else None
    chosen = []
    for module in modules:
        mutants = generate(module)
        sample = mutants if args.all else random.Random(f"{args.seed}-{module}").sample(
            mutants, min(args.per_module, len(mutants)))
        if again is not None:  # of the same sample (same --seed, --per-module), those that survived then
            sample = [m for m in sample if (m.module, m.function, m.line, m.operator.split()[0]) in again]
        chosen += sorted(sample, key=lambda m: m.index)
        print(f"{module}: {len(mutants)} generated, {len(sample)} run", flush=True)
    modules = [m for m in modules if any(c.module == m for c in chosen)]
    with tempfile.TemporaryDirectory() as tmp:
        base = _baselines(Path(tmp), modules, TESTS)
        rows = []
        for k, m in enumerate(chosen):
            root = Path(tmp) / f"m{k}"
            _copy(root)
            path = root / "dapft" / f"{FILE_OF[m.module]}.py"
            path.write_text(apply(m, path.read_text()))
            verdict, seconds = _run(root, TESTS[m.module], timeout=max(60.0, 5 * base[m.module]))
            shutil.rmtree(root)
            status = ("caught" if verdict != "passed" else "equivalent" if m.key in EQUIVALENT else "SURVIVED")
            rows.append((m, status))
            print(f"{status:10s} {m.module}.{m.function}:{m.line} {m.operator:16s} {m.source[:70]} ({seconds:.0f} s)",
                  flush=True)
    _report(rows)


def _report(rows) -> None:
    equivalent = [m for m, s in rows if s == "equivalent"]
    counted = [(m, s) for m, s in rows if s != "equivalent"]
    caught = sum(s == "caught" for _, s in counted)
    print("\n| module | run | caught | survived | equivalent |\n|---|---:|---:|---:|---:|")
    for module in dict.fromkeys(m.module for m, _ in rows):
        mine = [s for m, s in rows if m.module == module]
        print(f"| {module} | {len(mine)} | {mine.count('caught')} | {mine.count('SURVIVED')} | "
              f"{mine.count('equivalent')} |")
    print(f"\nscore: {caught} / {len(counted)} non-equivalent mutants caught "
          f"({100 * caught / max(1, len(counted)):.0f}%); {len(equivalent)} equivalent")
    survivors = [m for m, s in counted if s == "SURVIVED"]
    if survivors:
        print("\nsurvivors:")
        for m in survivors:
            print(f"- {m.module}.{m.function}:{m.line} {m.operator}: `{m.source}`")
    for m in equivalent:
        print(f"- equivalent {m.module}.{m.function}:{m.line} {m.operator}: {EQUIVALENT[m.key]}")


def run_planted() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _baselines(Path(tmp), sorted({m[0] for m in PLANTED}), PLANTED_TESTS)
        for i, (module, old, new, what) in enumerate(PLANTED):
            root = Path(tmp) / f"p{i}"
            _copy(root)
            path = root / "dapft" / f"{FILE_OF[module]}.py"
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {what!r}: its original text occurs {text.count(old)} times in {module}.py")
            path.write_text(text.replace(old, new))
            verdict, seconds = _run(root, PLANTED_TESTS[module], timeout=3600)
            shutil.rmtree(root)
            rows.append((module, what, verdict != "passed"))
            print(f"{'caught  ' if verdict != 'passed' else 'SURVIVED'} {module:9s} {what} ({seconds:.0f} s)", flush=True)
    print(f"\nplanted: {sum(r[2] for r in rows)} / {len(rows)} caught")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", choices=list(TARGETS), help="only this module's mutants")
    ap.add_argument("--per-module", type=int, default=15, help="a seeded random sample of this many a module")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="every generated mutant of the module(s)")
    ap.add_argument("--list", action="store_true", help="count the mutants, run nothing")
    ap.add_argument("--planted", action="store_true", help="the hand-written list instead")
    ap.add_argument("--survivors", type=Path,
                    help="of the sample, run again only those an earlier run's log (same --seed) says survived")
    args = ap.parse_args()
    if args.planted:
        run_planted()
    elif args.list:
        for module in [args.module] if args.module else TARGETS:
            mutants = generate(module)
            print(f"{module}: {len(mutants)} mutants in {len({m.function for m in mutants})} functions")
    else:
        run_generated(args)


if __name__ == "__main__":
    main()
