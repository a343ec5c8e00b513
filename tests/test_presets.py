"""configs/f2llm_v1.json and configs/f2llm_v2.json: the published runs, every switch at the published
behaviour, a diff away from this project's defaults; a 2-process run of each, its learning rate at
every step checked against the published schedule computed here."""
import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from config import load_config
from conftest import REPO_DIR, curves, ddp_launch, make_config, run_cli, run_dir

# The switches whose published value differs from this project's default, with that value.
PUBLISHED_SWITCHES = {
    "batch_layout": "padded", "attention_mask_from": "pad_token_id", "dtype": "bfloat16", "inbatch_gradient": "none",
    "negative_sampling": "per_batch", "validation_negatives": "random", "dataset_draw": "published", "eval_queries": 0,
}
V2_KEYS = {"num_hard_neg_clustering": 9, "use_mrl": True, "dataset_types_file": "configs/dataset_types_v2.json",
           "merge_checkpoints": True}


def preset(version):
    return load_config(os.path.join(REPO_DIR, "configs", f"f2llm_{version}.json"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_presets_are_the_published_config_plus_the_published_switches(version):
    ours = load_config(os.path.join(REPO_DIR, "configs", "config.json"))  # the published values, our defaults
    cfg = preset(version)
    expected = {**PUBLISHED_SWITCHES, "lr_schedule_steps": f"published_{version}",
                **(V2_KEYS if version == "v2" else {})}
    differing = {key: getattr(cfg, key) for key in vars(cfg) if getattr(cfg, key) != getattr(ours, key)}
    assert differing == expected
    assert cfg.teacher_model_path is None and cfg.scheduler_type == "cosine" and cfg.max_seq_length == 1024


def unsharded_steps(data, batch_size, epochs):
    """One process's step count of the unsharded data, as the published run.py counts it."""
    total = 0
    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        n = pq.read_metadata(path).num_rows
        total += -(-(n - -(-n // 100)) // batch_size)  # validation takes ceil(1%)
    return total * epochs


def published_lrs(version, steps, processes, lr, min_lr, warmup, unsharded):
    """The published schedule, built as the published run.py does and stepped as accelerate's
    AcceleratedScheduler does (num_processes times per optimizer step), clamped at min_lr."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_training_steps=unsharded,
                              num_warmup_steps=warmup * (processes if version == "v2" else 1))
    out = []
    for _ in range(steps):
        for _ in range(processes):
            scheduler.step()
        if optimizer.param_groups[0]["lr"] < min_lr:
            optimizer.param_groups[0]["lr"] = min_lr
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_preset_trains_with_two_processes_on_the_published_schedule(version, tiny, tokenized, tmp_path):
    with open(os.path.join(REPO_DIR, "configs", f"f2llm_{version}.json")) as f:
        values = json.load(f)
    small = dict(train_batch_size=8, max_seq_length=32, learning_rate=2e-3, min_lr=1e-5, warmup_steps=6,
                 train_epochs=1, log_interval=1, checkpointing_steps=20, validation_steps=0,
                 gradient_checkpointing=False, num_hard_neg=3, num_hard_neg_clustering=3 if version == "v2" else -1)
    paths = ("model_path", "train_data_path", "output_dir", "tb_dir", "cache_dir", "experiment_id")
    switches = {key: value for key, value in values.items() if key not in paths}
    config, values = make_config(tmp_path, tiny, tokenized, version, **{**switches, **small})
    proc = run_cli("run.py", "--config", config, env={"OMP_NUM_THREADS": "1"}, prefix=ddp_launch(2, 29551))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = curves(values)
    steps = sorted(logged["lr"])
    expected = published_lrs(version, len(steps), 2, 2e-3, 1e-5, 6, unsharded_steps(tokenized, 8, 1))
    assert [logged["lr"][s] for s in steps] == pytest.approx(expected, rel=1e-6)
    warmup_end = expected.index(max(expected)) + 1
    assert warmup_end == (3 if version == "v1" else 6)  # v1: warmup_steps / processes optimizer steps
    assert "train/msmarco/inbatch" in logged and (("train/msmarco/mrl_hard" in logged) == (version == "v2"))
    saved = sorted(os.listdir(run_dir(values)))
    assert ("step_5" in saved) == (version == "v2")  # v2's first checkpoint for merging
