"""`dapft export`: a checkpoint as an ONNX file that ONNX Runtime (and TensorRT, OpenVINO) run, with the
preprocessing settings and label names beside it; and `OnnxDetector`, which runs such a file where
dapft runs a model (`dapft eval`, `dapft predict`), through dapft's own preprocessing and the family's
post-processing, so that the same report, error breakdown and drawings come out.

The network exported is the model's forward from pixels to its last layer's class logits and boxes
(`pixel_values`, and `pixel_mask` where the family reads it, in; `logits`, `pred_boxes` out); what
comes after (the family's scoring, top-k, boxes in image pixels) stays in Python, as the processor
does it. torch.onnx's TorchScript exporter: the newer dynamo exporter wrote a Deformable DETR file
that ONNX Runtime refuses to load (torch 2.14.1, onnxscript 0.7.2: "Node input 'sigmoid_min_1' is
not a graph input"), and optimum's exporters (optimum-onnx 0.1.0) require transformers below 4.58.

Sizes: a checkpoint whose processor resizes to one size (RT-DETR's, D-FINE's) is exported at that
size; one whose processor keeps the aspect ratio (DETR's, Deformable DETR's) with any height and
width, where the graph allows it. Whether it does is checked, not assumed: the file is run at a second
size against PyTorch, and a family whose graph keeps its feature maps' sizes as constants (Deformable
DETR's multi-scale attention) is refused without `--image-size H W`. With it, images are resized to
fit H x W and padded to it (the processor saved beside says so), and the file takes only that size."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from dapft.modeling.families import Family, family_of
from dapft.modeling.loading import load_detector, resolve_model
from dapft.utils.files import write_json

FORMATS = ("onnx",)
DEFAULT_OPSET = 17  # grid_sample (Deformable DETR's sampling, RT-DETR's decoder) needs 16; LayerNormalization 17
MIN_OPSET = 16
FILE = "model.onnx"
RECORD = "export.json"
# Largest difference from PyTorch, in logits and in relative box coordinates, that the file may have
# at the export size (float32 on both sides: measured 1e-5 and 1e-6 on the bundled detectors).
TOLERANCE = 1e-3
# What stands behind an operator ONNX has no form for, as users know the part.
PARTS = {"aten::_upsample_bicubic2d_aa": "the DINOv2 backbone's resize of its position embeddings (bicubic "
                                         "with antialiasing, which ONNX's Resize cannot express)"}


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked: one line saying why and what to do."""


@dataclass
class ExportResult:
    file: Path
    family: str
    inputs: list[str]
    image_size: tuple[int, int] | None  # None: any height and width
    dynamic_batch: bool
    opset: int
    max_diff_logits: float
    max_diff_boxes: float
    seconds: float


class _Network(torch.nn.Module):
    """The detector from pixels to its last layer's logits and boxes, as the exporter traces it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


def check_request(model: str, output: Path, fmt: str, image_size: tuple[int, int] | None, opset: int) -> str:
    """Everything refused before a model loads: the checkpoint's path (returned resolved), the format,
    the opset, the size's form, an output folder that already holds an export."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: dapft exports {', '.join(FORMATS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the DETR family needs at least {MIN_OPSET} (grid_sample)")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ExportError(f"--image-size {' '.join(map(str, image_size))}: give a height and a width in pixels, "
                          "each at least 1")
    if is_onnx(model):
        raise ExportError(f"--model {model}: already an ONNX file; export takes a checkpoint folder")
    path = resolve_model(model)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ExportError(f"--model {model}: not a checkpoint folder (no config.json); give a save_pretrained "
                          "folder such as RUN/checkpoint-best, or a Hub id")
    if (Path(output) / FILE).exists():
        raise ExportError(f"--output {output}: holds an export already ({FILE}); choose another --output, or delete "
                          "it to export again")
    return path


def export(model: str, output: str | Path, *, fmt: str = "onnx", image_size: tuple[int, int] | None = None,
           dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, log=print) -> ExportResult:
    """Export `model` (a checkpoint folder or Hub id) into `output`: the ONNX file, the preprocessing
    and labels it was exported with (preprocessor_config.json, config.json), and export.json (what was
    exported, how, and its largest difference from PyTorch)."""
    output = Path(output)
    check_request(model, output, fmt, image_size, opset)
    t0 = time.perf_counter()
    detector, processor, family = load_detector(model, log=log)
    detector.eval()
    processor, size = _processor_for(processor, image_size)
    example = _example(size or (_typical_size(processor)), 2 if dynamic_batch else 1, processor)
    with torch.no_grad():
        try:
            detector(**example)
        except Exception as exc:  # noqa: BLE001 - the model's own words say what it cannot take
            shown = " ".join(map(str, example["pixel_values"].shape[2:]))
            raise ExportError(f"--image-size {shown}: {family.name} cannot take it ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); try a multiple of 32") from None
    made = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    file = output / FILE
    written = [file, output / "preprocessor_config.json", output / "config.json"]
    try:
        processor.save_pretrained(output)  # what reads the file: its preprocessing, its labels
        detector.config.save_pretrained(output)
        _trace(detector, example, file, opset, dynamic_batch, dynamic_size=size is None, family=family)
        try:
            exported = OnnxDetector(file)  # one ONNX Runtime session for both checks below
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own words name the node
            raise ExportError(f"{family.name}: ONNX Runtime cannot run the exported file (opset {opset}): "
                              f"{' '.join(str(exc).split())[:300]}") from None
        diffs = _compare(detector, exported, example)
        if size is None:  # any height and width: held to PyTorch at another size too
            other = _example(tuple(s + 32 * (1 - 2 * i) for i, s in enumerate(example["pixel_values"].shape[2:])),
                             example["pixel_values"].shape[0], processor)
            moved = _compare(detector, exported, other)
            if max(moved) > max(TOLERANCE, 100 * max(diffs)):
                raise ExportError(f"{family.name}: its graph keeps the sizes of its feature maps as constants (the "
                                  f"file traced at one size gives other outputs at another: {max(moved):.3g} apart); "
                                  "export it at a fixed size with --image-size H W (images are then resized to fit "
                                  "and padded to it)")
    except BaseException:  # nothing half-written stays
        for path in written:
            path.unlink(missing_ok=True)
        if made and not any(output.iterdir()):
            output.rmdir()
        raise
    result = ExportResult(file, family.name, exported.inputs, size, dynamic_batch, opset, *diffs,
                          round(time.perf_counter() - t0, 2))
    write_json(output / RECORD, {**dataclasses.asdict(result), "file": FILE, "model": str(model),
                                 "torch": torch.__version__, "exporter": "torch.onnx (TorchScript)",
                                 "tolerance": TOLERANCE})
    if max(diffs) > TOLERANCE:
        # Not refused: a model whose queries or proposals score nearly alike (untrained, or barely
        # trained) picks a different one of two near-equal candidates on the other runtime, which
        # moves that query's box and nothing else; a trained detector agrees to 1e-5. The measure
        # that settles it is the evaluation: `dapft eval --model FILE` against the checkpoint's.
        log(f"[yellow]warning[/]: ONNX Runtime's outputs differ from PyTorch's by {max(diffs):.3g} (logits "
            f"{diffs[0]:.3g}, boxes {diffs[1]:.3g}), above {TOLERANCE:g}: compare `dapft eval --model "
            f"{escape(str(file))}` with "
            "the checkpoint's before deploying it")
    return result


def _processor_for(processor, image_size: tuple[int, int] | None):
    """The processor the file is used with, and the size the file takes (None: any). A processor
    that resizes to one size keeps it (or takes --image-size); one that keeps the aspect ratio fits
    images into --image-size and pads them to it, with the padding masked."""
    settings = processor.to_dict()
    fixed = {k: settings.get("size", {}).get(k) for k in ("height", "width")}
    if image_size is None:
        if fixed["height"] and fixed["width"]:
            return processor, (int(fixed["height"]), int(fixed["width"]))
        return processor, None
    h, w = map(int, image_size)
    if fixed["height"] and fixed["width"]:
        changed = {"size": {"height": h, "width": w}}
    else:
        changed = {"size": {"max_height": h, "max_width": w}, "do_pad": True, "pad_size": {"height": h, "width": w}}
    settings.pop("image_processor_type", None)
    return type(processor).from_dict({**settings, **changed}), (h, w)


def _typical_size(processor) -> tuple[int, int]:
    """A size to trace at when the file takes any: a square image as the processor resizes it."""
    size = processor.to_dict().get("size", {})
    side = size.get("shortest_edge") or size.get("max_height") or 800
    return int(side), int(side)


def _example(size: tuple[int, int], batch: int, processor) -> dict:
    """A batch to trace and compare on: smooth random images (blocks of colour, as a photo has more
    than noise), normalised as the processor does."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.rand(batch, 3, max(1, size[0] // 16), max(1, size[1] // 16), generator=generator)
    pixels = torch.nn.functional.interpolate(blocks, size=size, mode="bilinear", align_corners=False)
    settings = processor.to_dict()
    if settings.get("do_normalize", True) and settings.get("image_mean") is not None:
        mean, std = (torch.tensor(settings[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
        pixels = (pixels - mean) / std
    return {"pixel_values": pixels, "pixel_mask": torch.ones(batch, *size, dtype=torch.long)}


def _trace(detector, example: dict, file: Path, opset: int, dynamic_batch: bool, dynamic_size: bool,
           family: Family) -> None:
    axes = {}
    if dynamic_batch:
        axes = {"pixel_values": {0: "batch"}, "pixel_mask": {0: "batch"}, "logits": {0: "batch"},
                "pred_boxes": {0: "batch"}}
    if dynamic_size:
        for name, dims in (("pixel_values", {2: "height", 3: "width"}), ("pixel_mask", {1: "height", 2: "width"})):
            axes.setdefault(name, {}).update(dims)
    import warnings

    from torch.onnx.errors import UnsupportedOperatorError

    try:
        # the tracer's notes on Python values it keeps constant, and the whole graph it prints when an
        # operator has no ONNX form: the refusal below says what matters in one line
        with warnings.catch_warnings(), _stdout_to_nothing():
            warnings.simplefilter("ignore")
            # in eval mode, which the exporter restores after it (a wrapper left in training mode would
            # put the detector back into training mode: RT-DETR's denoising queries, dropout)
            torch.onnx.export(_Network(detector).eval(), (example["pixel_values"], example["pixel_mask"]), str(file),
                              input_names=["pixel_values", "pixel_mask"], output_names=["logits", "pred_boxes"],
                              opset_version=opset, dynamo=False, dynamic_axes=axes or None)
        _float_grids(file)
    except UnsupportedOperatorError as exc:
        operator = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
        part = PARTS.get(operator, "a part of the model")
        raise ExportError(f"{family.name}: cannot be exported to ONNX (opset {opset}): {part} uses {operator}, "
                          "which has no ONNX form") from None


@contextlib.contextmanager
def _stdout_to_nothing():
    """The process's standard output, at the file descriptor (the exporter's C++ prints there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _float_grids(file: Path) -> None:
    """Two-stage Deformable DETR's sampling grid comes out of the tracer as float64 beside float32
    features (its proposals' arithmetic is traced with double constants), and ONNX Runtime has no
    GridSample for mixed types: such a grid is cast to float32, as PyTorch's grid_sample has it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(file))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    changed = False
    for index, node in reversed(list(enumerate(model.graph.node))):
        if node.op_type == "GridSample" and types.get(node.input[1]) == TensorProto.DOUBLE:
            cast = f"{node.input[1]}_as_float"
            model.graph.node.insert(index, helper.make_node("Cast", [node.input[1]], [cast], to=TensorProto.FLOAT,
                                                            name=f"{node.name}/grid_as_float"))
            node.input[1] = cast
            changed = True
    if changed:
        onnx.save(model, str(file))


@dataclass
class _Session:
    session: object
    inputs: list[str]
    batch: int | None  # the file's fixed batch size, None for any


def _session(file: Path) -> _Session:
    import onnxruntime

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(file), providers=providers)
    first = session.get_inputs()[0].shape[0]
    return _Session(session, [i.name for i in session.get_inputs()], first if isinstance(first, int) else None)


def _compare(detector, exported: OnnxDetector, example: dict) -> tuple[float, float]:
    """The largest differences of logits and of boxes between the file (ONNX Runtime) and PyTorch."""
    with torch.no_grad():
        ours, theirs = exported(**example), detector(**example)
    return (float((ours.logits - theirs.logits).abs().max()), float((ours.pred_boxes - theirs.pred_boxes).abs().max()))


@dataclass
class DetectionOutputs:
    """What the family's post-processing reads of a model's outputs."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor


class OnnxDetector:
    """An exported file where dapft takes a model: called with pixel_values (and pixel_mask), it
    runs ONNX Runtime and returns logits and boxes as tensors. A file exported for one batch size
    is run on a batch in pieces of that size."""

    def __init__(self, file: str | Path):
        from transformers import AutoConfig

        self.file = Path(file)
        self._run = _session(self.file)
        self.config = AutoConfig.from_pretrained(self.file.parent)

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **_) -> DetectionOutputs:
        feeds = {"pixel_values": pixel_values.detach().float().cpu().numpy()}
        if "pixel_mask" in self._run.inputs:
            mask = pixel_mask if pixel_mask is not None else torch.ones_like(pixel_values[:, 0], dtype=torch.long)
            feeds["pixel_mask"] = mask.detach().to(torch.long).cpu().numpy()
        total, step = len(feeds["pixel_values"]), self._run.batch or len(feeds["pixel_values"])
        logits, boxes = [], []
        for start in range(0, total, step):
            piece = {k: v[start:start + step] for k, v in feeds.items()}
            short = step - len(piece["pixel_values"])
            if short:  # the file's batch size: the last piece padded with copies, their outputs dropped
                piece = {k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in piece.items()}
            out_logits, out_boxes = self._run.session.run(["logits", "pred_boxes"], piece)
            logits.append(out_logits[:step - short])
            boxes.append(out_boxes[:step - short])
        device = pixel_values.device
        return DetectionOutputs(torch.from_numpy(np.concatenate(logits)).to(device),
                                torch.from_numpy(np.concatenate(boxes)).to(device))

    @property
    def inputs(self) -> list[str]:
        return self._run.inputs

    def eval(self) -> "OnnxDetector":
        return self

    def to(self, *_, **__) -> "OnnxDetector":
        return self


def is_onnx(model: str | Path) -> bool:
    return str(model).endswith(".onnx")


def load_onnx_detector(file: str | Path) -> tuple[OnnxDetector, object, Family]:
    """An exported file with the processor and labels saved beside it, as `load_detector` gives a
    checkpoint's: (detector, processor, family)."""
    import transformers

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"--model {file}: no such file")
    if not (file.parent / "preprocessor_config.json").is_file() or not (file.parent / "config.json").is_file():
        raise FileNotFoundError(f"--model {file}: its preprocessor_config.json and config.json are not beside it "
                                "(dapft export writes them); copy them from the export's folder")
    detector = OnnxDetector(file)
    family = family_of(detector.config)
    return detector, transformers.AutoImageProcessor.from_pretrained(file.parent), family


def load_model(model: str | Path, log=print):
    """A checkpoint (load_detector) or an exported ONNX file (load_onnx_detector), as the command
    lines that run a model take either: (detector, processor, family)."""
    return load_onnx_detector(model) if is_onnx(model) else load_detector(model, log=log)
