"""Runs where users track them (`--report-to`), for real: MLflow against a real tracking server on a
localhost port (`mlflow server`, as a team runs it: the client's REST calls and artifact uploads over
HTTP) read back with MlflowClient, W&B in offline mode read back from its run file, TensorBoard read
back with its event reader. Each compared with what the run itself wrote (log.jsonl, report.json)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from runs_helpers import COMMON, ENV, dapft

from dapft.training.state import read_log
from dapft.utils.trackers import parse_report_to

QUICK = [*COMMON, "--max-train-images", "8", "--max-eval-images", "4"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server on a free localhost port: a sqlite store, artifacts kept in a folder of its
    own and proxied (clients upload them to the server over HTTP, as to a team's server)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                   "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                                  cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  # no job runners (MLflow 3's GenAI jobs: seven processes a server)
                                  env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:  # the server and the web workers it started
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def tracked_env(tmp_path: Path, mlflow_server: str, **more) -> dict:
    """The environment of a tracked run: the server, an experiment of this test's own (the server is
    the module's), W&B offline."""
    return {**ENV, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": f"dapft-{tmp_path.name}",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", **more}


def mlflow_runs(env: dict) -> tuple:
    """The MLflow client on the test's server, and the runs of its experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client, client.search_runs([client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"]).experiment_id])


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file (`run-ID.wandb`): W&B's protobuf records in the leveldb
    log format (32 KiB blocks, each record a 7-byte header of checksum, length and kind, split into
    pieces across blocks), after a 7-byte file header. wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(folder: Path) -> list[dict]:
    """Each offline run under folder/wandb: its id, group, job type, history rows, and summary."""
    runs = []
    for run_file in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"id": None, "group": None, "job_type": None, "history": [], "summary": {}}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type)
            elif kind == "history":
                run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                       for i in record.summary.update})
        runs.append(run)
    return runs


def assert_same_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same steps, each once and in order, with the same values (to float32's precision, in which
    TensorBoard keeps them)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6)


def logged(run: Path, kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["global_step"], r[key]) for r in read_log(run / "log.jsonl") if r["type"] == kind and key in r]


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow-server")
def test_every_tracker_gets_the_run_and_a_resumed_run_continues_the_same_tracker_run(tmp_path, tiny_detr,
                                                                                     shapes_root, mlflow_server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = tracked_env(tmp_path, mlflow_server)
    run = tmp_path / "run"
    args = ["finetune", "--model", tiny_detr, "--data", shapes_root, "--output", run, "--epochs", "2",
            "--report-to", "tensorboard,mlflow,wandb", *QUICK]
    dapft(*args, "--max-steps", "3", env=env, cwd=tmp_path)  # stops after step 3, checkpointed
    dapft(*args, "--resume", "--log-checkpoints", env=env, cwd=tmp_path)  # steps 4 to 4: the rest
    report = json.loads((run / "report.json").read_text())
    losses = logged(run, "step", "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]

    client, [tracked] = mlflow_runs(env)
    assert tracked.info.run_id == json.loads((run / "trackers.json").read_text())["ids"]["mlflow"]
    assert tracked.info.status == "FINISHED"
    params = tracked.data.params
    assert params["loss"] == "dap" and params["sigma"] == "0.05" and params["family"] == "detr"
    assert float(params["recipe.pretrain_lr"]) > 0  # the resolved recipe
    history = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert_same_series([(m.step, m.value) for m in sorted(history, key=lambda m: m.step)], losses)  # no gap, no repeat
    evals = sorted(client.get_metric_history(tracked.info.run_id, "eval/AP"), key=lambda m: m.step)
    assert_same_series([(m.step, m.value) for m in evals], logged(run, "eval", "AP"))
    assert tracked.data.metrics["after/AP"] == pytest.approx(report["after"]["AP"])
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"report.md", "report.json", "curves.png", "checkpoint-best"} <= artifacts
    uploaded = client.download_artifacts(tracked.info.run_id, "report.json", str(tmp_path))  # back over HTTP
    assert Path(uploaded).read_bytes() == (run / "report.json").read_bytes()

    first, second = wandb_runs(run)
    assert first["id"] == second["id"]  # the resumed run continues the same W&B run
    steps = [row["_step"] for w in (first, second) for row in w["history"] if "train/loss" in row]
    assert sorted(steps) == [1, 2, 3, 4] and len(set(steps)) == 4
    assert second["summary"]["after/AP"] == pytest.approx(report["after"]["AP"])

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert_same_series([(e.step, e.value) for e in events.Scalars("train/loss")], losses)


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow-server")
def test_a_sweep_is_an_mlflow_parent_run_with_its_runs_as_children_and_a_wandb_group(tmp_path, tiny_detr,
                                                                                      shapes_root, mlflow_server):
    env = tracked_env(tmp_path, mlflow_server)
    out = tmp_path / "sweep"
    dapft("sweep", "--model", tiny_detr, "--data", shapes_root, "--output", out, "--loss", "original",
          "--seed", "0,1", "--epochs", "1", "--max-steps", "1", "--report-to", "mlflow,wandb", *QUICK,
          env=env, cwd=tmp_path)
    summary = json.loads((out / "sweep.json").read_text())
    client, runs = mlflow_runs(env)
    parent_id = json.loads((out / "trackers.json").read_text())["ids"]["mlflow"]
    [parent] = [r for r in runs if r.info.run_id == parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(r["run"] for r in summary["runs"])
    for setting in summary["settings"]:
        key = "mean_AP/" + setting["setting"].replace("=", "_").replace(",", "_")
        assert parent.data.metrics[key] == pytest.approx(setting["AP"]["mean"])
    assert {"sweep.md", "sweep.json", "sweep.png", "settings.json"} <= {a.path for a in client.list_artifacts(parent_id)}

    members = [w for r in summary["runs"] for w in wandb_runs(out / r["run"])]
    groups = {w["group"] for w in members}
    assert len(members) == 2 and len(groups) == 1 and groups.pop().startswith("sweep-")
    [summary_run] = wandb_runs(out)
    assert summary_run["job_type"] == "sweep-summary" and summary_run["group"] == members[0]["group"]


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow-server")
def test_an_evaluation_goes_to_mlflow_and_wandb(tmp_path, tiny_detr, shapes_root, mlflow_server):
    env = tracked_env(tmp_path, mlflow_server)
    ev = tmp_path / "eval"
    dapft("eval", "--model", tiny_detr, "--data", shapes_root, "--output", ev, "--report-to", "mlflow,wandb",
          "--num-workers", "0", "--no-progress", "--max-images", "4", env=env, cwd=tmp_path)
    client, [tracked] = mlflow_runs(env)
    metrics = json.loads((ev / "metrics.json").read_text())["stats"]
    assert tracked.data.metrics["eval/AP"] == pytest.approx(metrics["AP"]) and tracked.data.params["images"] == "4"
    assert {"report.md", "metrics.json", "pr_curves.png"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}
    [run] = wandb_runs(ev)
    assert run["job_type"] == "eval" and run["summary"]["eval/AP"] == pytest.approx(metrics["AP"])


def test_a_tracker_that_is_down_costs_a_warning_and_nothing_else(tmp_path, monkeypatch, capsys):
    # A real MLflow client against a server that is not there (a closed local port, no retries).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from dapft.utils.trackers import Trackers

    trackers = Trackers(tmp_path, ("mlflow",), run_name="run", params={"loss": "dap"})
    trackers.log({"type": "step", "global_step": 1, "loss": 0.5})
    trackers.summary({"after/AP": 0.3})
    trackers.close()
    assert trackers.active == () and not (tmp_path / "trackers.json").exists()
    out = capsys.readouterr().err
    assert "warning: mlflow" in " ".join(out.split()) and "is off for the rest of this run" in " ".join(out.split())


def test_report_to_refuses_an_unknown_tracker_and_names_the_extra_of_a_missing_client():
    assert parse_report_to("none") == () and parse_report_to(None) == ("tensorboard",)  # installed with .[test]
    assert parse_report_to("MLflow, tensorboard") == ("mlflow", "tensorboard")
    for bad in ("comet", "none,wandb", ","):
        with pytest.raises(ValueError, match="--report-to takes a comma list of tensorboard, mlflow, wandb"):
            parse_report_to(bad)
    # the client as a user without the extra has it: not importable
    code = ("import sys; sys.modules['wandb'] = None\nfrom dapft.utils.trackers import parse_report_to\n"
            "try:\n    parse_report_to('wandb')\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60).stdout
    assert "pip install 'dapft[wandb]'" in out


def test_a_resumed_runs_trackers_get_each_later_step_once_and_a_table_reaches_tensorboard(tmp_path):
    """The trackers' own bookkeeping (trackers.json's sent_step): steps a killed run had sent past its
    last checkpoint are logged again by the resumed run, and must not reach the tracker twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dapft.utils.trackers import Trackers

    first = Trackers(tmp_path, ("tensorboard",), run_name="run", params={"loss": "dap", "recipe": {"lr": 1e-4}})
    for step in (1, 2, 3):
        first.log({"type": "step", "global_step": step, "loss": float(step)})
    first.close("KILLED")  # killed after step 3; its last checkpoint was step 2's
    assert json.loads((tmp_path / "trackers.json").read_text())["sent_step"] == 3
    again = Trackers(tmp_path, ("tensorboard",), run_name="run", params={"loss": "dap"})
    for step in (3, 4):  # the resumed run makes step 3 again
        again.log({"type": "step", "global_step": step, "loss": 10.0 + step})
    again.log({"type": "eval", "global_step": 4, "AP": 0.5})
    again.table("settings", ["setting", "AP"], [["sigma=0.05", 0.5]])
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/AP")] == [(4, 0.5)]
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("settings/text_summary")]
    assert "| setting | AP |\n|---|---|\n| sigma=0.05 | 0.5 |" in texts and any("recipe.lr: 0.0001" in t for t in texts)
