"""ray_train.py on a real Ray cluster of two nodes on this machine: `ray start --head` on 127.0.0.1
and a second `ray start --address` as the worker node, one CPU each, so that Ray must place the two
training workers one per node. The same config trains as under `accelerate launch` (DeepSpeed
ZeRO-2, the published yaml, 2 processes): equal loss curves and weights; a worker SIGKILLed mid-run
is restarted by Ray (FailureConfig) and the run ends with the uninterrupted weights.

Ray is optional (requirements-ray.txt): `make test-extras` installs it and runs these tests.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest

from conftest import (BIN, REPO_DIR, assert_same_curves, assert_same_weights, assert_user_error, curves,
                      free_port, launch_env, make_config, run_cli, run_dir)

pytestmark = pytest.mark.extras
ray = pytest.importorskip("ray")

ZERO2 = "configs/accelerate_config.yaml"
K = 5  # checkpointing_steps: the kill comes after step_5


def start_node(args, temp_dir, log):
    """A `ray start --block` in a session of its own: stopping its process group stops the node."""
    return subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
                             "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=launch_env())


def stop_node(proc):
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address, count, node, log_path, timeout=120):
    """Until `count` nodes are alive; else the last probe's error and the tail of the newest node's log."""
    script = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
              "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline, proc = time.time() + timeout, None
    while time.time() < deadline and node.poll() is None:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    log = "\n".join(open(log_path).read().splitlines()[-15:])
    probe = proc.stderr[-2000:] if proc else "(none: the node had exited)"
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes (node exit status "
                         f"{node.poll()}); last probe:\n{probe}\nnode log:\n{log}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node Ray cluster (one CPU per node): its address and dashboard URL; stopped after the module's tests.
    Each node has a temp dir of its own (short paths: Ray's sockets live there), as separate machines.
    Token authentication is on, as `ray start --head` turns it on wherever ~/.ray/auth_token exists;
    the token is the test's own, given to the nodes, the drivers and `ray job submit` by the environment."""
    logs = tmp_path_factory.mktemp("ray_logs")
    dirs = [tempfile.mkdtemp(prefix="ray", dir="/tmp") for _ in range(2)]
    token = logs / "auth_token"
    token.write_text(os.urandom(16).hex())
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_log, node_log = open(logs / "head.log", "w"), open(logs / "node.log", "w")
    # The dashboard serves `ray job submit` and the state API that Ray Train's clean-up polls.
    dashboard = free_port()
    nodes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        patch.delenv("RAY_AUTH_TOKEN", raising=False)
        try:
            nodes.append(start_node(["--head", "--port", port, "--dashboard-port", dashboard], dirs[0], head_log))
            wait_for_nodes(address, 1, nodes[-1], head_log.name)
            nodes.append(start_node(["--address", address], dirs[1], node_log))
            wait_for_nodes(address, 2, nodes[-1], node_log.name)
            yield types.SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard}")
        finally:
            for proc in reversed(nodes):
                stop_node(proc)
            head_log.close()
            node_log.close()
            for folder in dirs:
                shutil.rmtree(folder, ignore_errors=True)


def ray_train(config, address, *args, timeout=900):
    return run_cli("ray_train.py", "--config", config, "--num_workers", "2", "--address", address,
                   "--accelerate_config", ZERO2, *args, env=launch_env(), timeout=timeout)


@pytest.fixture(scope="module")
def launched(tiny, tokenized, tmp_path_factory, deepspeed_op):
    """The reference: `accelerate launch` of the published ZeRO-2 yaml, 2 processes, a checkpoint every K steps."""
    root = tmp_path_factory.mktemp("ray_reference")
    config, values = make_config(root, tiny, tokenized, "launch", checkpointing_steps=K)
    proc = subprocess.run([os.path.join(BIN, "accelerate"), "launch", "--config_file", ZERO2, "--num_processes", "2",
                           "--main_process_port", free_port(), "run.py", "--config", config],
                          cwd=REPO_DIR, capture_output=True, text=True, env=launch_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, values


def final_checkpoint(values):
    return os.path.join(run_dir(values), f"epoch_{values['train_epochs']}")


def test_ray_train_matches_accelerate_launch(cluster, launched, tiny, tokenized):
    root, reference = launched
    config, values = make_config(root, tiny, tokenized, "ray", checkpointing_steps=K)
    proc = ray_train(config, cluster.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "24 steps, 2 process(es)" in proc.stdout + proc.stderr
    assert_same_weights(final_checkpoint(reference), final_checkpoint(values))
    assert_same_curves(curves(reference), curves(values))
    # Every checkpoint was reported to Ray Train, as a pointer to the run folder's
    pointers = glob.glob(os.path.join(values["output_dir"], "ray", "run", "checkpoint_*", "report.json"))
    assert pointers, os.listdir(values["output_dir"])


def worker_pids():
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmdline = open(path, "rb").read()
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            pids.append(int(path.split("/")[2]))
    return pids


def interrupted_run(cluster, config, log_path, ready, interrupt, *args):
    """`python ray_train.py` in the background: once the path pattern `ready` exists, interrupt()
    (a kill or a signal); returns (exit status, output)."""
    cmd = [sys.executable, "ray_train.py", "--config", config, "--num_workers", "2", "--address", cluster.address,
           "--accelerate_config", ZERO2, *args]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, env=launch_env())
        try:
            deadline = time.time() + 600
            while not glob.glob(ready) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert glob.glob(ready), f"{ready} never appeared"
            interrupt(proc)
            status = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        return status, log.read()


def kill_a_worker(proc):
    victims = worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)


def test_ray_restarts_a_killed_worker_from_the_last_checkpoint(cluster, launched, tiny, tokenized):
    root, reference = launched
    config, values = make_config(root, tiny, tokenized, "ray_killed", checkpointing_steps=K)
    reported = os.path.join(values["output_dir"], "ray", "run", "checkpoint_*", "report.json")
    status, out = interrupted_run(cluster, config, root / "ray_killed.log", reported, kill_a_worker,
                                  "--max_failures", "1")
    assert status == 0, out
    # From the checkpoint Ray Train was told of, or (killed before Ray recorded it) the newest in the run folder
    assert re.search(r"resuming from \S+/step_\d+ \(step \d+\)", out), out
    assert_same_weights(final_checkpoint(reference), final_checkpoint(values))
    assert_same_curves(curves(reference), curves(values))


def test_ctrl_c_at_the_driver_stops_the_workers_with_a_checkpoint(cluster, launched, tiny, tokenized):
    """Ctrl-C to `python ray_train.py` takes run.py's path on every worker (the step finishes, a
    checkpoint, exit status 130); the same command with resume_from latest then ends as the
    uninterrupted run."""
    root, reference = launched
    config, values = make_config(root, tiny, tokenized, "ray_ctrl_c", checkpointing_steps=K)
    status, out = interrupted_run(cluster, config, root / "ray_ctrl_c.log", os.path.join(run_dir(values), f"step_{K}"),
                                  lambda proc: proc.send_signal(signal.SIGINT))
    assert status == 130, out
    stopped = re.search(r"stopped by SIGINT at step (\d+): checkpoint (\S+);", out)
    assert stopped, out
    assert os.path.isdir(stopped[2]) and stopped[2].endswith(f"step_{stopped[1]}")
    assert "Traceback" not in out
    resumed = ray_train(config, cluster.address, "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {stopped[2]} (step {stopped[1]})" in resumed.stdout + resumed.stderr
    assert_same_weights(final_checkpoint(reference), final_checkpoint(values))
    assert_same_curves(curves(reference), curves(values))


def test_ray_train_input_errors_are_one_line(cluster, tiny, tokenized, tmp_path):
    config, _ = make_config(tmp_path, tiny, tokenized, "typo", learning_rte=1e-3)
    assert_user_error(ray_train(config, cluster.address), "learning_rte", "learning_rate")
    config, _ = make_config(tmp_path, tiny, tokenized, "many")
    assert_user_error(ray_train(config, cluster.address, "--num_workers", "5"), "5 worker(s) need 5 CPU",
                      "the cluster has 2")
    # A driver without the cluster's token, and an address where no cluster listens
    assert_user_error(run_cli("ray_train.py", "--config", config, "--address", cluster.address,
                              env={"RAY_AUTH_MODE": "disabled"}), "uses token authentication", "RAY_AUTH_MODE=token")
    assert_user_error(run_cli("ray_train.py", "--config", config, "--address", f"127.0.0.1:{free_port()}",
                              timeout=300), "cannot connect to the Ray cluster", "ray start --head")
    # Found by the workers (the data), reported by the driver in one line, and not retried
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "msmarco.parquet").write_text("not parquet")
    config, _ = make_config(tmp_path, tiny, str(bad), "bad_data")
    proc = ray_train(config, cluster.address, "--max_failures", "2")
    assert_user_error(proc, "msmarco.parquet")
    assert "restarted the workers" not in proc.stdout + proc.stderr


def test_ray_job_submit_as_docs_ray_md_writes_it(cluster, tiny, tokenized, tmp_path):
    """The KubeRay command of docs/ray.md: the repository shipped as the job's working dir (here with the
    test environment's python, where an image has its own), DDP, relative paths in the config."""
    config, values = make_config(tmp_path, tiny, tokenized, "job")
    excludes = '{"excludes": [".git", ".venv", "output", "demo_out", ".pytest_cache"]}'
    proc = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", cluster.dashboard,
                           "--working-dir", ".", "--runtime-env-json", excludes, "--", sys.executable, "ray_train.py",
                           "--config", config, "--num_workers", "2",
                           "--accelerate_config", "configs/accelerate_ddp.yaml"],
                          cwd=REPO_DIR, capture_output=True, text=True, env=launch_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final checkpoint: " in proc.stdout + proc.stderr
    assert os.path.isdir(final_checkpoint(values))
