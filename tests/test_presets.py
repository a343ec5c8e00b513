"""configs/f2llm_v1.json and configs/f2llm_v2.json: the published runs, every switch at the published
behaviour, a diff away from this project's defaults; a 2-process run of each, its learning rate at
every step checked against the published schedule computed here."""
import dataclasses
import glob
import json
import math
import os
import random
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from config import load_config
from conftest import REPO_DIR, ddp_launch, make_config, run_cli, run_dir

# The switches whose published value differs from this project's default, with that value.
PUBLISHED_SWITCHES = {
    "batch_layout": "padded", "attention_mask_from": "pad_token_id", "dtype": "bfloat16", "inbatch_gradient": "none",
    "negative_sampling": "per_batch", "validation_negatives": "random", "dataset_draw": "published", "eval_queries": 0,
    "min_eval_queries": 0,
    "log_keys": "published", "adamw_implementation": "torch_default", "negative_columns": 24,
    "loss_dtype": "embeddings",
}
V2_KEYS = {"num_hard_neg_clustering": 9, "use_mrl": True, "dataset_types_file": "configs/dataset_types_v2.json",
           "merge_checkpoints": True, "max_seq_length": 2048,
           "experiment_id": "4b+lr.8e-6+bs.16x32+context.2048+2epochs"}


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
    assert cfg.teacher_model_path is None and cfg.scheduler_type == "cosine"


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


def published_first_draw(data, batch_size, processes):
    """The published MultiLoader's first dataset of epoch 0: random.Random(0).choices over the datasets
    in file order, weighted by each one's batches per process (accelerate shards a DataLoader's
    batches; the validation split holds ceil(1%) of the rows)."""
    names, weights = [], []
    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        n = pq.read_metadata(path).num_rows
        names.append(os.path.basename(path)[: -len(".parquet")])
        weights.append(math.ceil(math.ceil((n - math.ceil(n / 100)) / batch_size) / processes))
    return random.Random(0).choices(names, weights=weights)[0]


def published_events(values):
    """{tag: {step: value}} of every scalar the run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(values["tb_dir"], values["experiment_id"]))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def first_batches(config, data, processes):
    """Each process's first training batch of the run (name, batch, the rows it came from), built by
    this project's loaders from `data`, the v1 layout of the run's data (the same batches; see
    test_published_v2)."""
    from types import SimpleNamespace

    import run
    from config import load_dataset_types
    from data import check_datasets
    from model import load_tokenizer

    cfg = dataclasses.replace(load_config(config), train_data_path=data)
    splits = dict(sorted(run.prepare(cfg, check_datasets(cfg, load_dataset_types(cfg))).items()))
    tokenizer = load_tokenizer(cfg.model_path)
    out = []
    for rank in range(processes):
        loader, _ = run.build_loaders(splits, cfg, tokenizer, None, SimpleNamespace(process_index=rank,
                                                                                      num_processes=processes))
        loader.set_epoch(0)
        name, batch = next(iter(loader))
        batches = loader.loaders[name]
        rows = batches.rows.__getitems__(batches.order[rank * cfg.train_batch_size: (rank + 1) * cfg.train_batch_size])
        out.append((name, batch, rows))
    return cfg, out


def negative_columns(batch, rows, max_seq_length):
    """For each row of the batch, the numbers j of its negative_j columns the batch holds, in order."""
    bs, k = batch["num_queries"], batch["num_neg"]
    sequences = torch.split(batch["input_ids"], batch["lengths"].tolist())[2 * bs:]
    out = []
    for i in range(bs):
        found = []
        for seq in sequences[i * k: (i + 1) * k]:  # collate cuts to max_seq_length, the last token made eos
            found += [int(c.split("_")[1]) for c in rows.column_names if c.startswith("negative_")
                      and rows.column(c)[i].as_py()[: len(seq) - 1] == seq.tolist()[:-1]
                      and len(rows.column(c)[i].as_py()[:max_seq_length]) == len(seq)]
        out.append(found)
    return out


def pooled(model, batch, pad_id):
    """The published F2LLM.forward: right-padded batch, attention mask input_ids != pad, the hidden
    state at each sequence's last position."""
    sequences = torch.split(batch["input_ids"], batch["lengths"].tolist())
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)
    hidden = model(input_ids=ids, attention_mask=ids.ne(pad_id).long()).last_hidden_state
    return hidden[torch.arange(len(ids)), batch["lengths"] - 1]


def published_step(cfg, batches, teacher_path, gradient_to_positives=False, ascending=False):
    """The published utils.py losses of the first step, computed here from its formulas: per process
    hard (with the Matryoshka terms, the full size first then descending, term n over n sqrt(d/dim)),
    in-batch on retrieval data against every process's positives from accelerator.gather (no gradient)
    and the distillation MSE on raw embeddings; and the norm of the gradient averaged over processes
    (what DDP and ZeRO-2 reduce). The switches break the published rules, to show that the check
    notices. Returns ({loss: mean over processes}, gradient norm)."""
    from transformers import AutoModel

    from model import load_tokenizer

    pad = load_tokenizer(cfg.model_path).pad_token_id
    student = AutoModel.from_pretrained(cfg.model_path, torch_dtype=torch.float32)
    teacher = AutoModel.from_pretrained(teacher_path, torch_dtype=torch.float32) if teacher_path else None
    embeddings = [pooled(student, batch, pad) for _, batch, _ in batches]
    d = embeddings[0].shape[-1]
    dims = [d] + ([2 ** i for i in range(3, 15) if 2 ** i < d] if cfg.use_mrl else [])
    dims = sorted(dims) if ascending else sorted(dims)[::-1]
    bs = batches[0][1]["num_queries"]
    gathered = torch.cat([e[bs: 2 * bs] for e in embeddings])
    losses, total = defaultdict(list), 0
    for rank, ((name, batch, _), emb) in enumerate(zip(batches, embeddings)):
        q, p, n = emb[:bs], emb[bs: 2 * bs], emb[2 * bs:].view(bs, batch["num_neg"], d)
        everyone = torch.cat([gathered[: rank * bs].detach(), p, gathered[(rank + 1) * bs:].detach()]) \
            if gradient_to_positives else gathered.detach()
        hard = in_batch = 0
        for term, dim in enumerate(dims, start=1):
            weight = 1 / (term * math.sqrt(d / dim))
            qn = F.normalize(q[:, :dim], dim=-1)
            candidates = F.normalize(torch.cat([p[:, None], n], dim=1)[..., :dim], dim=-1)
            hard = hard + weight * F.cross_entropy((qn[:, None] * candidates).sum(-1) / 0.05,
                                                   torch.zeros(bs, dtype=torch.long))
            in_batch = in_batch + weight * F.cross_entropy(qn @ F.normalize(everyone[:, :dim], dim=-1).T / 0.05,
                                                           torch.arange(bs) + bs * rank)
        step = {"hard": hard}
        if TYPES[name] == "retrieval":
            step["in_batch"] = in_batch
        if teacher is not None:
            with torch.no_grad():
                t = pooled(teacher, batch, pad)[:, :d]
            step["kd"] = cfg.kd_weight * (F.mse_loss(q, t[:bs]) + F.mse_loss(p, t[bs: 2 * bs])
                                          + F.mse_loss(emb[2 * bs:], t[2 * bs:]))
        for key, value in step.items():
            losses[key].append(value.item())
        total = total + sum(step.values()) / len(batches)
    total.backward()
    norm = torch.cat([param.grad.flatten() for param in student.parameters() if param.grad is not None]).norm()
    return {key: sum(values) / len(values) for key, values in losses.items()}, norm.item()


TYPES = {"banking77": "clustering", "imdb": "classification", "msmarco": "retrieval", "natural_questions": "retrieval"}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_preset_trains_with_two_processes_as_published(version, tiny, tokenized, tiny_base, tokenized_base,
                                                      published_v2_data, teacher, tmp_path):
    """The preset, shrunk to the tiny data, trained by the DDP launch with 2 processes (v1: with a Base
    tokenizer, pad == eos, so the published mask hides the pooled eos; v2: on files in the published
    v2 layout, with a teacher): the lr at every step, the first step's losses under the published
    TensorBoard names and its gradient norm all equal what the published formulas give."""
    if version == "v1":
        tiny, tokenized = tiny_base, tokenized_base
    with open(os.path.join(REPO_DIR, "configs", f"f2llm_{version}.json")) as f:
        values = json.load(f)
    small = dict(train_batch_size=8, max_seq_length=32, learning_rate=2e-3, min_lr=1e-5, warmup_steps=6,
                 train_epochs=1, log_interval=1, checkpointing_steps=20, validation_steps=0, dtype="float32",
                 gradient_checkpointing=False, num_hard_neg=3, num_hard_neg_clustering=3 if version == "v2" else -1,
                 **({"teacher_model_path": teacher, "kd_weight": 0.5} if version == "v2" else {}))
    paths = ("model_path", "train_data_path", "output_dir", "tb_dir", "cache_dir", "experiment_id")
    switches = {key: value for key, value in values.items() if key not in paths}
    config, values = make_config(tmp_path, tiny, published_v2_data if version == "v2" else tokenized, version,
                                 **{**switches, **small})
    proc = run_cli("run.py", "--config", config, env={"OMP_NUM_THREADS": "1"}, prefix=ddp_launch(2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = published_events(values)

    steps = sorted(logged["lr"])
    expected = published_lrs(version, len(steps), 2, 2e-3, 1e-5, 6, unsharded_steps(tokenized, 8, 1))
    assert [logged["lr"][s] for s in steps] == pytest.approx(expected, rel=1e-6)
    warmup_end = expected.index(max(expected)) + 1
    assert warmup_end == (3 if version == "v1" else 6)  # v1: warmup_steps / processes optimizer steps

    cfg, batches = first_batches(config, tokenized, 2)
    name = batches[0][0]
    assert name == batches[1][0] == published_first_draw(tokenized, 8, 2) == "msmarco"
    for _, batch, rows in batches:  # one draw of 3 of the 10 negative columns for the whole batch
        columns = negative_columns(batch, rows, cfg.max_seq_length)
        assert all(c == columns[0] for c in columns) and len(set(columns[0])) == 3, columns
    assert negative_columns(batches[0][1], batches[0][2], 32)[0] != negative_columns(batches[1][1], batches[1][2],
                                                                                     32)[0]
    losses, norm = published_step(cfg, batches, cfg.teacher_model_path)
    assert set(losses) == ({"hard", "in_batch", "kd"} if version == "v2" else {"hard", "in_batch"})
    for key, value in losses.items():
        assert logged[f"{name}/training_loss_{key}"][1] == pytest.approx(value, rel=2e-5), key
    assert logged["train/grad_norm"][1] == pytest.approx(norm, rel=1e-4)
    # The check can fail: the gradient through this process's positives, or Matryoshka's terms
    # ascending, give other numbers.
    assert published_step(cfg, batches, cfg.teacher_model_path, gradient_to_positives=True)[1] != pytest.approx(
        norm, rel=1e-3)
    if version == "v2":
        ascending = published_step(cfg, batches, cfg.teacher_model_path, ascending=True)[0]
        assert ascending["hard"] != pytest.approx(losses["hard"], rel=1e-3)
    assert "Avg/retrieval/training_loss_in_batch" in logged and "train/natural_questions/hard" not in logged
    saved = sorted(os.listdir(run_dir(values)))
    assert ("step_5" in saved) == (version == "v2")  # v2's first checkpoint for merging
