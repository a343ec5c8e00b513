"""A run's life around its training steps, through the real CLI and launcher: a TensorBoard folder
that cannot be written, a launcher killed under its workers, a resumed run's replayed steps in
TensorBoard, and torch elastic's automatic restarts (--max_restarts) resuming exactly."""
import os
import re
import signal
import subprocess
import time

from conftest import (ONE_THREAD, REPO_DIR, assert_same_curves, assert_same_weights, assert_user_error, call_main,
                      children, curves, ddp_launch, launch, launch_env, make_config, run_dir)
from test_faults import LONG, stop_line, tmpfs, training, wait_for

import checkpoint
import run


def test_unwritable_tb_dir_is_one_line_before_loading(tiny, tokenized, tmp_path, monkeypatch):
    """tb_dir a file, or on a read-only file system: one line before the data and the model load,
    not a traceback from the SummaryWriter once they have."""
    loaded, real_prepare = [], run.prepare
    monkeypatch.setattr(run, "prepare", lambda *a: loaded.append(a) or real_prepare(*a))
    blocker = tmp_path / "notafolder"
    blocker.write_text("not a folder")
    with tmpfs(tmp_path / "fs_ro", "1m", readonly=True) as folder:
        for tb_dir, reason in ((str(blocker), "Not a directory"), (folder, "Read-only file system")):
            config, _ = make_config(tmp_path, tiny, tokenized, "tb", tb_dir=tb_dir)
            started = time.perf_counter()
            proc = call_main(run.main, ["--config", config])
            assert_user_error(proc, f"cannot write TensorBoard logs into tb_dir {tb_dir}", reason,
                              "set tb_dir to a writable folder")
            assert time.perf_counter() - started < 10
    assert not loaded, "the data was loaded before the check"


def alive(pid):
    """Whether pid runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def workers(launcher_pid):
    """The run.py processes below a launcher (its children, or theirs)."""
    found, todo = [], [launcher_pid]
    while todo:
        for pid in children(todo.pop()):
            todo.append(pid)
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if "run.py" in cmdline and pid != launcher_pid:
                found.append(pid)
    return found


def launch_cmd(config, *extra):
    """The 2-process DDP launch (float32) of run.py, with extra `accelerate launch` options."""
    return [*ddp_launch(2), *extra, "run.py", "--config", config]


def test_killing_the_launcher_stops_its_workers_with_a_checkpoint(tiny, tokenized, tmp_path):
    """SIGKILL to `accelerate launch` alone (its workers sit in sessions of their own, so no group
    signal reaches them): each worker gets SIGTERM from Linux and takes the stop path, a checkpoint
    at the step both agree on, instead of training on without a launcher."""
    config, values = make_config(tmp_path, tiny, tokenized, "orphans", **LONG)
    with open(tmp_path / "launch.log", "w") as out:
        launcher = subprocess.Popen(launch_cmd(config), cwd=REPO_DIR, env=launch_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
    pids = []
    try:
        wait_for(training(values), launcher)
        time.sleep(2)  # a few steps
        pids = workers(launcher.pid)
        assert len(pids) == 2, pids
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 60
        while any(alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids), "the workers train on without their launcher"
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    stopped = stop_line(values)
    assert stopped, (tmp_path / "launch.log").read_text()
    step, path = stopped.groups()
    assert int(step) > 0 and path == os.path.join(run_dir(values), f"step_{step}")
    assert checkpoint.problem_with(path) is None


KILL_AFTER_LOGGING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import run

real_log = run.log


def log(writer, metrics, step):
    # Logged step {step}'s training metrics, then died: steps after the last checkpoint are in TensorBoard.
    real_log(writer, metrics, step)
    if step == {step} and "lr" in metrics:
        os.kill(os.getpid(), signal.SIGKILL)


run.log = log
run.main(sys.argv[1:])
"""


def scalar_steps(values):
    """{tag: [step of each point TensorBoard shows]}, duplicates kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(values["tb_dir"], values["experiment_id"]))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_resumed_run_shows_each_step_once_in_tensorboard(tiny, tokenized, tmp_path, reference):
    """Killed after logging step 8, resumed from step_5: steps 6 to 8 are logged again, and
    TensorBoard shows the resumed run's points only, once each."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_AFTER_LOGGING.format(repo=REPO_DIR, step=8))
    config, values = make_config(tmp_path, tiny, tokenized, "replayed", checkpointing_steps=5,
                                 resume_from="latest")
    proc = launch(config, script=str(killer))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert max(scalar_steps(values)["lr"]) == 8
    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {run_dir(values)}/step_5 (step 5)" in proc.stdout
    for tag, steps in scalar_steps(values).items():
        assert len(steps) == len(set(steps)), (tag, sorted(steps))
    assert_same_curves(curves(reference[1]), curves(values))


def test_automatic_restart_resumes_exactly(tiny, tokenized, tmp_path, reference):
    """`accelerate launch --max_restarts 1` with "resume_from": "latest": a worker SIGKILLed after
    step_10; torch elastic restarts both, they resume from the last checkpoint and end with the
    uninterrupted run's curves and weights."""
    ref = reference[2]
    config, values = make_config(tmp_path, tiny, tokenized, "restarted", checkpointing_steps=ref["checkpointing_steps"],
                                 save_total_limit=0, resume_from="latest")
    with open(tmp_path / "launch.log", "w") as out:
        launcher = subprocess.Popen(launch_cmd(config, "--max_restarts", "1"), cwd=REPO_DIR,
                                    env=launch_env(**ONE_THREAD), stdout=out, stderr=subprocess.STDOUT)
    try:
        step_10 = os.path.join(run_dir(values), "step_10")
        wait_for(lambda: os.path.isdir(step_10) and checkpoint.problem_with(step_10) is None, launcher, timeout=300)
        victim = max(workers(launcher.pid))
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, (tmp_path / "launch.log").read_text()
    finally:
        launcher.kill()
    log = (tmp_path / "launch.log").read_text()
    resumed = re.search(r"resuming from \S+/step_(\d+) \(step (\d+)\)", log)
    assert resumed and int(resumed.group(2)) >= 10, log
    assert_same_curves(curves(ref), curves(values))
    assert_same_weights(os.path.join(run_dir(ref), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))

