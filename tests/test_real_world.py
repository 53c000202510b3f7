"""Cases real users and clusters produce: two processes on one folder, runs killed before their first
checkpoint, sweeps run again with other settings, diverging grid values, signals, phone photos,
annotation files as tools write them, odd locales, and what a new user sees first. Each test names
the behaviour it holds; all run dapft for real (the CLI in subprocesses where exit codes count)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from runs_helpers import COMMON, ENV, assert_same_weights, dapft, weights

from dapft.analysis.evaluate import EVALUATORS
from dapft.data.coco_file import DataError
from dapft.data.splits import load_split, resolve_split

QUICK = ["--no-eval-before", "--max-eval-images", "2", "--max-train-images", "8", *COMMON]


def _copy(root: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    dest = tmp_path / "data"
    shutil.copytree(root, dest)
    ann = dest / "annotations" / "instances_val2017.json"
    return dest, ann, json.loads(ann.read_text())


def _one_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return " ".join(proc.stderr.split())


# ---------------------------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_process_on_the_same_output_is_refused_naming_the_holder(tmp_path, tiny_detr, shapes_root):
    from dapft.utils.files import OutputFolder

    out = tmp_path / "run"
    with OutputFolder(out):  # this test process is the holder
        for cmd in (["finetune", "--model", tiny_detr, "--data", shapes_root, *QUICK],
                    ["sweep", "--model", tiny_detr, "--data", shapes_root, "--seed", "0,1", *QUICK],
                    ["eval", "--model", tiny_detr, "--data", shapes_root, "--no-progress"]):
            proc = dapft(*cmd, "--output", out, check=False)
            message = _one_line(proc)
            assert proc.returncode == 1 and f"(pid {os.getpid()})" in message and str(out) in message, message
        assert sorted(p.name for p in out.iterdir()) == [".dapft.lock"]  # nothing written by the refused ones
    # The lock goes with its process however it ends: a holder killed outright leaves the folder free.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dapft.utils.files import OutputFolder; "
                               f"OutputFolder({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--max-steps", "1", *QUICK)


@pytest.mark.slow
def test_a_run_that_never_checkpointed_starts_afresh_or_resumes_from_step_0(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "2",
            "--loss", "dap+box", "--lr", "1e-3", *QUICK]
    dapft(*args)
    reference = weights(run)
    for stale in ("checkpoint-last", "checkpoint-best", "report.json", "report.md"):  # as a kill in step 1 leaves it
        shutil.rmtree(run / stale) if (run / stale).is_dir() else (run / stale).unlink()
    message = _one_line(dapft(*args))
    assert "never saved a checkpoint; starting it afresh" in message
    assert_same_weights(weights(run), reference)
    steps = [json.loads(x)["global_step"] for x in (run / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps == [1, 2]  # the first attempt's lines are gone, not doubled
    shutil.rmtree(run / "checkpoint-last")
    (run / "report.json").unlink()
    message = _one_line(dapft(*args[:-len(QUICK)], "--resume", *QUICK))
    assert "resuming it from step 0 with its settings" in message
    assert_same_weights(weights(run), reference)


# ---------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_a_sweep_run_again_with_other_fixed_settings_is_refused_and_a_stale_before_is_redone(tmp_path, tiny_detr,
                                                                                           shapes_root):
    out = tmp_path / "sweep"
    base = ["sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--max-steps", "1",
            "--loss", "dap,dap+box", "--max-eval-images", "2", "--max-train-images", "8", *COMMON]
    dapft(*base)
    before = json.loads((out / "before.json").read_text())
    proc = dapft(*base, "--lr", "0.001", "--seed", "1", "--sigma", "0.1", check=False)
    message = _one_line(proc)
    assert proc.returncode == 1 and "another --output" in message, message
    for says in ("lr = 1e-05 (this sweep asks for 0.001)", "seed = 0 (", "sigma = 0.05 (this sweep asks for 0.1)"):
        assert says in message, message  # every differing setting named in the one refusal
    # The shared evaluation before fine-tuning belongs to a model, data and subset: another subset
    # (with runs of its own) evaluates again instead of reusing it.
    shutil.rmtree(out / "loss=dap")
    shutil.rmtree(out / "loss=dap+box")
    message = _one_line(dapft(*[a if a != "2" else "3" for a in base]))
    assert "made for another model, data or evaluation subset; evaluating again" in message
    assert json.loads((out / "before.json").read_text())["for"]["max_eval_images"] == 3
    assert before["for"]["max_eval_images"] == 2


@pytest.mark.slow
def test_grid_values_that_differ_get_their_own_folders_and_repeats_are_refused(tmp_path, tiny_detr, shapes_root):
    from dapft.sweeps.grid import run_name

    assert run_name({"lr": 1e-4}) != run_name({"lr": 1.0000001e-4})  # equal under "%g"
    proc = dapft("sweep", "--model", tiny_detr, "--data", shapes_root, "--output", tmp_path / "s", "--seed", "1,1",
                 *QUICK, check=False)
    assert proc.returncode == 2 and "lists 1 more than once" in " ".join(proc.stderr.split())  # a usage error


@pytest.mark.slow
def test_a_diverging_grid_value_is_recorded_as_failed_and_the_others_run(tmp_path, shapes_root):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", out, "--lr",
            "0.00002,1000", "--max-steps", "6", *QUICK]
    proc = dapft(*args, check=False)
    assert proc.returncode == 1 and "1 failed (lr=1000.0)" in _one_line(proc)
    summary = json.loads((out / "sweep.json").read_text())
    runs = {r["run"]: r for r in summary["runs"]}
    assert runs["lr=2e-05"]["AP"] is not None and runs["lr=2e-05"]["failed"] is None
    assert runs["lr=1000.0"]["AP"] is None and "not finite" in runs["lr=1000.0"]["failed"]
    assert "failed: FloatingPointError" in (out / "sweep.md").read_text()
    again = dapft(*args, check=False)  # run again: the failure is reported, not retried, the rest kept
    assert again.returncode == 1 and "failed earlier" in _one_line(again) and "finished earlier" in again.stderr


@pytest.mark.slow
def test_a_sweep_killed_in_its_first_run_continues_when_run_again(tmp_path, tiny_detr, shapes_root):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--seed", "0,1",
            "--max-steps", "1", "--loss", "dap+box", *[a for a in QUICK if a != "--no-eval-before"]]
    dapft(*args)
    assert (out / "before.json").exists() and (out / "eval" / "before" / "metrics.json").exists()
    reference = weights(out / "seed=0")
    for name in ("seed=0", "seed=1"):  # as a kill during seed 0's first step leaves the sweep
        shutil.rmtree(out / name / "checkpoint-last")
        (out / name / "report.json").unlink()
    shutil.rmtree(out / "seed=1")
    dapft(*args)
    assert_same_weights(weights(out / "seed=0"), reference)
    assert (out / "seed=1" / "report.json").exists()
    for name in ("seed=0", "seed=1"):  # the sweep's before.json, not evaluated again
        assert not (out / name / "eval" / "before").exists()


# ---------------------------------------------------------------------------------------------- resuming


@pytest.mark.slow
def test_more_patience_on_resume_trains_again(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "4", "--lr", "0",
            "--loss", "dap+box", *QUICK]  # lr 0: no evaluation is ever better than the first
    dapft(*args, "--patience", "1")
    assert json.loads((run / "report.json").read_text())["stopped_early"]
    dapft(*args, "--patience", "5", "--resume")
    report = json.loads((run / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    assert report["stopped_early"] is None and report["config"]["patience"] == 5
    assert "Stopped early" not in (run / "report.md").read_text()


@pytest.mark.slow
def test_train_backbone_on_resume_of_a_run_whose_recipe_trained_it_all(tmp_path, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", run, "--epochs", "2",
            *QUICK]  # its recipe freezes nothing
    dapft(*args, "--max-steps", "1")
    dapft(*args, "--resume", "--train-backbone", "--max-steps", "2")
    proc = dapft(*args, "--resume", "--freeze-backbone", check=False)
    assert proc.returncode == 1 and "--freeze-backbone differs" in _one_line(proc)


@pytest.mark.slow
def test_a_torn_last_log_line_does_not_stop_a_resume(tmp_path, tiny_detr, shapes_root):
    run = tmp_path / "run"
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "2", *QUICK]
    dapft(*args, "--max-steps", "2")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"type": "step", "epoch": 2, "glo')  # a kill mid-write
    dapft(*args, "--resume")
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]  # every line whole again
    assert [r["global_step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_number_of_workers_does_not_change_the_trained_weights(tmp_path, tiny_detr, shapes_root):
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--max-steps", "3", "--loss", "dap+box",
            "--lr", "1e-3", "--seed", "3", "--no-eval-before", "--max-eval-images", "1", "--max-train-images", "12",
            "--no-progress", "--batch-size", "4", "--device", "cpu"]  # augmented: flips, crops, scales
    for workers in (0, 2):
        dapft(*args, "--output", tmp_path / str(workers), "--num-workers", str(workers))
    assert_same_weights(weights(tmp_path / "0"), weights(tmp_path / "2"))


# ---------------------------------------------------------------------------------------------- signals


def _start(args, out: Path, steps: int = 3):
    proc = subprocess.Popen([sys.executable, "-m", "dapft", *map(str, args), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and sum('"step"' in x for x in log.read_text().splitlines()) >= steps:
            break
        time.sleep(0.01)
    return proc


def _stopped_args(tiny_detr, shapes_root):
    return ["finetune", "--model", tiny_detr, "--data", shapes_root, "--loss", "dap+box", "--epochs", "2",
            "--no-eval-before", "--max-eval-images", "4", "--seed", "4", *COMMON]  # 6 steps an epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_detr, shapes_root):
    """The weights of the run the stopped ones must resume to, trained once for both signals."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    dapft(*_stopped_args(tiny_detr, shapes_root), "--output", out)
    return weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_resume_to_the_same_weights(tmp_path, tiny_detr, shapes_root,
                                                                             uninterrupted, sig, code):
    args = _stopped_args(tiny_detr, shapes_root)
    proc = _start(args, tmp_path / "cut")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    message = " ".join(err.split())
    assert "interrupted at step" in message and signal.Signals(sig).name in message and "--resume" in message
    assert "Traceback" not in err
    dapft(*args, "--output", tmp_path / "cut", "--resume")
    assert_same_weights(uninterrupted, weights(tmp_path / "cut"))


@pytest.mark.slow
def test_ctrl_c_and_sigterm_at_start_up_in_eval_and_twice_in_training_exit_by_the_signal_with_one_line(
        tmp_path, tiny_detr, shapes_root):
    def interrupted(proc, times=1, sig=signal.SIGINT):
        proc.send_signal(sig)
        seen = ""
        if times == 2:  # the second signal as soon as the first is acknowledged, well inside the step it waits on
            while "saving a resumable" not in seen and proc.poll() is None:
                seen += proc.stderr.readline()
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        err = seen + err
        code, says = (143, "terminated (SIGTERM)") if sig == signal.SIGTERM else (130, "interrupted")
        assert proc.returncode == code and says in err and "Traceback" not in err, err[-2000:]

    start = subprocess.Popen([sys.executable, "-m", "dapft", "eval", "--model", tiny_detr, "--data", shapes_root,
                              "--output", str(tmp_path / "a")], stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(0.5)  # importing
    interrupted(start)
    from dapft.data.shapes import make_shapes_dataset

    many = make_shapes_dataset(tmp_path / "many", train_images=1, val_images=300, image_size=96)  # a long evaluation
    for out, sig in (("b", signal.SIGINT), ("t", signal.SIGTERM)):  # SIGTERM: what `timeout` and SLURM send
        evaluating = subprocess.Popen([sys.executable, "-m", "dapft", "eval", "--model", "dapft/tiny-rtdetr-shapes",
                                       "--data", many, "--output", str(tmp_path / out), "--batch-size", "1",
                                       "--num-workers", "0", "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                                      env=ENV)
        while not (tmp_path / out / ".dapft.lock").exists() and evaluating.poll() is None:
            time.sleep(0.01)
        time.sleep(2.5)  # data checked, model loaded: predicting
        interrupted(evaluating, sig=sig)
        assert not (tmp_path / out).exists()  # the folder it made, and nothing written yet: gone with it
    # The bundled RT-DETR's step (not the tiny DETR's few milliseconds) outlasts the signal's round trip
    args = ["finetune", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--epochs", "50", *QUICK]
    interrupted(_start(args, tmp_path / "c", steps=1), times=2)  # the second Ctrl-C quits at once
    interrupted(_start(args, tmp_path / "d", steps=1), times=2, sig=signal.SIGTERM)  # and a second SIGTERM: 143


# ---------------------------------------------------------------------------------------------- data as it comes


@pytest.mark.slow
def test_photos_stored_rotated_with_an_exif_orientation_score_as_upright(tmp_path, shapes_root):
    """Each validation image stored as a phone stores a portrait photo: pixels turned, with the EXIF
    orientation (6) that turns them back; the JSON describes the upright image, as labelling tools
    write it. The bundled detector must score what it scores on the upright files."""
    root, ann, data = _copy(shapes_root, tmp_path)
    for im in data["images"]:
        path = root / "val2017" / im["file_name"]
        upright = Image.open(path).convert("RGB").crop((0, 0, im["width"], im["height"] - 40))  # not square
        upright.save(path)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to display"
        upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
        im["height"] -= 40
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, w, max(0.0, min(y + h, 152) - y)] if y < 152 else [x, y, w, 0]
    data["annotations"] = [a for a in data["annotations"] if a["bbox"][3] > 1]
    ann.write_text(json.dumps(data))
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    for im in data["images"]:
        with Image.open(root / "val2017" / im["file_name"]) as rotated:
            from PIL import ImageOps

            ImageOps.exif_transpose(rotated).save(plain / "val2017" / im["file_name"])
    scores = []
    for data_root in (root, plain):
        out = tmp_path / f"eval-{data_root.name}"
        dapft("eval", "--model", "dapft/tiny-rtdetr-shapes", "--data", data_root, "--output", out, "--no-progress",
              "--device", "cpu", "--num-workers", "0")
        scores.append(json.loads((out / "metrics.json").read_text())["stats"]["AP"])
    assert scores[0] == scores[1] and scores[0] > 0.05


def test_repeated_annotation_ids_are_refused_naming_the_id(tmp_path, shapes_root):
    root, ann, data = _copy(shapes_root, tmp_path)
    first, other = data["annotations"][0], next(a for a in data["annotations"] if a["image_id"] != data["annotations"][0]["image_id"])
    other["id"] = first["id"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"annotation id {first['id']} .*the id is used again \(first for an "
                                        rf"annotation of image {first['image_id']}\)"):
        load_split(resolve_split(root, "val"))


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_missing_iscrowd_and_area_mean_0_and_the_box_area(tmp_path, shapes_root, evaluator):
    from dapft.analysis.evaluate import coco_evaluate

    root, ann, data = _copy(shapes_root, tmp_path)
    for a in data["annotations"]:
        del a["iscrowd"], a["area"]
    ann.write_text(json.dumps(data))
    split = load_split(resolve_split(root, "val"))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
               for a in data["annotations"][::2]]
    for a in data["annotations"]:
        a.update(iscrowd=0, area=a["bbox"][2] * a["bbox"][3])
    ids = [im["id"] for im in data["images"]]
    assert coco_evaluate(split.ground_truth(), results, ids, evaluator).stats == coco_evaluate(
        data, results, ids, evaluator).stats


@pytest.mark.parametrize("change, says", [
    (lambda d: d["annotations"][0].pop("id"), "has id None; every annotation needs its own integer 'id'"),
    (lambda d: d["images"][0].update(id="img-1"), "has id 'img-1'; image ids must be integers"),
    (lambda d: d["images"][0].update(id=2**63), "image ids must be integers (64-bit)"),
    (lambda d: d["annotations"][0].update(iscrowd="yes"), "iscrowd 'yes'"),
])
def test_annotation_files_with_missing_ids_or_text_ids_are_refused_before_any_work(tmp_path, shapes_root, change,
                                                                                    says):
    root, ann, data = _copy(shapes_root, tmp_path)
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_split(resolve_split(root, "val"))


@pytest.mark.slow
def test_a_model_folder_without_its_processor_config_is_refused(tmp_path, tiny_detr, shapes_root):
    model = tmp_path / "model"
    shutil.copytree(tiny_detr, model)
    (model / "preprocessor_config.json").unlink()
    proc = dapft("eval", "--model", model, "--data", shapes_root, "--output", tmp_path / "e", "--no-progress",
                 check=False)
    assert proc.returncode == 1 and "no preprocessor_config.json" in _one_line(proc)


def test_the_image_check_cache_rechecks_a_file_replaced_in_place_and_survives_a_bad_cache(tmp_path, shapes_root):
    from dapft.data.image_check import _verdict_cache

    root, ann, data = _copy(shapes_root, tmp_path)
    source = resolve_split(root, "val")
    load_split(source)  # decodes all, remembers them
    path = root / "val2017" / data["images"][0]["file_name"]
    st = path.stat()
    good = path.read_bytes()
    path.write_bytes(good[:64] + bytes(len(good) - 64))  # same size, the pixel data gone
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    with pytest.raises(DataError, match="cannot be read"):
        load_split(source)
    path.write_bytes(good)
    for junk in ("[1, 2, 3]", "{not json", '{"000001.png": 5}'):
        _verdict_cache(source.images).write_text(junk)
        load_split(source)  # ignored and rewritten
        assert isinstance(json.loads(_verdict_cache(source.images).read_text()), dict)


@pytest.mark.slow
def test_files_are_utf8_whatever_the_locale(tmp_path, tiny_detr, shapes_root):
    env = {**ENV, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}
    run = tmp_path / "run"
    dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--max-steps", "1", *QUICK, env=env)
    assert "—" in (run / "checkpoint-last" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"1": "circle"}', '{"1": null}', '{"1": 0.5}',
                                     '{"one": 0}'])
@pytest.mark.slow
def test_a_bad_label_map_is_one_line_naming_the_file_and_the_form(tmp_path, tiny_detr, shapes_root, content):
    label_map = tmp_path / "labels.json"
    label_map.write_text(content)
    proc = dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", tmp_path / "r", "--label-map",
                 label_map, *QUICK, check=False)
    message = _one_line(proc)
    assert proc.returncode == 1 and str(label_map) in message and '{"dataset category id": model label index}' in message
    assert message.startswith("error:") and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value", [("--clip-grad-norm", "nan"), ("--backbone-lr-multiplier", "inf"),
                                         ("--sigma", "nan"), ("--lr", "nan")])
@pytest.mark.slow
def test_non_finite_settings_are_refused_before_any_work(tmp_path, tiny_detr, shapes_root, flag, value):
    proc = dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", tmp_path / "r", flag, value,
                 *QUICK, check=False)
    assert proc.returncode == 1 and flag in _one_line(proc) and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- the first hour


def test_sweep_takes_every_finetune_option_and_every_option_says_what_it_does():
    def options(command: str) -> dict[str, str]:
        out = dapft(command, "--help").stdout
        found, name = {}, None
        for line in out.splitlines():
            stripped = line.strip()
            if stripped.startswith("-"):
                name = [w for w in stripped.split() if w.startswith("--")][0].split("/")[0]
                found[name] = stripped.split("  ", 1)[1].strip() if "  " in stripped else ""
            elif name and stripped and line.startswith(" " * 20):
                found[name] += " " + stripped
        return found

    finetune, sweep = options("finetune"), options("sweep")
    assert set(finetune) - set(sweep) == {"--resume"}  # a sweep resumes by itself
    for command in (finetune, sweep, options("eval"), options("demo"), options("make-dataset")):
        empty = [k for k, text in command.items() if not text.replace("[default:", "").strip() or text.startswith("[")]
        assert not empty, empty


def test_help_answers_without_importing_torch():
    for args in ([], ["finetune"], ["sweep"], ["eval"]):
        code = ("import sys, runpy; sys.argv = ['dapft', *%r, '--help']\n"
                "try:\n    runpy.run_module('dapft', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules, 'transformers' in sys.modules)" % (args,))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
        assert proc.stdout.strip().splitlines()[-1] == "False False", (args, proc.stdout[-500:])
        assert time.perf_counter() - t0 < 5  # about 0.3 s on an idle 2-core machine: nothing heavy loads


def test_progress_bars_keep_counts_and_times_whole_at_80_columns():
    import io

    from rich.console import Console

    from dapft.utils import console as runtime

    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    saved, runtime.console = runtime.console, console
    try:
        with runtime.make_progress() as bar:
            bar.add_task("epochs", total=12, completed=3, info="")
            bar.add_task("steps", total=1250, completed=300, info="loss 12.3456 · lr 1.00e-05 · 123.4 img/s · DAP 0.12")
            bar.add_task("evaluating", total=5000, completed=1000, info="85.3 img/s")
    finally:
        runtime.console = saved
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())  # the terminal's control codes
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines)
    joined = "\n".join(lines)
    for whole in ("3/12", "300/1250", "1000/5000", "eta", "0:00:00", "img/s", "DAP 0.12"):
        assert whole in joined, joined


@pytest.mark.slow
def test_eval_never_replaces_an_evaluation_and_a_refused_command_leaves_no_folder(tmp_path, tiny_detr, shapes_root):
    out = tmp_path / "ev"
    args = ["eval", "--model", tiny_detr, "--data", shapes_root, "--no-progress", "--max-images", "2"]
    dapft(*args, "--output", out)
    metrics = (out / "metrics.json").read_bytes()
    proc = dapft(*args, "--output", out, check=False)
    assert proc.returncode == 1 and "holds an evaluation already" in _one_line(proc)
    assert (out / "metrics.json").read_bytes() == metrics
    proc = dapft(*args, "--output", tmp_path / "new", "--label-map", tmp_path / "missing.json", check=False)
    assert proc.returncode == 1 and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_console_says_minus_for_absent_sizes_one_epoch_and_what_is_frozen(tmp_path, tiny_detr, shapes_root):
    proc = dapft("eval", "--model", "dapft/tiny-rtdetr-shapes", "--data", shapes_root, "--output", tmp_path / "e",
                 "--no-progress", "--num-workers", "0")
    line = _one_line(proc)
    stats = json.loads((tmp_path / "e" / "metrics.json").read_text())["stats"]
    assert stats["AP_large"] == -1 and "-100" not in line and "S/M/L" in line and "/-" in line
    run = tmp_path / "run"
    proc = dapft("finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "1", *QUICK)
    message = _one_line(proc)
    assert "1 epoch ·" in message and "frozen: stem, stage 0" in message
    assert "frozen: stem, stage 0" in (run / "report.md").read_text()
