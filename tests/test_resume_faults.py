"""Resume never discards or misreads work (issue 24): a checkpoint resumed under the other kind of
launch, settings changed between a checkpoint and its resume, damaged checkpoints, changed data, a
full disk at the first checkpoint, and a run folder whose checkpoints cannot be loaded. Each through
the real CLI; the reference runs (conftest.reference) are the uninterrupted runs compared with."""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import run
from conftest import (BIN, REFERENCE_K, assert_same_weights, assert_user_error, call_main, curves,
                      free_port, launch, launch_env, make_config, run_cli, run_dir, weights)
from files import file_digest
from test_faults import tmpfs

K = REFERENCE_K


def zero2(config, processes):
    """The published ZeRO-2 launch in float32, so that its numbers compare with the DDP reference's."""
    return run_cli("run.py", "--config", config, env=launch_env(),
                   prefix=[os.path.join(BIN, "accelerate"), "launch", "--config_file", "configs/accelerate_config.yaml",
                           "--num_processes", str(processes), "--main_process_port", free_port(),
                           "--mixed_precision", "no"])


def with_checkpoints(tmp_path, tiny, data, name, source_run, steps, **overrides):
    """A config whose run folder holds copies of the checkpoints `steps` of source_run's folder."""
    config, values = make_config(tmp_path, tiny, data, name, **overrides)
    os.makedirs(run_dir(values))
    for step in steps:
        shutil.copytree(os.path.join(source_run, f"step_{step}"), os.path.join(run_dir(values), f"step_{step}"))
    return config, values


def written(folder):
    """What a run left in its folder (the lock of a run in this process goes at the process's exit)."""
    return sorted(name for name in os.listdir(folder) if name != checkpoint.LOCK)


def assert_close_curves(reference, other, after):
    """As conftest.assert_same_curves, to float32 rounding: ZeRO-2 and DDP sum in other orders."""
    for tag, points in reference.items():
        tail = {s: v for s, v in points.items() if s > after}
        assert set(other.get(tag, {})) == set(tail), tag
        for s in tail:
            assert other[tag][s] == pytest.approx(tail[s], rel=1e-4, abs=1e-6), (tag, s)


def assert_close_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


def test_a_checkpoint_resumes_under_the_other_kind_of_launch(tmp_path, tiny, tokenized, reference, deepspeed_op):
    """The DDP reference's step_5 resumed under ZeRO-2, and that run's step_10 (written by DeepSpeed)
    resumed under DDP: both end with the uninterrupted run's losses and weights (float32; ZeRO-2 and
    DDP agree to 1e-5 uninterrupted too). Before: the DeepSpeed load failed, both checkpoints were
    skipped as unreadable and the run started afresh over them."""
    ref = reference[2]
    final = os.path.join(run_dir(ref), "epoch_2")
    config, values = with_checkpoints(tmp_path, tiny, tokenized, "to_zero2", run_dir(ref), [K],
                                      resume_from="latest", checkpointing_steps=K, save_total_limit=0)
    proc = zero2(config, 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"step_{K} was written by a DDP launch of 2 processes: its weights and optimizer state converted for "
            "this DeepSpeed launch of 2 process(es)") in proc.stdout
    assert f"(step {K})" in proc.stdout
    assert_close_curves(curves(ref), curves(values), after=K)
    assert_close_weights(final, os.path.join(run_dir(values), "epoch_2"))

    config, back = with_checkpoints(tmp_path, tiny, tokenized, "to_ddp", run_dir(values), [2 * K], resume_from="latest")
    proc = launch(config, 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "was written by a DeepSpeed launch of 2 process(es): its weights and optimizer state converted for this " \
           "DDP launch of 2 processes" in proc.stdout
    assert_close_curves(curves(ref), curves(back), after=2 * K)
    assert_close_weights(final, os.path.join(run_dir(back), "epoch_2"))


def test_a_changed_learning_rate_takes_effect_from_the_resumed_step(tmp_path, tiny, tokenized, reference):
    """Before: announced in a warning and ignored (the restored schedule kept the old peak). Now the
    logged lr after the resume is the new peak times the same schedule, and the warning says from
    which step. A key whose change cannot take effect (seed: the data split and order) is refused."""
    ref = reference[1]
    source = os.path.join(run_dir(ref), f"step_{K}")
    config, values = make_config(tmp_path, tiny, tokenized, "lr", resume_from=source,
                                 learning_rate=2 * ref["learning_rate"], weight_decay=0.5)
    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"resuming at step {K} with changed settings, in effect from step {K + 1}: learning_rate "
            f"({ref['learning_rate']!r} -> {2 * ref['learning_rate']!r}), weight_decay (0.01 -> 0.5)") in proc.stderr
    then, now = curves(ref)["lr"], curves(values)["lr"]
    assert sorted(now) == [s for s in sorted(then) if s > K]
    above = [s for s in now if then[s] > 2 * ref["min_lr"]]
    assert len(above) > 10
    for step in above:
        assert now[step] == pytest.approx(2 * then[step], rel=1e-6), step
    changed, unchanged = (weights(os.path.join(run_dir(v), "epoch_2")) for v in (values, ref))
    assert any(not torch.equal(value, changed[key]) for key, value in unchanged.items())

    config, _ = make_config(tmp_path, tiny, tokenized, "seed", resume_from=source, seed=1)
    assert_user_error(call_main(run.main, ["--config", config]), f"seed (0 -> 1) changed since checkpoint {source}",
                      "set it back", "resume_from none")


def flip_bytes(path, count=64):
    """Damage a file without changing its size: `count` bytes in its middle inverted."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(count)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(255 - b for b in block))


def test_a_damaged_checkpoint_is_skipped_for_the_previous_intact_one(tmp_path, tiny, tokenized, reference):
    """64 flipped bytes in the newest checkpoint's weights: before, it loaded without complaint. Now
    its hash tells, it is skipped with one line, and the run resumes from the one before and ends
    as the uninterrupted run did. With every checkpoint damaged the run is refused."""
    ref = reference[1]
    config, values = with_checkpoints(tmp_path, tiny, tokenized, "damaged", run_dir(ref), [K, 2 * K],
                                      resume_from="latest")
    flip_bytes(os.path.join(run_dir(values), f"step_{2 * K}", "training_state", "model.safetensors"))
    assert checkpoint.problem_with(os.path.join(run_dir(values), f"step_{2 * K}")) is None  # sizes cannot tell
    proc = launch(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipping")]
    assert skipped == [f"warning: skipping checkpoint {run_dir(values)}/step_{2 * K}: training_state/model.safetensors "
                       "is damaged (its bytes differ from those written: blake2b mismatch)"], proc.stderr
    assert f"resuming from {run_dir(values)}/step_{K} (step {K})" in proc.stdout
    assert_same_weights(os.path.join(run_dir(ref), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))

    config, values = with_checkpoints(tmp_path, tiny, tokenized, "all_damaged", run_dir(ref), [K],
                                      resume_from="latest")
    flip_bytes(os.path.join(run_dir(values), f"step_{K}", "training_state", "optimizer.bin"))
    assert_user_error(call_main(run.main, ["--config", config]), f"no checkpoint in {run_dir(values)} is intact",
                      f"step_{K}: training_state/optimizer.bin is damaged", "resume_from none")
    assert written(run_dir(values)) == [f"step_{K}"]  # nothing written over it


def test_an_intact_checkpoint_that_fails_to_load_stops_the_run(tmp_path, tiny, tokenized, reference):
    """A checkpoint whose files match their manifest but do not load (a writer's bug, another
    torch): before, `latest` skipped it as unreadable and started afresh over it, exit 0. Now one
    line naming it, and nothing written."""
    config, values = with_checkpoints(tmp_path, tiny, tokenized, "unloadable", run_dir(reference[1]), [K],
                                      resume_from="latest")
    path = os.path.join(run_dir(values), f"step_{K}")
    optimizer = os.path.join(path, "training_state", "optimizer.bin")
    with open(optimizer, "wb") as f:
        f.write(b"not a pickle")
    manifest = os.path.join(path, "training_state", "manifest.json")
    with open(manifest) as f:
        entries = json.load(f)
    entries["files"]["training_state/optimizer.bin"] = {"size": os.path.getsize(optimizer),
                                                        "blake2b": file_digest(optimizer)}
    with open(manifest, "w") as f:
        json.dump(entries, f)
    proc = call_main(run.main, ["--config", config])
    assert_user_error(proc, f"cannot resume from checkpoint {path}: unreadable", "no damage")
    assert written(run_dir(values)) == [f"step_{K}"]


def test_a_fresh_start_over_checkpoints_needs_resume_from_none(tmp_path, tiny, tokenized, reference):
    """Before: an empty resume_from trained from step 0 and wrote its checkpoints over the old ones."""
    config, values = with_checkpoints(tmp_path, tiny, tokenized, "again", run_dir(reference[1]), [K], train_steps=2)
    assert_user_error(call_main(run.main, ["--config", config]), f"{run_dir(values)} already holds checkpoints "
                      f"(step_{K})", '"resume_from": "latest"', '"none"', "experiment_id")
    assert not os.path.exists(os.path.join(run_dir(values), "args.json"))
    config, _ = make_config(tmp_path, tiny, tokenized, "again", train_steps=2, resume_from="none")
    proc = call_main(run.main, ["--config", config])
    assert proc.returncode == 0, proc.stderr
    assert "final checkpoint" in proc.stdout and "resuming" not in proc.stdout


def test_changed_data_with_the_same_batch_counts_is_refused(tmp_path, tiny, tokenized, reference):
    """One query's token ids changed, the row count kept: before, only train_data_path's change was
    warned about. Now the data's fingerprint in the checkpoint tells, and the resume is refused."""
    data = tmp_path / "data"
    shutil.copytree(tokenized, data)
    path = data / "msmarco.parquet"
    table = pq.read_table(path)
    ids = table.column("query_input_ids").to_pylist()
    ids[0] = [5 + (i + 1) % 300 for i in ids[0]]
    column = table.schema.get_field_index("query_input_ids")
    pq.write_table(table.set_column(column, table.schema.field(column), pa.array(ids, table.schema.field(column).type)),
                   path)
    source = os.path.join(run_dir(reference[1]), f"step_{K}")
    config, _ = make_config(tmp_path, tiny, str(data), "data", resume_from=source)
    assert_user_error(call_main(run.main, ["--config", config]), f"the training data changed since checkpoint {source}",
                      "msmarco", "start afresh")


def test_a_full_disk_at_the_first_checkpoint_is_one_line(tiny, tokenized, tmp_path):
    """100 KB, less than the tiny model's weights: the first checkpoint fails while safetensors
    writes them (before: a SafetensorError traceback and a `.step_N.partial` left behind; the
    300 KB case of test_faults fails later, in torch.save)."""
    with tmpfs(tmp_path / "fs", "100k") as folder:
        config, _ = make_config(tmp_path, tiny, tokenized, "full", output_dir=folder, train_steps=4,
                                checkpointing_steps=2, tb_dir=str(tmp_path / "tb"))
        proc = call_main(run.main, ["--config", config])
        assert_user_error(proc, f"no space left writing checkpoint {folder}/run/step_2", "intact")
        assert written(os.path.join(folder, "run")) == ["args.json"]
