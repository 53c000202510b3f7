"""Experiment trackers a run reports to (`--report-to`): TensorBoard, MLflow, Weights & Biases.

Each is driven through its official client, imported only when asked for. What they receive: the
run's settings once, every log.jsonl record as metrics at its step (`train/...` for steps,
`eval/...` for evaluations), the before/after numbers as the run's summary, its report and plots as
files. A tracker that fails (down, a wrong URI, no network) costs one warning and is switched off
for the rest of the run: never the run itself.

Resuming: each tracker's run id and the last step sent to it are kept in the run folder
(`trackers.json`), so a resumed run continues the same tracker run and skips the steps that tracker
already has. Metrics go out in batches, at most every FLUSH_SECONDS and at every checkpoint, from a
thread of their own, so no step waits on a tracker's network or database. A step sent after the last
checkpoint of a killed run is computed again by the resumed run; dapft's resume is exact on the CPU
(the same values), and on a GPU within its non-deterministic kernels.

The defaults follow each client: MLflow reads MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME
(default experiment "dapft"), W&B reads WANDB_PROJECT (default "dapft"), WANDB_ENTITY and WANDB_MODE
(offline on a cluster without network; `wandb sync` later)."""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.markup import escape

from dapft.utils.console import console
from dapft.utils.files import atomic_write_text

TRACKERS = ("tensorboard", "mlflow", "wandb")  # each its own module name and its own extra: dapft[NAME]
STATE_FILE = "trackers.json"
FLUSH_SECONDS = 15.0


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """`--report-to` as tracker names; None: the default (TensorBoard where it is installed).
    Refused at once: an unknown name, `none` beside others, a client that is not installed."""
    if text is None:
        return default_trackers()
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"--report-to takes a comma list of {', '.join(TRACKERS)}, or none; got {text!r}")
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"--report-to {name}: its client is not installed; pip install 'dapft[{name}]'") from None
    return names


def default_trackers() -> tuple[str, ...]:
    """No --report-to: TensorBoard's event files where TensorBoard is installed (local files, no
    account, what torch and rf-detr users find by default), nothing otherwise."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return ()
    return ("tensorboard",)


def _flat(params: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def metrics_of(record: dict) -> dict[str, float]:
    """A log.jsonl record's numbers as tracker metrics: `train/loss`, `eval/AP`, ..."""
    prefix = "train" if record.get("type") == "step" else record.get("type", "log")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("global_step", "epoch")}


# ---------------------------------------------------------------------------------------------- backends


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: Path, run_name: str, params: dict, ids: dict, group: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.id = None
        self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in sorted(_flat(params).items())))

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, metrics in rows:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, 0)

    def files(self, paths: list[Path], checkpoint: Path | None) -> None:
        pass  # the report and plots lie beside the event files already

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.writer.add_text(name, "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                                             + ["| " + " | ".join(map(str, r)) + " |" for r in rows]))

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, folder: Path, run_name: str, params: dict, ids: dict, group: dict | None):
        from mlflow import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default store
        self.id = ids.get("mlflow")
        if self.id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dapft")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            tags = {"mlflow.runName": run_name, "dapft.folder": str(folder.resolve())}
            if group and group.get("mlflow"):
                tags["mlflow.parentRunId"] = group["mlflow"]  # a sweep's run: a child of the sweep's
            self.id = self.client.create_run(experiment_id, tags=tags).info.run_id
            self._params(params)
        else:
            self.client.update_run(self.id, status="RUNNING")

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(_flat(params).items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.id, params=items[i:i + 100])

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step) for step, metrics in rows for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # at most 1000 metrics a batch
            self.client.log_batch(self.id, metrics=items[i:i + 1000])

    def summary(self, values: dict[str, float]) -> None:
        self.log([(0, values)])

    def files(self, paths: list[Path], checkpoint: Path | None) -> None:
        for path in paths:
            self.client.log_artifact(self.id, str(path))
        if checkpoint is not None:
            self.client.log_artifacts(self.id, str(checkpoint), artifact_path=checkpoint.name)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.client.log_dict(self.id, {"columns": columns, "data": rows}, f"{name}.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


def _mlflow_key(key: str) -> str:
    # MLflow keys: letters, digits, _ - . space / only (a sweep's setting names hold '=' and ',')
    return re.sub(r"[^\w\-. /]", "_", key)


class _WandB:
    name = "wandb"

    def __init__(self, folder: Path, run_name: str, params: dict, ids: dict, group: dict | None):
        import wandb

        resumed = ids.get("wandb") is not None
        # One W&B run a process at a time (a sweep's runs follow each other); a resumed run keeps the
        # settings it was started with (those a resume may change are where and how it reports).
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dapft"), id=ids.get("wandb"), resume="allow",
                              name=run_name, dir=str(folder), group=(group or {}).get("wandb"),
                              job_type=(group or {}).get("wandb_job_type", "finetune"),
                              config=None if resumed else _flat(params),
                              settings=wandb.Settings(silent=True, console="off"), reinit="finish_previous")
        self.id = self.run.id

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, metrics in rows:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def files(self, paths: list[Path], checkpoint: Path | None) -> None:
        import wandb

        if paths:
            report = wandb.Artifact(f"report-{self.id}", type="report")
            for path in paths:
                report.add_file(str(path))
            self.run.log_artifact(report)
        if checkpoint is not None:
            artifact = wandb.Artifact(f"model-{self.id}", type="model")
            artifact.add_dir(str(checkpoint))
            self.run.log_artifact(artifact, aliases=[checkpoint.name])

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": 130}.get(status, 1))


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


# ---------------------------------------------------------------------------------------------- the run's


class SafeCalls:
    """Calls to tracker backends that never cost the run: a backend that raises is warned about once
    and dropped; calls after the start go through one thread of their own, in order."""

    def __init__(self):
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dapft-trackers")
        self.backends = []

    def _call(self, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001  (a tracker never costs the run)
            console.print(f"[yellow]warning:[/] {name}: {type(exc).__name__}: {escape(str(exc)[:300])}; reporting "
                          f"to {name} is off for the rest of this run", highlight=False)
            self.backends = [b for b in self.backends if b.name != name]
            return None

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            self._call(backend.name, getattr(backend, method), *args)

    def _later(self, method: str, *args) -> None:
        if self.backends:
            self.worker.submit(self._each, method, *args)

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)


class Trackers(SafeCalls):
    """The trackers of one run folder (a fine-tuning run, an evaluation, a sweep's parent). They
    start in the caller's thread (their run ids are needed at once); everything after goes through
    their own thread (SafeCalls), so that a training step never waits on a tracker's network,
    database or CPU."""

    def __init__(self, folder: str | Path, names: tuple[str, ...], *, run_name: str, params: dict,
                 group: dict | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE
        saved = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.ids, self.sent = saved.get("ids", {}), saved.get("sent_step", -1)
        self.resumed_after = self.sent  # the steps a resumed run's trackers already have
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.last_flush = time.monotonic()
        for name in names:
            backend = self._call(name, BACKENDS[name], self.folder, run_name, params, self.ids, group)
            if backend is not None:
                self.backends.append(backend)
                if backend.id is not None:
                    self.ids[name] = backend.id
        self._save()

    def _save(self) -> None:
        if self.backends or self.ids:
            atomic_write_text(self.path, json.dumps({"ids": self.ids, "sent_step": self.sent}, indent=2))

    def _send(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self._each("log", rows)
        self.sent = max(self.sent, max(step for step, _ in rows))
        self._save()  # after the trackers have them: a kill before this sends them again, never skips them

    def log(self, record: dict) -> None:
        """One log.jsonl record; steps the trackers already have (a resumed run's) are skipped."""
        step = int(record.get("global_step", 0))
        if not self.backends or (record.get("type") == "step" and step <= self.resumed_after):
            return
        self.pending.append((step, metrics_of(record)))
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.backends:
            rows, self.pending = self.pending, []
            self.worker.submit(self._send, rows)
        self.last_flush = time.monotonic()

    def summary(self, values: dict[str, float]) -> None:
        self.flush()
        self._later("summary", {k: float(v) for k, v in values.items() if v is not None})

    def files(self, paths: list[Path], checkpoint: Path | None = None) -> None:
        self._later("files", [p for p in paths if p.is_file()], checkpoint)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self._later("table", name, columns, rows)

    def close(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED (an error), or KILLED (Ctrl-C, SIGTERM: the run continues on --resume).
        Waits until the trackers have everything."""
        self.flush()
        self._later("close", status)
        self.worker.shutdown(wait=True)
        self.backends = []
