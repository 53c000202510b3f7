"""The `dapft` command line: a thin layer over the library (dapft.training.trainer,
dapft.analysis.checkpoint_eval, dapft.sweeps.grid, ...).
Nothing heavy is imported before a command runs: `--help` answers at once."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dapft.utils.console import console
from dapft.utils.signals import (
    TrainingInterrupted,
    defer_interrupts,
    deliver_interrupts,
    ignore_further_signals,
    stopped_by_sigterm,
)

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Fine-tune DETR-family detectors with the Differentiable Average Precision (DAP) loss.",
)
_debug = {"on": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    from dapft.utils.console import quiet_transformers

    _debug["on"] = debug
    quiet_transformers()


REPORT_TO = typer.Option(
    None, "--report-to", metavar="NAME[,NAME...]",
    help="Trackers to send the run to: tensorboard, mlflow, wandb (comma list), or none. Default: TensorBoard "
         "event files where tensorboard is installed. MLflow reads MLFLOW_TRACKING_URI, W&B WANDB_PROJECT and "
         "WANDB_MODE.")
DATA = typer.Option(None, "--data", help="COCO root: ROOT/{train,val}2017/ and ROOT/annotations/instances_*2017.json.")


@app.command()
def finetune(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="Hub id, save_pretrained directory, or bundled name (dapft/...)."),
    data: Optional[str] = DATA,
    train_images: Optional[str] = typer.Option(None, help="Training image folder (instead of --data)."),
    train_annotations: Optional[str] = typer.Option(None, help="Training COCO JSON (instead of --data)."),
    val_images: Optional[str] = typer.Option(None, help="Validation image folder (instead of --data)."),
    val_annotations: Optional[str] = typer.Option(None, help="Validation COCO JSON (instead of --data)."),
    output: str = typer.Option("runs/finetune", "--output", "-o", help="Run directory."),
    loss: str = typer.Option("dap", help="dap | original | dap+original | dap+box."),
    matcher: str = typer.Option(
        "original", help="original (the model's own Hungarian matcher; measured best, REPRODUCTION.md) | constant "
                         "(the paper's default) | momentum."),
    sigma: float = typer.Option(0.05, help="Std of the Gaussian smoothing each score."),
    bins: int = typer.Option(256, help="Number of score thresholds N."),
    average: str = typer.Option("pooled", help="pooled (the paper) | per_class (COCO's class mean)."),
    momentum: float = typer.Option(0.99, help="EMA factor m of the momentum matcher (Eq. 13)."),
    epochs: Optional[int] = typer.Option(None, help="Default: the recipe's (10% of pre-training, at most 12)."),
    lr_drop: Optional[str] = typer.Option(
        None, metavar="N[,N...]", help="Drop the rate tenfold after N epochs, or after each of several (100,450: "
                                       "a multi-step schedule). Default: for the last epoch only, the paper's."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (smoke runs)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (default: the recipe's)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    lr: Optional[float] = typer.Option(None, help="Fine-tuning learning rate (default: recipe's / 10)."),
    backbone_lr_multiplier: Optional[float] = typer.Option(None, help="Backbone lr factor (default: the recipe's)."),
    weight_decay: Optional[float] = typer.Option(None, help="Default: the recipe's."),
    clip_grad_norm: Optional[float] = typer.Option(None, help="Default: the recipe's (0 disables)."),
    recipe: Optional[str] = typer.Option(None, help="A recipe YAML instead of recipes/<family>.yaml."),
    seed: int = typer.Option(0, help="Seed of data order, augmentation and dropout."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
    precision: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32 (CPU always fp32)."),
    num_workers: Optional[int] = typer.Option(
        None, help="Data loading workers per process (default: on a GPU, from the CPUs each process may use, at "
                   "most 8; on CPU none, the step uses every core)."),
    augment: bool = typer.Option(True, help="Flip, random crop and multi-scale resize in training."),
    eval_before: bool = typer.Option(True, help="Evaluate before training (the paper's r_o)."),
    eval_every: int = typer.Option(1, help="Evaluate every N epochs, and always after the last."),
    max_eval_images: Optional[int] = typer.Option(None, help="Evaluate on the first N validation images."),
    max_train_images: Optional[int] = typer.Option(None, help="Train on the first N training images."),
    train_eval_images: Optional[int] = typer.Option(
        None, help="Also score the first N training images (unaugmented) at each evaluation: did the loss move "
                   "the model, or did the change not transfer?"),
    evaluator: str = typer.Option("hotcoco", help="hotcoco | faster-coco-eval | pycocotools (the same numbers)."),
    save_every: Optional[int] = typer.Option(None, help="Also checkpoint every N steps within an epoch."),
    label_map: Optional[str] = typer.Option(None, help="JSON {dataset_category_id: model_label_index}."),
    freeze_backbone: Optional[bool] = typer.Option(
        None, "--freeze-backbone/--train-backbone",
        help="Freeze the whole backbone, or train all its stages; norm layers stay as the recipe has them "
             "(default: the recipe's, as the family's authors)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Model EMA (default: the recipe's)."),
    ema_decay: Optional[float] = typer.Option(None, help="Model EMA decay (turns EMA on)."),
    patience: Optional[int] = typer.Option(None, help="Stop after N evaluations without a better AP."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from checkpoint-last."),
    progress: bool = typer.Option(True, help="Rich progress bars."),
    report_to: Optional[str] = REPORT_TO,
    log_checkpoints: bool = typer.Option(
        False, "--log-checkpoints", help="Also send checkpoint-best to the trackers (MLflow, W&B) at the end."),
    gallery: bool = typer.Option(
        True, help="Draw the validation images whose errors changed most, before beside after, in the report."),
):
    """Fine-tune a detector with DAP (or another loss configuration) and report COCO AP before/after.
    Its options, but for --resume, are `dapft sweep`'s too (that one takes lists for some)."""
    options = {k: v for k, v in locals().items() if k != "ctx"}
    import shlex

    from dapft.training.config import FinetuneConfig
    from dapft.training.trainer import finetune as run
    deliver_interrupts()

    # By name: typer may bring its own copy of click's ParameterSource enum.
    given = tuple(k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE")
    options["lr_drop"] = _drops(options["lr_drop"])
    cfg = FinetuneConfig(**options, command=shlex.join(["dapft", *sys.argv[1:]]), given=given)
    report = run(cfg)
    if report.get("after"):
        _print_delta(report)


def _print_delta(report: dict) -> None:
    before, after = report.get("before"), report["after"]
    line = f"AP {100 * after['AP']:.2f}"
    if before:
        line = f"AP {100 * before['AP']:.2f} -> {100 * after['AP']:.2f} ({100 * (after['AP'] - before['AP']):+.2f})"
    console.print(f"[bold green]done[/]: {line}; report: {escape(str(Path(report['config']['output']) / 'report.md'))}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", help="Hub id, save_pretrained directory, or bundled name."),
    data: Optional[str] = DATA,
    split: str = typer.Option("val", help="Split of --data to evaluate."),
    images: Optional[str] = typer.Option(None, help="Image folder (instead of --data)."),
    annotations: Optional[str] = typer.Option(None, help="COCO JSON (instead of --data)."),
    output: str = typer.Option("runs/eval", "--output", "-o", help="Where predictions, metrics and the report go."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    evaluator: str = typer.Option("hotcoco", help="hotcoco | faster-coco-eval | pycocotools (the same numbers)."),
    max_images: Optional[int] = typer.Option(None, help="Evaluate on the first N images (quick checks)."),
    label_map: Optional[str] = typer.Option(None, help="JSON {dataset_category_id: model_label_index}."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu (default: cuda if available)."),
    precision: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32."),
    num_workers: Optional[int] = typer.Option(
        None, help="Data loading workers (default: on a GPU, from the CPUs, at most 8; on CPU none)."),
    progress: bool = typer.Option(True, help="Rich progress bar."),
    report_to: Optional[str] = REPORT_TO,
    gallery: bool = typer.Option(True, help="Draw the images with the most errors in the report."),
):
    """Evaluate a detector: COCO results JSON, metrics.json (with the error breakdown), report.md and plots."""
    from dapft.analysis.checkpoint_eval import evaluate_model
    deliver_interrupts()

    m = evaluate_model(model, data, split=split, images=images, annotations=annotations, output=output,
                       batch_size=batch_size, evaluator=evaluator, max_images=max_images, label_map=label_map,
                       device=device, precision=precision, num_workers=num_workers, progress=progress,
                       report_to=report_to, gallery=gallery)
    s = m["stats"]
    console.print(f"AP {100 * s['AP']:.2f} · AP50 {100 * s['AP50']:.2f} · AP75 {100 * s['AP75']:.2f} · "
                  f"S/M/L {_pts(s['AP_small'])}/{_pts(s['AP_medium'])}/{_pts(s['AP_large'])} · "
                  f"AR@100 {100 * s['AR100']:.2f}  ({m['images']} images, {m['images_per_second']} img/s; "
                  f"{escape(str(Path(output) / 'report.md'))})")


@app.command("predict")
def predict_(
    images: list[str] = typer.Argument(..., help="Image files, folders of images, or glob patterns ('photos/*.jpg')."),
    model: str = typer.Option(..., "--model", help="Hub id, save_pretrained directory, or bundled name."),
    output: str = typer.Option("runs/predict", "--output", "-o", help="Where predictions.json and drawn/ go."),
    threshold: float = typer.Option(0.5, help="Keep detections scoring at least this (0 keeps the 100 best an "
                                              "image, as evaluation does)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu (default: cuda if available)."),
    precision: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32."),
    num_workers: Optional[int] = typer.Option(
        None, help="Data loading workers (default: on a GPU, from the CPUs, at most 8; on CPU none)."),
    draw: bool = typer.Option(True, help="Write each image with its detections drawn to OUTPUT/drawn/."),
    progress: bool = typer.Option(True, help="Rich progress bar."),
):
    """Detect objects in images: predictions.json (COCO results), images.json, and the images drawn."""
    from dapft.analysis.predict import predict_images
    deliver_interrupts()

    predict_images(model, images, output, threshold=threshold, batch_size=batch_size, device=device,
                   precision=precision, num_workers=num_workers, progress=progress, draw_images=draw)


@app.command("export")
def export_(
    model: str = typer.Option(..., "--model", help="A checkpoint: save_pretrained directory, Hub id, or bundled name."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for model.onnx, its preprocessing and labels."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only one for now)."),
    image_size: Optional[tuple[int, int]] = typer.Option(
        None, help="H W: a fixed input size (default: the processor's fixed size, or any size where the model's "
                   "graph allows it)."),
    dynamic_batch: bool = typer.Option(False, help="Any batch size (default: one image a run)."),
    opset: int = typer.Option(17, help="ONNX opset (at least 16: grid_sample)."),
):
    """Export a detector to ONNX, with its preprocessing settings and labels beside it, checked against
    PyTorch with ONNX Runtime; `dapft eval` and `dapft predict` take the file as --model."""
    from dapft.modeling.export import export
    deliver_interrupts()

    result = export(model, output, fmt=format, image_size=image_size, dynamic_batch=dynamic_batch, opset=opset,
                    log=console.print)
    size = "x".join(map(str, result.image_size)) if result.image_size else "any height and width"
    console.print(f"[bold green]exported[/] {escape(str(result.file))} ({result.family}, opset {result.opset}; input "
                  f"{', '.join(result.inputs)} at {size}, {'any batch' if result.dynamic_batch else 'one image a run'}"
                  f"); ONNX Runtime against PyTorch: largest difference {result.max_diff_logits:.2g} in the logits, "
                  f"{result.max_diff_boxes:.2g} in the boxes", soft_wrap=True)


def _pts(value: float) -> str:
    """AP points; COCO's -1 (no ground truth of that size) as '-'."""
    return "-" if value < 0 else f"{100 * value:.1f}"


_LIST = "Comma-separated values: each combination with the other swept flags is one run."
# Settings `dapft sweep` takes as lists (FinetuneConfig fields), with their element types.
GRID = {"loss": str, "matcher": str, "sigma": float, "bins": int, "seed": int, "batch_size": int, "lr": float}
# `dapft sweep --slurm-partition P`: the workers as a SLURM job array (dapft.sweeps.slurm), sbatch's names
SLURM = {
    "slurm_partition": typer.Option(None, help="Submit the sweep's workers to this SLURM partition (as one job "
                                               "array, through submitit) and return; pip install 'dapft[slurm]'."),
    "slurm_workers": typer.Option(1, help="Sweep workers (array tasks): they divide the grid."),
    "slurm_nodes": typer.Option(1, help="Nodes per worker (each run of the grid uses all of them)."),
    "slurm_gpus_per_node": typer.Option(1, help="GPUs per node, one DDP process each."),
    "slurm_time": typer.Option(24 * 60, help="Minutes a worker may run; near the limit its run saves a checkpoint "
                                             "and the worker is requeued."),
    "slurm_account": typer.Option(None, help="sbatch --account."),
    "slurm_cpus_per_task": typer.Option(None, help="CPUs per GPU process (default 8: its data loaders)."),
    "slurm_sbatch": typer.Option(None, metavar="KEY=VALUE[,KEY=VALUE...]",
                                 help="More sbatch options, e.g. 'qos=high,constraint=a100'."),
    "slurm_signal_delay": typer.Option(90, help="Seconds before the time limit that SLURM signals a worker to save "
                                                "(enough for the evaluation before fine-tuning, or a step, and a "
                                                "checkpoint: a worker stops only once it has saved progress)."),
    "slurm_requeues": typer.Option(100, help="Times a worker may be requeued at its time limit."),
}


def sweep(**options):
    """Fine-tune once per combination of the comma-separated flags (resumable: finished runs are
    skipped); the model is evaluated once before; sweep.md/json/png give mean ± sd over seeds and
    each setting against the original loss, paired by seed, with 95% intervals. Every other option
    is finetune's."""
    import shlex

    from dapft.sweeps.grid import RUNNING
    from dapft.sweeps.grid import sweep as run
    from dapft.training.config import FinetuneConfig
    deliver_interrupts()

    grid = {name: _values(options.pop(name), kind, name) for name, kind in GRID.items() if options[name] is not None}
    for name in GRID:
        options.pop(name, None)
    swept = {k: v for k, v in grid.items() if len(v) > 1}
    if not swept:
        raise typer.BadParameter("give two or more comma-separated values to at least one of --loss, --matcher, "
                                 "--sigma, --bins, --seed, --batch-size, --lr")
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    options["lr_drop"] = _drops(options["lr_drop"])
    slurm = {name: options.pop(name) for name in SLURM}
    base = FinetuneConfig(**options, **fixed, command=shlex.join(["dapft", *sys.argv[1:]]))
    if slurm["slurm_partition"] is not None:
        return _submit(base, swept, slurm)
    summary = run(base, swept)
    failed = [r["run"] for r in summary["runs"] if r.get("failed")]
    unfinished = [r["run"] for r in summary["runs"] if r.get("state") in (RUNNING, "unfinished")]
    if os.environ.get("RANK", "0") != "0":  # torchrun: the main process speaks for all
        raise typer.Exit(1 if failed else 0)
    console.print(f"sweep done: {len(summary['runs'])} runs" + (f", {len(failed)} failed ({', '.join(failed)})"
                                                                 if failed else "")
                  + (f", {len(unfinished)} not finished here (running in another worker, or interrupted)"
                     if unfinished else "")
                  + f"; summary: {escape(str(Path(options['output']) / 'sweep.md'))}")
    if len(summary["software"]) > 1:
        console.print(f"[yellow]warning:[/] the runs ran on {len(summary['software'])} different versions of the "
                      "code; sweep.md names them (a comparison across versions is not one of settings alone)")
    if failed:
        raise typer.Exit(1)


def _submit(base, grid: dict, slurm: dict) -> None:
    from dapft.sweeps.slurm import SlurmOptions, print_submitted, submit_sweep

    extra = {}
    for item in (slurm["slurm_sbatch"] or "").split(","):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise typer.BadParameter(f"--slurm-sbatch takes KEY=VALUE items, got {item!r}")
            extra[key.strip()] = value.strip()
    options = SlurmOptions(partition=slurm["slurm_partition"], nodes=slurm["slurm_nodes"],
                           gpus_per_node=slurm["slurm_gpus_per_node"], workers=slurm["slurm_workers"],
                           time=slurm["slurm_time"], account=slurm["slurm_account"],
                           cpus_per_task=slurm["slurm_cpus_per_task"], sbatch=extra,
                           signal_delay=slurm["slurm_signal_delay"], requeues=slurm["slurm_requeues"])
    print_submitted(submit_sweep(base, grid, options), base.output)


def _sweep_signature() -> None:
    """`dapft sweep` takes finetune's options (one definition for both), the grid ones as text lists,
    and no --resume (a sweep resumes by itself)."""
    params = []
    for p in inspect.signature(finetune).parameters.values():
        if p.name in ("ctx", "resume"):
            continue
        if p.name in GRID:
            opt = p.default
            default = None if opt.default is None else str(opt.default)
            p = p.replace(default=typer.Option(default, *opt.param_decls, help=f"{opt.help} {_LIST}"),
                          annotation="Optional[str]")
        elif p.name == "output":
            opt = p.default
            p = p.replace(default=typer.Option("runs/sweep", *opt.param_decls,
                                               help="One run directory per setting under it."))
        params.append(p)
    for name, option in SLURM.items():
        kind = {"slurm_cpus_per_task": Optional[int]}.get(name, type(option.default) if option.default is not None
                                                          else Optional[str])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    sweep.__signature__ = inspect.Signature(params)
    sweep.__annotations__ = {p.name: p.annotation for p in params}
    app.command()(sweep)


def _values(text: str, kind: type, name: str) -> list:
    flag = "--" + name.replace("_", "-")
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated {kind.__name__} values, got {text!r}") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise typer.BadParameter(f"{flag} lists {', '.join(repeated)} more than once; each value is one run")
    return values


def _drops(text: str | None) -> list[int] | None:
    """--lr-drop: one epoch or several, comma-separated."""
    return None if text is None else _values(text, int, "lr_drop")


_sweep_signature()


@app.command()
def demo(
    output: str = typer.Option("runs/demo", "--output", "-o", help="Data and run directory."),
    model: str = typer.Option("dapft/tiny-rtdetr-shapes", help="A detector trained on shapes (bundled ones: dapft/...)."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs of each run (default 4; the paper's schedule "
                                         "for the bundled detectors is 12: 10% of their 200, at most 12)."),
    train_images: int = typer.Option(200, help="Generated training images."),
    val_images: int = typer.Option(200, help="Generated validation images."),
    num_workers: Optional[int] = typer.Option(None, help="Data loading workers (default: none on CPU)."),
    progress: bool = typer.Option(True, help="Rich progress bars."),
):
    """Offline demo on CPU: generate data, evaluate a bundled detector, fine-tune it with DAP and with its
    own loss (the control), compare."""
    from dapft.analysis.report import metrics_table
    from dapft.demo import comparison
    from dapft.demo import demo as run
    deliver_interrupts()

    summary = run(output, model=model, train_images=train_images, val_images=val_images,
                  num_workers=num_workers, progress=progress, **({"epochs": epochs} if epochs is not None else {}))
    rows, text = comparison(summary, model, output)
    console.print(metrics_table(rows, keys=("AP", "AP50", "AP75")))
    console.print(text, markup=False, highlight=False)


@app.command("make-dataset")
def make_dataset(
    kind: str = typer.Argument("shapes", help="Only 'shapes' for now."),
    output: str = typer.Option(..., "--output", "-o", help="Dataset root (COCO 2017 layout)."),
    train_images: int = typer.Option(800, help="Training images."),
    val_images: int = typer.Option(200, help="Validation images."),
    image_size: int = typer.Option(192, help="Square image side in pixels."),
    seed: int = typer.Option(0, help="Same seed, same dataset."),
):
    """Write a generated COCO-format detection dataset (deterministic by seed)."""
    if kind != "shapes":
        raise typer.BadParameter(f"unknown dataset kind {kind!r}; available: shapes")
    from dapft.data.shapes import make_shapes_dataset
    deliver_interrupts()

    root = make_shapes_dataset(output, train_images=train_images, val_images=val_images, image_size=image_size,
                               seed=seed)
    console.print(f"wrote {train_images} train and {val_images} val images to {root}")


def run() -> None:
    """Console entry point: one clear line per error unless --debug; the shell's exit codes (1 an
    error, 130 Ctrl-C, 143 SIGTERM)."""
    defer_interrupts()
    try:
        code = app(standalone_mode=False)
    except SystemExit:
        raise
    except TrainingInterrupted as exc:  # Ctrl-C or SIGTERM in a fine-tuning run, its checkpoint saved
        ignore_further_signals()
        if os.environ.get("RANK", "0") == "0":  # torchrun: every process stopped at the same step; one says so
            console.print(str(exc), style="red", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001
        # click's exceptions by their shape: typer may bring its own copy of click.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # a usage error: the command, what is wrong, exit status 2
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":  # click's word for Ctrl-C
            code = 130
        else:
            if _debug["on"] or "--debug" in sys.argv:
                raise
            message = str(exc)
            if len(message) > 800:  # a library's message with a whole tensor in it: the start says what it is
                message = message[:800] + " ... (cut; --debug shows all of it)"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: say whether a peer's end caused it
                from dapft.utils.distributed import PEER_ENDED, peer_ended

                if peer_ended(exc):
                    message = f"{PEER_ENDED} ({' '.join(message.split())})"
            # user text may hold [brackets]; one line, not folded at the terminal's width, so that a
            # path in it can be copied whole
            console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
            sys.exit(1)
    if code == 130:  # typer answers Ctrl-C with 130, returned rather than raised without standalone mode
        ignore_further_signals()
        code = 143 if stopped_by_sigterm() else 130
        console.print(("terminated (SIGTERM)" if code == 143 else "interrupted") + " (what was written before "
                      "stays; a fine-tuning run continues from its last checkpoint with the same command and "
                      "--resume, a sweep with the same command)", markup=False, highlight=False)
    if isinstance(code, int) and code:
        sys.exit(code)
