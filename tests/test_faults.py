"""Failure modes found by fault injection, each through the real CLI: preemption with the output on a
pipe whose reader is gone, repeated stop signals, a learning rate that blows the weights up, two
launches into one run folder, and storage that is full, read-only or not a folder."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ONE_THREAD, REPO_DIR, assert_user_error, call_main, make_config, run_cli, run_dir

import checkpoint
import run

LONG = dict(train_steps=100000, train_epochs=100000, checkpointing_steps=0, log_interval=1)


def start(config, *extra, **popen):
    """`python run.py --config config` in the background, as a user or a scheduler starts it."""
    return subprocess.Popen([sys.executable, "run.py", "--config", config, *extra], cwd=REPO_DIR,
                            env={**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1"}, **popen)


def wait_for(predicate, proc, timeout=180, interval=0.2):
    """Poll until predicate() holds; fails if the process ends first."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early with status {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(interval)


def training(values):
    """True once the run has written args.json (the last thing before its first step) and stepped."""
    return lambda: os.path.isfile(os.path.join(run_dir(values), "args.json"))


def stop_line(values):
    path = os.path.join(run_dir(values), "run.log")
    text = open(path).read() if os.path.isfile(path) else ""
    return re.search(r"stopped by SIGTERM at step (\d+): checkpoint (\S+);", text)


def test_sigterm_with_the_pipe_reader_gone_saves_and_exits_0(tiny, tokenized, tmp_path):
    """`run.py 2>&1 | tee log` killed as a process group: the reader dies first, the run keeps
    stepping with its output gone, saves on SIGTERM, ignores a second SIGTERM during shutdown, says
    where it saved in run_dir/run.log and exits 0. Meanwhile a second launch into its folder is
    refused, and the lock goes with the run."""
    config, values = make_config(tmp_path, tiny, tokenized, "pipe", **LONG)
    r, w = os.pipe()
    reader = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
    trainer = start(config, stdout=w, stderr=w)
    os.close(r)
    os.close(w)
    try:
        wait_for(training(values), trainer)
        reader.send_signal(signal.SIGTERM)
        reader.wait()
        second = run_cli("run.py", "--config", config, env=ONE_THREAD)  # while the output is gone, steps go on
        assert_user_error(second, f"{run_dir(values)} is in use by pid {trainer.pid}", "--break_lock")
        assert trainer.poll() is None, "the run died on its closed output"
        trainer.send_signal(signal.SIGTERM)
        wait_for(lambda: stop_line(values), trainer, timeout=120)
        trainer.send_signal(signal.SIGTERM)  # a scheduler repeating its notice while the run shuts down
        assert trainer.wait(timeout=120) == 0
    finally:
        trainer.kill()
    step, path = stop_line(values).groups()
    assert path == os.path.join(run_dir(values), f"step_{step}") and int(step) > 1
    assert checkpoint.problem_with(path) is None
    assert not os.path.exists(os.path.join(run_dir(values), checkpoint.LOCK))


def test_a_learning_rate_that_blows_up_the_weights_stops_at_once_without_saving(tiny, tokenized, tmp_path):
    """The loss and the gradient of step 1 are finite, and so is the learning rate, but the update
    puts the weights near 1e37: the next forward pass would be inf / NaN."""
    config, values = make_config(tmp_path, tiny, tokenized, "blowup", learning_rate=1e37, warmup_steps=0,
                                 train_steps=4, checkpointing_steps=1, save_total_limit=0)
    proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, "made the weights non-finite", "nothing was saved", "Lower learning_rate")
    assert not [d for d in os.listdir(run_dir(values)) if d.startswith("step_") or d.startswith(".step_")]


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(values, **holder):
    os.makedirs(run_dir(values), exist_ok=True)
    with open(os.path.join(run_dir(values), checkpoint.LOCK), "w") as f:
        json.dump({"pid": dead_pid(), "host": socket.gethostname(), "since": "2026-01-01 00:00:00", **holder}, f)


def test_a_lock_is_stale_only_when_its_process_is_known_to_be_gone():
    here = socket.gethostname()
    assert checkpoint.stale_lock({"pid": dead_pid(), "host": here, "since": ""})
    assert checkpoint.stale_lock({"pid": os.getpid(), "host": here, "since": ""})  # a restarted container's pid
    assert checkpoint.stale_lock(None)  # unreadable: its writer died before finishing it
    assert not checkpoint.stale_lock({"pid": os.getppid(), "host": here, "since": ""})
    assert not checkpoint.stale_lock({"pid": dead_pid(), "host": "another-host", "since": ""})


def test_stale_and_foreign_locks_and_leftovers_of_a_killed_save(tiny, tokenized, tmp_path):
    """A lock from another host is not taken over, unless --break_lock; a half-written
    `.step_N.partial` is removed and a `.step_N.old` whose replacement never came is put back."""
    config, values = make_config(tmp_path, tiny, tokenized, "stale", train_steps=1, resume_from="none")
    write_lock(values, host="another-host", pid=1)
    proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, "is in use by pid 1 on another-host", "--break_lock")
    assert not os.path.exists(os.path.join(run_dir(values), "args.json"))  # refused before any write

    os.makedirs(os.path.join(run_dir(values), ".step_9.partial", "training_state"))
    os.makedirs(os.path.join(run_dir(values), ".step_8.old"))
    proc = call_main(run.main, ["--config", config, "--break_lock"])
    assert proc.returncode == 0, proc.stderr
    assert "taking over the run folder lock" in proc.stdout and "--break_lock" in proc.stdout
    names = os.listdir(run_dir(values))
    assert ".step_9.partial" not in names and "step_8" in names and ".step_8.old" not in names


def test_output_dir_that_is_a_file_is_one_line_before_loading(tiny, tokenized, tmp_path):
    blocker = tmp_path / "notafolder"
    blocker.write_text("not a folder")
    config, _ = make_config(tmp_path, tiny, tokenized, "file", output_dir=str(blocker))
    started = time.perf_counter()
    proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, f"cannot write into the run folder {blocker}/run", "writable folder")
    assert time.perf_counter() - started < 10


@contextlib.contextmanager
def tmpfs(path, size, readonly=False):
    """A small file system of its own at path (needs root, as on this project's machines and CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path)
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_output_dir_is_one_line(tiny, tokenized, tmp_path):
    with tmpfs(tmp_path / "fs_ro", "1m", readonly=True) as folder:
        config, _ = make_config(tmp_path, tiny, tokenized, "ro", output_dir=folder)
        proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, f"cannot write into the run folder {folder}/run", "Read-only file system")


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny, tokenized, tmp_path):
    """A checkpoint here takes about 600 KB. In 1 MB the first fits and the second is refused before
    it is written (the first one's size is known); in 300 KB the first fails while being written.
    Either way: one line, no partial folder, the complete checkpoints intact."""
    with tmpfs(tmp_path / "fs_one", "1m") as folder:
        config, values = make_config(tmp_path, tiny, tokenized, "one", output_dir=folder, train_steps=4,
                                     checkpointing_steps=2, save_total_limit=0)
        proc = call_main(run.main, ["--config", config])
        assert_user_error(proc, f"no space for checkpoint {folder}/run/step_4", "the last checkpoint took",
                          "resume_from latest")
        assert checkpoint.problem_with(os.path.join(folder, "run", "step_2")) is None
        assert sorted(n for n in os.listdir(os.path.join(folder, "run")) if "step" in n) == ["step_2"]
    with tmpfs(tmp_path / "fs_tiny", "300k") as folder:
        config, values = make_config(tmp_path, tiny, tokenized, "tiny", output_dir=folder, train_steps=4,
                                     checkpointing_steps=2)
        proc = call_main(run.main, ["--config", config])
        assert_user_error(proc, f"no space left writing checkpoint {folder}/run/step_2", "intact")
        assert not [n for n in os.listdir(os.path.join(folder, "run")) if "step" in n]
