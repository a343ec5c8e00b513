"""Long runs: full-state checkpoints, exact resume (1 and 2 processes), a kill in the middle of a
checkpoint write, corrupt checkpoints, SIGTERM, non-finite losses, uneven data, determinism.

The reference is an uninterrupted run; a resumed run must log the same per-step losses after the
resume point and reach the same final weights."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from accelerate.utils import DistributedType

import checkpoint
import run
from conftest import (ONE_THREAD, REFERENCE_K, REPO_DIR, assert_same_curves, assert_same_weights, assert_user_error,
                      call_main, curves, launch, make_config, run_dir, weights, write_config)
from errors import UserError
from metrics import LossTracker

K = REFERENCE_K  # the reference's checkpointing_steps: step_5 lies inside the first epoch


def test_checkpoints_hold_weights_and_training_state(reference):
    values = reference[1]
    saved = sorted(os.listdir(run_dir(values)))
    steps = [f"step_{s}" for s in range(K, values["steps"] + 1, K)]
    assert saved == sorted(["args.json", "epoch_1", "epoch_2", "run.log"] + steps)
    for name in ["epoch_1", "epoch_2"] + steps:
        folder = os.path.join(run_dir(values), name)
        assert os.path.isfile(os.path.join(folder, "model.safetensors"))  # inference weights, as before
        assert checkpoint.problem_with(folder) is None
    state = checkpoint.read_trainer_state(os.path.join(run_dir(values), f"step_{K}"))
    assert state["step"] == K and state["world_size"] == 1 and state["config"]["seed"] == 0


def test_same_seed_same_curve_run_to_run(tmp_path, tiny, tokenized, reference):
    """Determinism, and checkpoints do not perturb training: a run without checkpoints logs the
    same losses and reaches the same weights as the reference."""
    config, values = make_config(tmp_path, tiny, tokenized, "again")
    assert launch(config).returncode == 0
    assert_same_curves(curves(reference[1]), curves(values))
    assert_same_weights(os.path.join(run_dir(reference[1]), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))


@pytest.mark.parametrize("processes,start", [(1, f"step_{K}"), pytest.param(1, "epoch_1", marks=pytest.mark.breadth),
                                             (2, f"step_{K}")])
def test_resume_is_exact(tmp_path, tiny, tokenized, reference, processes, start):
    """A new run resumed from the reference's mid-epoch or epoch-end checkpoint: the same losses
    after the resume point, the same final weights."""
    ref = reference[processes]
    source = os.path.join(run_dir(ref), start)
    config, resumed = make_config(tmp_path, tiny, tokenized, "resumed", resume_from=source)
    proc = launch(config, processes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    at = checkpoint.read_trainer_state(source)["step"]
    assert 0 < at < ref["steps"]
    assert f"resuming from {source} (step {at})" in proc.stdout
    assert_same_curves(curves(ref), curves(resumed), after=at)
    assert_same_weights(os.path.join(run_dir(ref), "epoch_2"), os.path.join(run_dir(resumed), "epoch_2"))


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import run

real_save, calls = torch.save, []


def save_then_die(obj, f, *args, **kwargs):
    # The second checkpoint's optimizer file: write half of it, then die as a node failure would.
    if str(f).endswith("optimizer.bin"):
        calls.append(f)
        if len(calls) == 2:
            real_save(obj, f, *args, **kwargs)
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_then_die
run.main(sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, tiny, tokenized, reference):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=REPO_DIR))
    config, values = make_config(tmp_path, tiny, tokenized, "killed", checkpointing_steps=6,
                                 resume_from="latest")
    proc = launch(config, script=str(killer))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    left = sorted(os.listdir(run_dir(values)))
    # killed while writing step_12, and before it could release its lock
    assert left == [".lock", ".step_12.partial", "args.json", "step_6"], left

    # The same command again: resumes from step_6, the last complete checkpoint.
    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {run_dir(values)}/step_6 (step 6)" in proc.stdout
    assert_same_weights(os.path.join(run_dir(reference[1]), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))
    assert "removed" in proc.stdout and "its process is gone" in proc.stdout  # the killed run's leftovers
    assert not glob.glob(os.path.join(run_dir(values), ".*")), "partial folder and lock gone"


def corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    state = os.path.join(dst, "training_state")
    if how == "truncated":
        path = os.path.join(state, "optimizer.bin")
        os.truncate(path, os.path.getsize(path) - 100)
    elif how == "garbage":  # same size: only the manifest's hash tells
        path = os.path.join(state, "rng_0.pt")
        size = os.path.getsize(path)
        open(path, "wb").write(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    elif how == "no manifest":
        os.remove(os.path.join(state, "manifest.json"))


def test_resume_latest_skips_incomplete_and_corrupt_checkpoints(tmp_path, tiny, tokenized, reference):
    good = os.path.join(run_dir(reference[1]), f"step_{K}")
    config, values = make_config(tmp_path, tiny, tokenized, "resumed", resume_from="latest")
    os.makedirs(run_dir(values))
    shutil.copytree(good, os.path.join(run_dir(values), f"step_{K}"))
    for step, how in ((2 * K, "truncated"), (3 * K, "garbage"), (4 * K, "no manifest")):
        corrupt_copy(good, os.path.join(run_dir(values), f"step_{step}"), how)
    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 3, proc.stderr
    assert f"step_{4 * K}: no training_state/manifest.json" in warnings[0]
    assert f"step_{3 * K}: training_state/rng_0.pt is damaged" in warnings[1]
    assert f"step_{2 * K}: training_state/optimizer.bin has" in warnings[2]
    assert f"resuming from {run_dir(values)}/step_{K} (step {K})" in proc.stdout
    assert_same_weights(os.path.join(run_dir(reference[1]), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))


class FakeAccelerator:
    """What checkpoint.restore needs of an Accelerator, for error paths that fail before loading."""

    def __init__(self, num_processes=1):
        self.num_processes, self.process_index, self.is_main_process = num_processes, 0, True
        self.device = torch.device("cpu")
        self.distributed_type = DistributedType.NO
        self.loaded = []

    def reduce(self, tensor, reduction):
        return tensor

    def load_state(self, path):
        self.loaded.append(path)

    def print(self, *args):
        print(*args)


def fresh_state(path, num_processes=1):
    """A run's TrainState at step 0 with the data of the checkpoint at `path` and `num_processes`."""
    saved = checkpoint.TrainState.from_json(checkpoint.read_trainer_state(path))
    return checkpoint.TrainState(world_size=num_processes, batches_per_epoch=saved.batches_per_epoch,
                                 config=saved.config)


def test_restore_errors_are_clear(tmp_path, reference):
    good = os.path.join(run_dir(reference[1]), f"step_{K}")
    corrupt_copy(good, str(tmp_path / "bad"), "truncated")
    for resume_from, fragment in ((str(tmp_path / "bad"), "optimizer.bin has"),
                                  (str(tmp_path / "nowhere"), "not a folder")):
        with pytest.raises(UserError, match=fragment):
            checkpoint.restore(FakeAccelerator(), resume_from, str(tmp_path), fresh_state(good), None)
    with pytest.raises(UserError, match=r"written by a one-process launch, this launch has 2 process\(es\).*launch "
                                        r"with 1 process"):
        checkpoint.restore(FakeAccelerator(num_processes=2), good, str(tmp_path), fresh_state(good, 2), None)
    with pytest.raises(UserError, match=r"written by a one-process launch"):  # latest does not skip a mismatch
        checkpoint.restore(FakeAccelerator(num_processes=2), "latest", run_dir(reference[1]), fresh_state(good, 2),
                           None)
    other_data = fresh_state(good)
    other_data.batches_per_epoch = {**other_data.batches_per_epoch, "msmarco": 99}
    with pytest.raises(UserError, match="the training data or train_batch_size changed"):
        checkpoint.restore(FakeAccelerator(), good, str(tmp_path), other_data, None)
    # The training_state folder itself names its checkpoint too.
    accelerator = FakeAccelerator()
    state = checkpoint.restore(accelerator, os.path.join(good, "training_state"), "", fresh_state(good), None)
    assert (state.step, state.saved_step, state.saved_path) == (K, K, good) and state.just_saved()
    assert accelerator.loaded == [os.path.join(good, "training_state")]
    fresh = fresh_state(good)
    assert checkpoint.restore(accelerator, "", str(tmp_path), fresh, None) is fresh


def test_resume_errors_and_edge_cases_end_to_end(tmp_path, tiny, tokenized, reference):
    good = os.path.join(run_dir(reference[1]), f"step_{K}")
    config, _ = make_config(tmp_path, tiny, tokenized, "batch", resume_from=good, train_batch_size=16)
    assert_user_error(launch(config), "train_batch_size (32 -> 16) changed since checkpoint", "set it back")
    # latest with no checkpoint: a fresh start; the same command after the run: nothing to do.
    config, values = make_config(tmp_path, tiny, tokenized, "fresh", resume_from="latest", train_steps=2)
    proc = launch(config)
    assert proc.returncode == 0 and "no checkpoint in" in proc.stdout, proc.stdout + proc.stderr
    proc = launch(config)
    assert proc.returncode == 0 and "already finished (2 of 2 steps)" in proc.stdout, proc.stdout + proc.stderr


def test_save_total_limit_keeps_the_newest_training_states(tmp_path, tiny, tokenized):
    config, values = make_config(tmp_path, tiny, tokenized, "limit", checkpointing_steps=3, train_steps=12,
                                 save_total_limit=2)
    assert launch(config).returncode == 0
    folders = sorted(d for d in os.listdir(run_dir(values)) if d.startswith("step_"))
    assert folders == ["step_12", "step_3", "step_6", "step_9"]
    with_state = sorted(d for d in folders if os.path.isdir(os.path.join(run_dir(values), d, "training_state")))
    assert with_state == ["step_12", "step_9"]
    for d in folders:  # every checkpoint keeps its inference weights
        assert os.path.isfile(os.path.join(run_dir(values), d, "model.safetensors"))


def test_sigterm_finishes_the_step_checkpoints_and_exits(tmp_path, tiny, tokenized, reference):
    """SIGTERM: a checkpoint at the step it arrived, exit 0; the same command with resume_from latest
    then ends where the reference ends. (2 processes, SIGTERM to one of them: test_launch's ZeRO-2 job.)"""
    config, values = make_config(tmp_path, tiny, tokenized, "term", resume_from="latest")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "run.py", "--config", config], cwd=REPO_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = os.path.join(values["tb_dir"], "run")
        deadline = time.time() + 120
        while not glob.glob(os.path.join(events, "events*")) and time.time() < deadline:
            time.sleep(0.05)  # the writer opens just before the first step
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    line = [s for s in out.splitlines() if s.startswith("stopped by")]
    assert len(line) == 1, out
    step = int(line[0].split(" at step ")[1].split(":")[0])
    assert 0 < step < reference[1]["steps"], "stopped mid-run"
    assert os.path.isdir(os.path.join(run_dir(values), f"step_{step}", "training_state"))
    assert not os.path.exists(os.path.join(run_dir(values), "epoch_2"))

    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"(step {step})" in proc.stdout
    assert_same_weights(os.path.join(run_dir(reference[1]), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))


def poison_embeddings(monkeypatch, token=None):
    """Make the embeddings of every batch (or of those holding `token`) NaN, as an overflow in the
    forward pass would: a non-finite loss from intact, finite weights."""
    real = run.embed

    def embed(model, batch):
        out = real(model, batch)
        return out * float("nan") if token is None or (batch["input_ids"] == token).any() else out

    monkeypatch.setattr(run, "embed", embed)


def rare_token(tokenized):
    """A token id that occurs in the queries of a few rows of one dataset only."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(tokenized, "*.parquet"))):
        for i, ids in enumerate(pq.read_table(path, columns=["query_input_ids"]).column(0).to_pylist()):
            for t in set(ids[:-1]):
                rows.setdefault(t, set()).add((path, i))
    return min((t for t, r in rows.items() if len(r) >= 3 and len({p for p, _ in r}) == 1),
               key=lambda t: len(rows[t]))


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny, tokenized, monkeypatch):
    poison_embeddings(monkeypatch, rare_token(tokenized))
    config, values = make_config(tmp_path, tiny, tokenized, "nan", train_steps=16)
    proc = call_main(run.main, ["--config", config])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "non-finite loss or gradient" in line]
    assert 1 <= len(skipped) < 16, proc.stderr
    logged = curves(values)
    assert logged["train/skipped_steps"][16] == len(skipped)
    losses = [v for tag, points in logged.items() if tag.endswith(("/hard", "/inbatch")) for v in points.values()]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses), "no NaN reaches the logged means"
    final = weights(os.path.join(run_dir(values), "step_16"))
    assert all(torch.isfinite(t).all() for t in final.values()), "no update from a NaN step"


def test_max_bad_steps_stops_with_a_checkpoint(tmp_path, tiny, tokenized, monkeypatch):
    poison_embeddings(monkeypatch)
    config, values = make_config(tmp_path, tiny, tokenized, "allnan", max_bad_steps=3)
    proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, "3 steps in a row", "max_bad_steps", "step_3")
    assert os.path.isdir(os.path.join(run_dir(values), "step_3", "training_state"))


def test_uneven_data_does_not_hang(tmp_path, tiny, tokenized):
    """2 processes x batch 16: one dataset smaller than a batch per process, one with a last partial batch."""
    data = tmp_path / "uneven"
    data.mkdir()
    for name, rows in (("msmarco", 5), ("imdb", 40)):
        table = pq.read_table(os.path.join(tokenized, f"{name}.parquet")).slice(0, rows)
        pq.write_table(table, data / f"{name}.parquet")
    config, values = make_config(tmp_path, tiny, str(data), "uneven", validation_steps=1, train_batch_size=16)
    proc = launch(config, 2, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # msmarco: 4 train rows -> 1 batch, on both processes; imdb: 39 -> 3 batches -> 2 per process.
    assert "2 datasets, 3 batches per epoch per process, 6 steps, 2 process(es)" in proc.stdout
    assert os.path.isfile(os.path.join(run_dir(values), "epoch_2", "model.safetensors"))


FIXTURE = os.path.join(REPO_DIR, "tests", "fixtures", "resume_v1")


def test_resumes_a_checkpoint_of_an_earlier_version(tmp_path):
    """tests/fixtures/resume_v1 holds step_5 of a 48-step run made by an earlier version of this code
    (MADE_BY names the commit; tests/fixtures/make_resume_fixture.py made it), with that run's final
    weights and logged losses. Resumed by today's code, it must log the same losses after step 5
    (step 6's include the logging sums pending at step 5) and reach the same final weights."""
    for name in ("backbone", "data", "step_5"):
        shutil.copytree(os.path.join(FIXTURE, name), tmp_path / name)
    with open(os.path.join(FIXTURE, "config.json")) as f:
        values = {**json.load(f), "model_path": str(tmp_path / "backbone"), "train_data_path": str(tmp_path / "data"),
                  "output_dir": str(tmp_path / "out"), "tb_dir": str(tmp_path / "tb"),
                  "cache_dir": str(tmp_path / "cache"), "resume_from": str(tmp_path / "step_5"),
                  "min_eval_queries": 0}  # the split of that version (min_eval_queries came later)
    proc = launch(write_config(tmp_path / "config.json", **values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {tmp_path / 'step_5'} (step 5)" in proc.stdout
    # Only the two paths changed beside the keys that change no training (output_dir, tb_dir, cache_dir,
    # resume_from); the data is the same (its fingerprint is not in this earlier version's checkpoint).
    changed = [line for line in proc.stderr.splitlines() if "resuming at step 5 with changed settings" in line]
    assert len(changed) == 1 and re.findall(r"(\w+) \(", changed[0]) == ["model_path", "train_data_path"], changed
    with open(os.path.join(FIXTURE, "final", "losses.json")) as f:
        then = {tag: {int(step): value for step, value in points.items()} for tag, points in json.load(f).items()}
    assert "train/imdb/hard" in then and 6 in then["train/imdb/hard"]
    assert_same_curves(then, curves(values), after=5)
    final = os.path.join(run_dir(values), "epoch_2")
    for key, value in weights(os.path.join(FIXTURE, "final")).items():
        torch.testing.assert_close(weights(final)[key], value, rtol=0, atol=1e-5, msg=key)


def test_trainer_state_json_keeps_its_schema():
    """What today's TrainState writes is what the earlier version wrote: the same keys and values,
    read back from the fixture's trainer_state.json, logging sums included."""
    path = os.path.join(FIXTURE, "step_5")
    written = checkpoint.read_trainer_state(path)
    tracker = LossTracker(written["batches_per_epoch"], {}, ("inbatch", "hard"))
    accelerator = FakeAccelerator()
    state = checkpoint.TrainState.from_json(written, tracker, accelerator)
    assert (state.step, state.epoch, state.world_size) == (5, 0, 1)
    again = state.to_json(accelerator)
    # added since: data (fingerprints) and tracker_runs (tracking.start)
    assert set(again) == set(written) | {"data", "tracker_runs"} and again["data"] is None
    assert again["tracker_runs"] == {}
    for key in written:
        if key != "tracker":
            assert again[key] == written[key], key
    assert again["tracker"].keys() == written["tracker"].keys()
    for key, (total, count) in written["tracker"].items():
        assert again["tracker"][key] == [pytest.approx(total, rel=1e-12), count], key
