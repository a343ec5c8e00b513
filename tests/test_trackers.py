"""Experiment trackers (config key report_to) through the real commands: MLflow against a real tracking
server and W&B offline get the config as the run's parameters and every metric TensorBoard gets, at
the same steps; a resume continues the same tracker run, each step in it once. A tracker that is not
installed, or a name that is none, is one line before anything loads.

The MLflow and W&B tests need requirements-trackers.txt (they skip without it)."""
import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import (BIN, ONE_THREAD, REPO_DIR, assert_user_error, call_main, free_port, launch, make_config,
                      run_cli, run_dir, write_config)
from test_lifecycle import KILL_AFTER_LOGGING

import checkpoint
import config
import run
import tracking

pytestmark = pytest.mark.extras
ACCELERATE_CPU = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "configs/accelerate_cpu.yaml"]


def tb_scalars(values):
    """{tag: {step: value}} of every scalar in the run's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(values["tb_dir"], values["experiment_id"]))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def expected_params(values):
    """The run's parameters: its args.json (the config in full) as tracking.params gives them."""
    with open(os.path.join(run_dir(values), "args.json")) as f:
        return tracking.params(json.load(f))


def tracker_runs(path):
    return checkpoint.read_trainer_state(path)["tracker_runs"]


def final_checkpoint(proc):
    return proc.stdout.split("final checkpoint: ")[1].split()[0]


class MlflowServer:
    """`mlflow server` (SQLite store) on 127.0.0.1, in a process group of its own."""

    def __init__(self, root):
        self.root, self.uri, self.proc = root, f"http://127.0.0.1:{free_port()}", None

    def start(self):
        """Start it and wait until its /health answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "w") as log:
            self.proc = subprocess.Popen(
                [os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1],
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                 "--default-artifact-root", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                # without its job runners: eight processes that poll for GenAI jobs, on a 2-core machine
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()}")
                time.sleep(0.25)

    def stop(self):
        """Kill its process group (the server and its workers)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server for the test, stopped at its end."""
    pytest.importorskip("mlflow")
    server = MlflowServer(tmp_path / "mlflow_server")
    try:
        yield server.start()
    finally:
        server.stop()


def mlflow_points(client, run_id):
    """{metric name: [(step, value)]} of an MLflow run, in the order logged."""
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in client.get_run(run_id).data.metrics}


def assert_mlflow_has_tensorboards_points(points, scalars, timings_up_to=0):
    """Every TensorBoard point, at its step, under the metric's MLflow name, once; MLflow has no other.
    Timings (throughput) up to step `timings_up_to` are the first launch's in MLflow (the resumed launch
    does not log those steps again) and the resumed launch's in TensorBoard: their steps only are
    compared."""
    assert set(points) == {tracking.metric_name("mlflow", tag) for tag in scalars}
    for tag, by_step in scalars.items():
        got = points[tracking.metric_name("mlflow", tag)]
        steps = [step for step, _ in got]
        assert len(steps) == len(set(steps)), (tag, steps)
        assert set(steps) == set(by_step), (tag, sorted(steps), sorted(by_step))
        for step, value in got:
            if not (tag.endswith("_per_s") and step <= timings_up_to):
                assert value == pytest.approx(by_step[step], rel=1e-6, abs=1e-7), (tag, step)


def test_mlflow_gets_what_tensorboard_gets_and_a_resume_continues_its_run(tiny, tokenized, tmp_path, mlflow_server):
    """A run killed after logging step 8 (its last checkpoint step_5), resumed with the same command,
    then resumed for a third epoch: one MLflow run all along, each step in it once, with the values
    TensorBoard holds; its parameters are the config, plus the key the last resume changed."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    config_path, values = make_config(tmp_path, tiny, tokenized, "mlflow", report_to=["mlflow", "tensorboard"],
                                      checkpointing_steps=5, resume_from="latest")
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_AFTER_LOGGING.format(repo=REPO_DIR, step=8))
    proc = run_cli(str(killer), "--config", config_path, env={**ONE_THREAD, **env})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    experiment = client.get_experiment_by_name(values["experiment_id"]).experiment_id
    [first] = client.search_runs([experiment])
    assert max(step for step, _ in mlflow_points(client, first.info.run_id)["lr"]) == 8

    proc = run_cli("run.py", "--config", config_path, prefix=ACCELERATE_CPU, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {run_dir(values)}/step_5 (step 5)" in proc.stdout
    [again] = client.search_runs([experiment])
    run_id = again.info.run_id
    assert run_id == first.info.run_id and again.info.status == "FINISHED"
    assert tracker_runs(final_checkpoint(proc))["mlflow"] == run_id
    assert_mlflow_has_tensorboards_points(mlflow_points(client, run_id), tb_scalars(values), timings_up_to=8)
    assert "valid/retrieval/mrr_at_10" in again.data.metrics
    params = {key: str(value) for key, value in expected_params(values).items()}
    assert again.data.params == params

    steps = max(tb_scalars(values)["lr"])
    proc = run_cli("run.py", "--config", config_path, "--train_epochs", "3", prefix=ACCELERATE_CPU, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [last] = client.search_runs([experiment])
    assert last.info.run_id == run_id
    assert max(tb_scalars(values)["lr"]) == steps // 2 * 3
    assert_mlflow_has_tensorboards_points(mlflow_points(client, run_id), tb_scalars(values), timings_up_to=8)
    assert last.data.params == {**params, f"from_step_{steps}/train_epochs": "3"}


def logged_to_mlflow(client, experiment_name, points=2):
    """Whether the experiment's run holds `points` lr points."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "lr")) >= points


def test_an_mlflow_server_gone_mid_run_is_one_warning_and_training_goes_on(tiny, tokenized, tmp_path,
                                                                         mlflow_server):
    """The tracking server stops while the run trains: one warning line, and the run trains on, logging
    to TensorBoard, until a SIGTERM stops it with a checkpoint (status 0)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    config_path, values = make_config(tmp_path, tiny, tokenized, "gone", report_to=["mlflow", "tensorboard"],
                                      train_steps=100000, train_epochs=100000)
    client = MlflowClient(mlflow_server.uri)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    err = tmp_path / "stderr.log"
    with open(err, "w") as out:
        proc = subprocess.Popen([sys.executable, "run.py", "--config", config_path], cwd=REPO_DIR, env=env,
                                stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_for(lambda: logged_to_mlflow(client, values["experiment_id"]), proc, err)
        mlflow_server.stop()
        wait_for(lambda: "warning: report_to mlflow: logging step" in err.read_text(), proc, err)
        failed_at = int(err.read_text().split("warning: report_to mlflow: logging step ")[1].split()[0])
        wait_for(lambda: max(tb_scalars(values).get("lr", {0: 0})) >= failed_at + 3, proc, err)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in err.read_text().splitlines() if "report_to mlflow" in line]
    assert len(lines) == 1 and "no more metrics go to it in this launch" in lines[0], err.read_text()
    assert "Traceback" not in err.read_text()
    with open(os.path.join(run_dir(values), "run.log")) as f:
        assert "stopped by SIGTERM" in f.read()


def wait_for(predicate, proc, log, timeout=180):
    """Poll until predicate() holds; fails if the process ends first (with its stderr `log`)."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.3)


def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb), each a wandb_internal_pb2.Record: after a 7-byte
    header, LevelDB's log format, 32 KiB blocks of pieces (CRC, length, kind: whole, first, middle,
    last), a block's tail under 7 bytes left empty. wandb 0.31 ships no Python reader of it."""
    from wandb.proto.wandb_internal_pb2 import Record

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # whole, last
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(path):
    """(run id, project, config {key: value}, history {step: {metric: value}}) of a W&B run file,
    without W&B's own keys (_step, _runtime, _wandb, ...)."""
    run_id = project = None
    config, history = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, project = record.run.run_id, record.run.project
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update
                           if not item.key.startswith("_")})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return run_id, project, config, history


def hparams_files(values):
    """The parameters that each launch gave TensorBoard (accelerate's hparams.yml), in launch order."""
    import yaml

    paths = sorted(glob.glob(os.path.join(values["tb_dir"], values["experiment_id"], "*", "hparams.yml")),
                   key=lambda p: float(os.path.basename(os.path.dirname(p))))
    return [yaml.safe_load(open(path)) for path in paths]


def test_wandb_offline_gets_what_tensorboard_gets_and_a_resume_continues_its_run(tiny, tokenized, tmp_path):
    """W&B offline (WANDB_MODE, WANDB_DIR): one epoch, then a resume for a second; each launch writes
    its run file, both of the same run id (project: experiment_id), the first with the config, the
    second with the keys the resume changed; together they hold TensorBoard's points, each step in
    one file. TensorBoard's parameters (hparams.yml) are the same."""
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_CONFIG_DIR": str(wandb_dir),
           "WANDB_CACHE_DIR": str(wandb_dir), "WANDB_DATA_DIR": str(wandb_dir)}
    config_path, values = make_config(tmp_path, tiny, tokenized, "wandb", report_to=["wandb", "tensorboard"],
                                      train_epochs=1)
    proc = run_cli("run.py", "--config", config_path, prefix=ACCELERATE_CPU, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    params = expected_params(values)
    steps = max(tb_scalars(values)["lr"])
    proc = run_cli("run.py", "--config", config_path, "--train_epochs", "2", "--resume_from", "latest",
                   prefix=ACCELERATE_CPU, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    changed = {f"from_step_{steps}/train_epochs": 2, f"from_step_{steps}/resume_from": "latest"}

    first, second = (wandb_run(path) for path in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" /
                                                                          "run-*.wandb"))))
    assert first[0] == second[0] == tracker_runs(final_checkpoint(proc))["wandb"]
    assert first[1] == second[1] == values["experiment_id"]
    assert first[2] == params and second[2] == changed
    assert max(first[3]) == steps and min(second[3]) == steps + 1
    scalars = tb_scalars(values)
    logged = {**first[3], **second[3]}
    assert set(logged) == {step for points in scalars.values() for step in points}
    for tag, points in scalars.items():
        assert {step for step in logged if tag in logged[step]} == set(points), tag
        for step, value in points.items():
            assert logged[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert hparams_files(values) == [params, changed]


def test_a_tracker_that_is_not_installed_is_one_line_before_loading(tiny, tokenized, tmp_path, monkeypatch):
    absent = [name for name in config.TRACKERS if importlib.util.find_spec(name) is None]
    if not absent:
        pytest.skip("every tracker report_to takes is installed")
    loaded, real_prepare = [], run.prepare
    monkeypatch.setattr(run, "prepare", lambda *a: loaded.append(a) or real_prepare(*a))
    config_path, _ = make_config(tmp_path, tiny, tokenized, "absent", report_to=["tensorboard", absent[0]])
    started = time.perf_counter()
    proc = call_main(run.main, ["--config", config_path])
    assert_user_error(proc, f"report_to has '{absent[0]}', which is not installed", f"pip install {absent[0]}")
    assert time.perf_counter() - started < 10
    assert not loaded, "the data was loaded before the check"


@pytest.mark.parametrize("names, fragments", [
    (["tensorboard", "mlfow"], ["key 'report_to'", 'unknown tracker "mlfow"', "did you mean 'mlflow'?"]),
    (["bogus"], ['unknown tracker "bogus"', "valid names: " + ", ".join(config.TRACKERS), "[] for none"]),
    (["tensorboard", 3], ["unknown tracker 3", "valid names"]),
    (["all"], ["'all'", "name them"]),
    (["tensorboard", "none"], ["'none' beside other trackers", "give [] for no tracker"]),
    (["mlflow", "mlflow"], ["names 'mlflow' twice"]),
])
def test_a_name_report_to_does_not_take_is_one_line(tmp_path, names, fragments):
    config_path = write_config(tmp_path / "config.json", model_path="m", train_data_path="t", report_to=names)
    assert_user_error(call_main(run.main, ["--config", config_path]), config_path, *fragments)


def test_a_name_on_the_command_line_says_the_nearest(tmp_path):
    config_path = write_config(tmp_path / "config.json", model_path="m", train_data_path="t")
    proc = call_main(run.main, ["--config", config_path, "--report_to", '["tensorbaord"]'])
    assert_user_error(proc, "command line: --report_to", "did you mean 'tensorboard'?")
    proc = call_main(run.main, ["--config", config_path, "--report_to", "mlflow,tensorbaord"])
    assert_user_error(proc, "command line: --report_to", "did you mean 'tensorboard'?")


@pytest.mark.parametrize("value, expected", [
    ('["mlflow", "tensorboard"]', ["mlflow", "tensorboard"]), ("mlflow,tensorboard", ["mlflow", "tensorboard"]),
    ("wandb", ["wandb"]), ("none", []), ("[]", []),
])
def test_report_to_takes_what_transformers_takes(tmp_path, value, expected):
    """A list, or as transformers' --report_to: names with commas, one name, none."""
    config_path = write_config(tmp_path / "config.json", model_path="m", train_data_path="t")
    args, overrides = config.parse_run_args(["--config", config_path, "--report_to", value])
    assert config.load_config(config_path, overrides).report_to == expected
    in_file = write_config(tmp_path / "file.json", model_path="m", train_data_path="t", report_to="none")
    assert config.load_config(in_file).report_to == []


def test_report_to_takes_the_names_of_accelerates_trackers():
    """config.TRACKERS are accelerate's names (1.9 added the last, trackio); on an older accelerate a
    name it lacks is one line asking for a newer one."""
    import accelerate
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from packaging.version import Version

    if Version(accelerate.__version__) >= Version("1.9"):
        assert set(config.TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    for name in set(config.TRACKERS) - set(LOGGER_TYPE_TO_CLASS):
        assert "pip install" in tracking.missing([name])


def test_no_tracker_writes_nothing_and_needs_no_tb_dir(tiny, tokenized, tmp_path):
    """report_to []: the run trains without a tracker; tb_dir, a file here, is neither checked nor written."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    config_path, _ = make_config(tmp_path, tiny, tokenized, "none", report_to=[], tb_dir=str(blocker), train_steps=3)
    proc = launch(config_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert blocker.read_text() == "a file"
