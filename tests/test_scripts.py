"""Every script in scripts/ runs, at a tiny size, and prints what BENCHMARKS.md, REPRODUCTION.md and
TESTING.md read from it: a refactor that breaks one fails here, not when its numbers are next remade.
Sizes only: no timing is asserted (a loaded CI machine would fail it); the numbers must exist, be
finite and, where the script compares two things it says must agree, agree."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs_helpers import ENV

pytestmark = pytest.mark.slow  # each starts torch, several train

REPO = Path(__file__).resolve().parents[1]


def script(name: str, *args, cwd: Path, timeout: float = 600) -> str:
    """`python scripts/NAME ARGS` from `cwd`: its standard output (it must succeed)."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of each Markdown table row whose first cell starts with `first_cell`."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and line.strip("| ").startswith(first_cell)]


def number(cell: str) -> float:
    value = float(re.sub(r"[^0-9.eE+-]", "", cell.split()[0]))
    assert math.isfinite(value), cell
    return value


def test_bench_dap_times_every_method_fits_the_growth_and_agrees_with_the_naive_formula(tmp_path):
    out = script("bench_dap.py", "--sizes", "1000,10000,20000", "--repeats", "1", "--exact-max", "1000",
                 "--naive-max", "1000", "--smooth-ap-max", "1000", "--json", tmp_path / "dap.json", cwd=tmp_path)
    [small] = rows(out, "1,000")
    assert all(number(c) > 0 for c in small[1:6]) and number(small[-1]) > 0  # every method ran at 1e3
    assert [r[1] != "—" for r in rows(out, "10,000") + rows(out, "20,000")] == [True, True]
    assert re.search(r"dap time growth exponent \(M >= 1e4\): -?\d+\.\d\d", out)
    agreement = json.loads((tmp_path / "dap.json").read_text())["rows"][0]["agreement"]
    assert agreement["abs_diff"] < 1e-4 and agreement["grad_cosine"] > 0.999


def test_bench_step_times_both_losses_of_each_family(tmp_path):
    out = script("bench_step.py", "--families", "detr,rt_detr", "--steps", "2", cwd=tmp_path)
    table = rows(out, "detr") + rows(out, "rt_detr")
    assert len(table) == 2 and all(number(c) > 0 for r in table for c in r[1:4])


def test_bench_pipeline_measures_the_data_path_and_the_step_against_the_bare_step(tmp_path):
    out = script("bench_pipeline.py", "--images", "32", "--steps", "1", "--workers", "0,1", "--tiny-only",
                 "--json", tmp_path / "pipeline.json", cwd=tmp_path)
    figures = json.loads((tmp_path / "pipeline.json").read_text())
    assert all(figures[k] > 0 for k in ("decode_ms", "item_ms", "prepare_ms", "finetune_over_bare"))
    assert len(rows(out, "0 workers")) == 1 and len(rows(out, "1 worker")) == 1
    assert len(rows(out, "tiny RT-DETR (bundled)")) == 2  # dap and original


def test_bench_eval_every_gives_each_epoch_and_the_share_of_evaluations(tmp_path):
    out = script("bench_eval_every.py", "--epochs", "2", "--train-images", "16", "--val-images", "8", cwd=tmp_path)
    table = [r for r in rows(out, "") if r[0].isdigit()]
    epochs, shares = [r for r in table if len(r) == 5], [r for r in table if len(r) == 2]
    assert [(r[0], r[1]) for r in epochs] == [("1", "2"), ("2", "2")]  # 16 images, batch 8
    assert all(number(c) > 0 for r in epochs for c in r[2:])
    assert re.search(r"an evaluation costs \d+\.\d% of an epoch's training", out)
    assert [r[0] for r in shares] == ["1", "2", "4", "10"] and all(r[1].endswith("%") for r in shares)


def test_bench_evaluators_scores_alike_with_every_evaluator(tmp_path):
    out = script("bench_evaluators.py", "--repeats", "1", "--images", "20", "--bundled-images", "16", cwd=tmp_path)
    assert "The three evaluators' 12 numbers agree to 1e-6: True" in out
    ratios = [r for e in ("pycocotools", "faster-coco-eval", "hotcoco") for r in rows(out, e) if len(r) == 4]
    assert len(ratios) == 3 and all(number(r[3]) > 0 for r in ratios)


def test_bench_coco_scale_reads_the_split_and_measures_workers_and_starts(tmp_path):
    out = script("bench_coco_scale.py", "--images", "200", "--per-worker", "100", "--work", tmp_path / "work",
                 "--json", tmp_path / "scale.json", cwd=tmp_path)
    numbers = json.loads((tmp_path / "scale.json").read_text())
    assert numbers["images"] == 200 and numbers["read"]["dapft"]["seconds"] > 0
    assert len(numbers["workers"]["worker_uss_mb_at_end"]) == 2
    assert set(numbers["finetune_1_step"]) == {"first", "second"}
    assert "dapft finetune --max-steps 1, second start" in out


def test_bench_sweep_workers_makes_each_run_once_in_every_arrangement(tmp_path):
    out = script("bench_sweep_workers.py", "--epochs", "1", "--train-images", "8", "--val-images", "4", cwd=tmp_path)
    arrangements = rows(out, "1 worker") + rows(out, "2 workers")
    assert len(arrangements) == 3 and all(r[4] == "yes" for r in arrangements)  # each run once
    assert rows(out, "2 workers")[0][5] == "yes"  # one thread each: the APs of one worker to the last digit


def test_bench_trackers_times_a_run_with_each_tracker(tmp_path):
    out = script("bench_trackers.py", "--epochs", "1", "--repeats", "1", "--trackers", "none,mlflow",
                 "--train-images", "8", "--val-images", "4", cwd=tmp_path)
    [none], [mlflow] = rows(out, "none"), rows(out, "mlflow")
    assert none[3] == "1.000" and number(mlflow[3]) > 0


def test_mutation_check_generates_mutants_and_judges_one_against_its_tests(tmp_path):
    out = script("mutation_check.py", "--list", cwd=tmp_path)
    counts = dict(re.findall(r"^(\w+): (\d+) mutants in \d+ functions$", out, flags=re.M))
    assert {"dap", "matcher", "criterion", "sweep", "splits", "signals", "sweep_grid"} <= set(counts)
    assert all(int(n) > 0 for n in counts.values())
    # One mutant of the DAP core against its tests, in a copy of the project (this tree untouched)
    out = script("mutation_check.py", "--module", "dap", "--per-module", "1", "--seed", "0", cwd=tmp_path)
    [row] = rows(out, "dap")
    assert row[1] == "1" and re.search(r"^score: \d / \d non-equivalent mutants caught", out, flags=re.M)


def test_probe_queries_gives_the_head_and_the_probe_accuracy(tmp_path, shapes_root):
    out = script("probe_queries.py", REPO / "dapft" / "checkpoints" / "tiny-rtdetr-shapes", "--data", shapes_root,
                 "--batches", "2", cwd=tmp_path)
    [row] = rows(out, str(REPO))
    assert "ground truths" in row[1] and re.match(r"linear probe \(held out\) \d+%", row[3])


def test_reproduce_runs_a_grid_and_writes_its_tables(tmp_path):
    out = script("reproduce.py", "--quick", "--seeds", "1", "--grid", "loss", "--model", "dapft/tiny-rtdetr-shapes",
                 "--work", tmp_path / "repro", cwd=tmp_path)
    assert "## dapft/tiny-rtdetr-shapes (rt_detr): loss" in out
    runs = {r[0]: r[1] for r in rows(out, "loss=") if r[0].endswith("_seed=0")}  # the table of runs
    assert len(runs) == 3 and all(number(ap) >= 0 for ap in runs.values())  # original, dap, dap+original
    assert (tmp_path / "repro" / "tables.md").read_text().strip() == out.strip()


def test_train_tiny_detectors_trains_a_family_from_scratch(tmp_path):
    out = script("train_tiny_detectors.py", "--work", tmp_path / "bundled", "--family", "rt_detr", "--quick",
                 "--num-workers", "0", cwd=tmp_path)
    assert re.search(r"rt_detr: best val AP \d+\.\d\d at epoch 1", out)


def test_bench_export_exports_each_family_and_scores_the_file_as_the_checkpoint(tmp_path):
    out = script("bench_export.py", "--families", "rt_detr,rf_detr", "--fit-steps", "2", "--val-images", "4",
                 "--repeats", "2", "--no-bundled", "--json", tmp_path / "export.json", cwd=tmp_path)
    [rt], [rf] = rows(out, "tiny rt_detr"), rows(out, "tiny rf_detr")
    assert rt[1] == "yes" and rt[5] == rt[6] and number(rt[9]) > 0  # the same AP, a latency ratio
    assert rf[1].startswith("no: rf_detr: cannot be exported to ONNX")
    measured = json.loads((tmp_path / "export.json").read_text())
    assert [r["exports"] for r in measured] == [True, False]
