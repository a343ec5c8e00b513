"""Ctrl-C (SIGINT) through the real CLI: training takes the stop path (checkpoint, run.log line, exit
130) and resumes from it; a second Ctrl-C exits at once with one line and leaves no checkpoint that is
not whole; the tokenizer and the miner stop with one line, exit 130, leave nothing half-written, and
the same command then finishes with the bytes of an uninterrupted run. Each process is started in a
session of its own and the signal goes to its process group, as a terminal's Ctrl-C does (the
tokenizer's worker processes included)."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ONE_THREAD, REPO_DIR, call_main, ddp_launch, launch_env, make_config, run_dir
from test_faults import wait_for as poll_until
from test_lifecycle import alive, workers

import checkpoint
import evaluate
import mine_negatives
import run
import tokenize_data_qwen

LONG = dict(train_steps=100000, train_epochs=100000, checkpointing_steps=0, log_interval=1, resume_from="latest")
ENV = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start(tmp_path, label, script, *args):
    """`python script args` in a session of its own, stdout and stderr to files: (process, read(name))."""
    out, err = tmp_path / f"{label}.out", tmp_path / f"{label}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, script, *args], cwd=REPO_DIR, env=ENV, stdout=o, stderr=e,
                                start_new_session=True)
    return proc, lambda: (out.read_text(), err.read_text())


def ctrl_c(proc):
    """SIGINT to the process group, as a terminal sends it."""
    os.killpg(proc.pid, signal.SIGINT)


def wait_for(predicate, proc, timeout=120):
    return poll_until(predicate, proc, timeout, interval=0.05)


def finish(proc, timeout=60):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_one_line(err, start):
    """No traceback, and exactly one line of stderr that starts with `start`."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(start)]
    assert len(lines) == 1, err


def stepped(read, at_least=2):
    """True once the progress bar shows `at_least` steps done (the stop signal's handler is in place)."""
    return lambda: any(int(n) >= at_least for n in re.findall(r"train: +\d+%\|[^|]*\| *(\d+)/\d+ \[", read()[1]))


def stop_lines(values):
    path = os.path.join(run_dir(values), "run.log")
    text = open(path).read() if os.path.isfile(path) else ""
    return re.findall(r"stopped by SIGINT at step (\d+): checkpoint (\S+);", text)


def checkpoints_whole(values):
    """Every step_N / epoch_N in the run folder is a complete checkpoint; other entries are the lock,
    logs and `.NAME.partial` folders (which the next launch removes). Returns the partial folders."""
    partial = []
    for name in os.listdir(run_dir(values)):
        path = os.path.join(run_dir(values), name)
        if re.fullmatch(r"(step|epoch)_\d+", name):
            assert checkpoint.problem_with(path) is None, (name, checkpoint.problem_with(path))
        elif name.startswith("."):
            assert re.fullmatch(r"\.(step|epoch)_\d+\.partial|\.lock", name), name
            partial += [name] * name.endswith(".partial")
        else:
            assert name in ("run.log", "args.json"), name
    return partial


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tiny, tokenized, tmp_path):
    """One Ctrl-C mid-training: the step finishes, step_N is saved, run.log and the console say
    "stopped by SIGINT at step N", exit 130, no traceback. The same command resumes from step_N."""
    config, values = make_config(tmp_path, tiny, tokenized, "once", **LONG)
    proc, read = start(tmp_path, "first", "run.py", "--config", config)
    wait_for(stepped(read), proc)
    ctrl_c(proc)
    assert finish(proc) == 130, read()
    out, err = read()
    assert "Traceback" not in err, err
    (step, path), = stop_lines(values)
    assert f"stopped by SIGINT at step {step}: checkpoint {path}" in out
    assert path == os.path.join(run_dir(values), f"step_{step}") and int(step) >= 2
    assert checkpoint.problem_with(path) is None
    assert not os.path.exists(os.path.join(run_dir(values), checkpoint.LOCK))

    proc, read = start(tmp_path, "second", "run.py", "--config", config)
    wait_for(stepped(read, int(step) + 2), proc)
    ctrl_c(proc)
    assert finish(proc) == 130, read()
    out, err = read()
    assert f"resuming from {path} (step {step})" in out, out
    assert "Traceback" not in err, err
    (first, _), (again, path) = stop_lines(values)
    assert first == step and int(again) > int(step)
    assert checkpoint.problem_with(path) is None


def test_second_ctrl_c_exits_at_once_with_one_line(tiny, tokenized, tmp_path):
    """Ctrl-C twice, the second while the step or the checkpoint finishes: exit 130 within seconds,
    one line, no traceback; no step_N that is not whole (a cut checkpoint stays `.step_N.partial`).
    The same command then resumes (or starts afresh if no checkpoint got written) and trains."""
    config, values = make_config(tmp_path, tiny, tokenized, "twice", **LONG)
    proc, read = start(tmp_path, "first", "run.py", "--config", config)
    wait_for(stepped(read), proc)
    ctrl_c(proc)
    time.sleep(0.15)
    ctrl_c(proc)
    sent = time.time()
    assert finish(proc) == 130, read()
    assert time.time() - sent < 5
    out, err = read()
    assert_one_line(err, run.INTERRUPTED_AGAIN)
    partial = checkpoints_whole(values)

    proc, read = start(tmp_path, "second", "run.py", "--config", config)
    wait_for(stepped(read, 2), proc)
    ctrl_c(proc)
    assert finish(proc) == 130, read()
    out, err = read()
    assert "Traceback" not in err, err
    for name in partial:
        assert f"removed {os.path.join(run_dir(values), name)}: left by a save that did not finish" in out
    assert checkpoints_whole(values) == []
    assert stop_lines(values)


def test_ctrl_c_to_a_ddp_launch_stops_both_workers_with_a_checkpoint(tiny, tokenized, tmp_path):
    """Ctrl-C to the 2-process DDP launch's process group: it reaches the launcher only (the workers sit in
    sessions of their own), which sends SIGINT on; both workers stop at the same step with one checkpoint
    and the run.log line, and nothing prints a traceback."""
    config, values = make_config(tmp_path, tiny, tokenized, "ddp", **LONG)
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen([*ddp_launch(2), "run.py", "--config", config], cwd=REPO_DIR,
                                    env=launch_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    read = lambda: ("", log.read_text())  # noqa: E731
    pids = []
    try:
        wait_for(stepped(read), launcher, timeout=180)
        pids = workers(launcher.pid)
        assert len(pids) == 2, pids
        ctrl_c(launcher)
        launcher.wait(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text, text
    (step, path), = stop_lines(values)
    assert path == os.path.join(run_dir(values), f"step_{step}")
    assert checkpoint.problem_with(path) is None
    assert not os.path.exists(os.path.join(run_dir(values), checkpoint.LOCK))


def test_ctrl_c_before_the_first_step_is_one_line(monkeypatch):
    """Ctrl-C while the data or the model loads (before the stop path is in place): one line, 130."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def cli(main, argv):
        try:
            return call_main(main, argv)
        except KeyboardInterrupt:  # what a traceback and status -SIGINT would be at a terminal
            pytest.fail(f"{main.__module__}: KeyboardInterrupt escaped main()")

    monkeypatch.setattr(run, "train", interrupted)
    proc = cli(run.main, ["--config", "unused.json"])
    assert proc.returncode == 130
    assert_one_line(proc.stderr, "interrupted before the first step")
    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    proc = cli(evaluate.main, ["checkpoint", "data"])
    assert proc.returncode == 130
    assert_one_line(proc.stderr, "interrupted: ")


def write_raw(folder, files=3, rows=2000, seed=0):
    """Raw F2LLM files (query, passage, negative_1..3) of distinct random word texts."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)] + ["alpha", "beta", "gamma", "delta"]
    os.makedirs(folder)
    for f in range(files):
        cols = {c: [" ".join(rng.choices(words, k=rng.randint(4, 14))) for _ in range(rows)]
                for c in ("query", "passage", "negative_1", "negative_2", "negative_3")}
        pq.write_table(pa.table(cols), os.path.join(folder, f"set{f}.parquet"))


def folder_bytes(folder):
    """{file name: bytes} of the files in folder (not in its subfolders)."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_ctrl_c_tokenizing_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    """Ctrl-C to the tokenizer and its 2 worker processes mid-run: exit 130, one line, no traceback
    (from the workers either); the outputs there are whole; the same command then writes the bytes of
    an uninterrupted run."""
    raw = str(tmp_path / "raw")
    write_raw(raw)
    args = ["--model_path", f"{tiny}/backbone", "--input_dir", raw, "--max_seq_length", "64"]
    reference = str(tmp_path / "reference")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    done = call_main(tokenize_data_qwen.main, [*args, "--output_dir", reference, "--num_proc", "1"])
    assert done.returncode == 0, done.stderr
    out_dir = str(tmp_path / "out")
    cmd = [*args, "--output_dir", out_dir, "--num_proc", "2", "--pool_min_chars", "0"]
    proc, read = start(tmp_path, "tokenize", "tokenize_data_qwen.py", *cmd)
    wait_for(lambda: "starting 2 tokenizer worker processes" in read()[0], proc)
    time.sleep(1)  # the workers are starting (importing) or tokenizing
    ctrl_c(proc)
    assert finish(proc) == 130, read()
    assert_one_line(read()[1], "interrupted: ")
    written = folder_bytes(out_dir)
    assert len(written) < 3, "the run had finished before the Ctrl-C: make the input bigger"
    expected = folder_bytes(reference)
    for name, data in written.items():
        assert data == expected[name], name  # whole, under its final name; no temp file left
    proc, read = start(tmp_path, "again", "tokenize_data_qwen.py", *cmd)
    assert finish(proc, 120) == 0, read()
    assert folder_bytes(out_dir) == expected


def test_ctrl_c_mining_keeps_finished_chunks_and_resumes_to_the_same_bytes(tiny, tmp_path):
    """Ctrl-C to the miner while it embeds: exit 130, one line, no traceback; no output file and no
    temp file, only whole work chunks; the same command then writes an uninterrupted run's bytes."""
    raw = str(tmp_path / "raw")
    rng = random.Random(1)
    words = [f"w{i}" for i in range(200)]
    os.makedirs(raw)
    pq.write_table(pa.table({c: [" ".join(rng.choices(words, k=8)) for _ in range(1500)]
                             for c in ("query", "passage")}), os.path.join(raw, "pairs.parquet"))
    args = ["--model", f"{tiny}/backbone", "--input_dir", raw, "--num_negatives", "3", "--batch_size", "64",
            "--chunk_size", "64", "--device", "cpu", "--max_seq_length", "32"]
    out_dir = str(tmp_path / "out")
    work = os.path.join(out_dir, mine_negatives.WORK_DIR, "pairs")
    proc, read = start(tmp_path, "mine", "mine_negatives.py", *args, "--output_dir", out_dir)
    wait_for(lambda: os.path.isdir(work) and any(f.endswith(".npy") for f in os.listdir(work)), proc)
    ctrl_c(proc)
    assert finish(proc) == 130, read()
    assert_one_line(read()[1], "interrupted: ")
    assert not os.path.exists(os.path.join(out_dir, "pairs.parquet"))
    chunks = sorted(os.listdir(work))
    assert all(re.fullmatch(r"(corpus|query|rank)_\d{5}\.npy|manifest\.json", f) for f in chunks), chunks
    for f in chunks:
        if f.endswith(".npy"):
            np.load(os.path.join(work, f))  # whole
    proc, read = start(tmp_path, "again", "mine_negatives.py", *args, "--output_dir", out_dir)
    assert finish(proc, 120) == 0, read()
    reference = str(tmp_path / "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (ONE_THREAD): the same bytes
    try:
        done = call_main(mine_negatives.main, [*args, "--output_dir", reference])
    finally:
        torch.set_num_threads(threads)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out_dir) == folder_bytes(reference)


@pytest.fixture(autouse=True)
def timing(request):
    started = time.time()
    yield
    print(f"{request.node.name}: {time.time() - started:.1f} s")
