"""A user's first hour (issue 26): what a run prints at each validation and at its end, validation sets
large enough to rank on, a warning when mining with a model that cannot rank, errors that name the user's
own files, Encoder.encode as sentence-transformers returns it, and the README's own-data path."""
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import data
import mine_negatives
import run
from conftest import REPO_DIR, assert_user_error, call_main, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

SUMMARY = re.compile(r"^step (\d+) validation: retrieval loss \d+\.\d{3} nDCG@10 (\d\.\d{3}) MRR@10 (\d\.\d{3}) "
                     r"recall@10 (\d\.\d{3}) \((\d+) queries\); clustering loss \d+\.\d{3}; "
                     r"classification loss \d+\.\d{3}$", re.M)


@pytest.fixture(scope="module")
def trained(tiny, tokenized, tmp_path_factory):
    """4 steps on the tiny data (2 retrieval datasets of 60 rows, 1 clustering, 1 classification),
    validating and saving every 2 steps: (the CompletedProcess, the config values)."""
    root = tmp_path_factory.mktemp("first_hour")
    config, values = make_config(root, tiny, tokenized, "run", train_steps=4, train_epochs=1, validation_steps=2,
                                 checkpointing_steps=2, min_eval_queries=50)
    proc = call_main(run.main, ["--config", config])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, values


def test_each_validation_prints_a_summary_and_the_end_names_the_best_checkpoint(trained):
    proc, values = trained
    summaries = SUMMARY.findall(proc.stdout)
    assert [int(s[0]) for s in summaries] == [2, 4], proc.stdout
    # min_eval_queries 50 holds out half of each 60-row retrieval dataset: 2 x 30 queries
    assert all(int(s[4]) == 60 for s in summaries)
    mrr = {int(s[0]): float(s[2]) for s in summaries}
    best = max(mrr, key=lambda step: (mrr[step], -step))
    run_dir = os.path.join(values["output_dir"], "run")
    # two lines: scripts (the demo, the benches) read the path from the first
    last = proc.stdout.rstrip().splitlines()[-2:]
    assert last == [f"final checkpoint: {run_dir}/step_4", f"best checkpoint by validation MRR@10: {run_dir}/"
                    f"step_{best} (step {best}, MRR@10 {mrr[best]:.3f})"], proc.stdout
    with open(os.path.join(run_dir, "run.log")) as f:
        logged = f.read().rstrip().splitlines()[-2:]
    assert [line.split(" ", 2)[2] for line in logged] == last


def test_without_retrieval_metrics_at_checkpoints_the_end_says_nothing_more(tiny, tokenized, tmp_path):
    config, _ = make_config(tmp_path, tiny, tokenized, "run", train_steps=2, train_epochs=1, validation_steps=1,
                            checkpointing_steps=0, eval_queries=0)
    proc = call_main(run.main, ["--config", config])
    assert proc.returncode == 0, proc.stderr
    assert "step 1 validation: retrieval loss " in proc.stdout and "MRR@10" not in proc.stdout
    assert "best checkpoint" not in proc.stdout


def prepared(proc):
    """{name: (task, train rows, validation rows)} from --prepare_only's lines."""
    return {m[0]: (m[1], int(m[2]), int(m[3]))
            for m in re.findall(r"^(\S+)\s+(\S+)\s+train\s+(\d+)\s+validation\s+(\d+)$", proc.stdout, re.M)}


def test_small_retrieval_datasets_hold_out_min_eval_queries_and_warn(tiny, tokenized, trained, tmp_path):
    splits = {}
    for minimum in (50, 0, 10):
        config, _ = make_config(tmp_path, tiny, tokenized, f"m{minimum}", min_eval_queries=minimum)
        proc = call_main(run.main, ["--config", config, "--prepare_only"])
        assert proc.returncode == 0, proc.stderr
        splits[minimum] = prepared(proc)
    assert splits[50]["msmarco"] == ("retrieval", 30, 30)  # 50 asked, half of the 60 rows at most
    assert splits[10]["msmarco"] == ("retrieval", 50, 10)
    assert splits[0]["msmarco"] == ("retrieval", 59, 1)  # validation_fraction 0.01 alone, as published
    assert splits[50]["banking77"] == splits[0]["banking77"]  # only retrieval datasets are ranked
    proc, _ = trained
    for name in ("msmarco", "natural_questions"):
        assert f"warning: valid/{name}: MRR@10 on 30 queries, below min_eval_queries 50" in proc.stderr
    assert data.validation_size(10_000, 0.01, 50) == 100 and data.validation_size(1000, 0.01, 50) == 50
    assert data.validation_size(3, 0.01, 50) == 1 and data.validation_size(1000, 0.01, 0) == 10


def test_presets_keep_the_published_split():
    from config import load_config

    for version in ("v1", "v2"):
        assert load_config(os.path.join(REPO_DIR, "configs", f"f2llm_{version}.json")).min_eval_queries == 0


def pairs_only(tiny, folder):
    os.makedirs(folder, exist_ok=True)
    pd.read_parquet(f"{tiny}/raw/msmarco.parquet")[["query", "passage"]].to_parquet(f"{folder}/msmarco.parquet")
    return str(folder)


def test_mining_with_a_model_that_cannot_rank_says_what_to_do(tiny, tmp_path):
    pairs = pairs_only(tiny, tmp_path / "pairs")
    proc = call_main(mine_negatives.main, ["--model", f"{tiny}/backbone", "--input_dir", pairs, "--output_dir",
                                           str(tmp_path / "mined"), "--num_negatives", "4", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if "little better than random" in line]
    assert line.startswith("msmarco: the model does not separate positives from other texts"), line
    for advice in ("a trained embedder as --model", "--positive_margin none", '"num_hard_neg": 0'):
        assert advice in line


def test_a_model_that_ranks_gets_no_such_line(capsys):
    """Queries embedded as their own positives: every positive beats every random text."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pd.DataFrame({"query": [f"q{i}" for i in range(40)], "passage": [f"p{i}" for i in range(40)]})
    pairs = mine_negatives.build_pairs(pa.Table.from_pandas(table))
    settings = mine_negatives.Settings(num_negatives=2, positive_margin=None)
    sep = mine_negatives.separation(pairs, (vectors * vectors).sum(1), mine_negatives.Vectors([vectors]),
                                    mine_negatives.Vectors([vectors]), settings, 1)
    assert not sep.weak and sep.ahead == 1.0
    mined = mine_negatives.Mined(np.zeros((40, 2), np.int64), np.array([], np.int64), 0, sep)
    mine_negatives.report_separation("x", 40, mined, settings)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("prepare_only", [False, True])
def test_errors_on_tokenized_raw_data_name_the_raw_file(tiny, tmp_path, prepare_only):
    raw = pairs_only(tiny, tmp_path / "my_pairs")
    config, values = make_config(tmp_path, tiny, raw, "run", num_hard_neg=3)
    proc = call_main(run.main, ["--config", config] + ["--prepare_only"] * prepare_only)
    line = assert_user_error(proc, f"{raw}/msmarco.parquet: 0 hard negatives per row (no negative_1 column)",
                             "num_hard_neg 0", "mine_negatives.py")
    assert values["cache_dir"] not in line and "_id" not in line


def readme_snippet():
    """The python block of docs/evaluation.md that embeds with transformers' AutoModel alone."""
    text = open(os.path.join(REPO_DIR, "docs", "evaluation.md")).read()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "AutoModel" in b]
    return block


def test_encode_returns_numpy_and_the_automodel_snippet_embeds_alike(trained):
    import torch

    from model import load_encoder

    _, values = trained
    path = os.path.join(values["output_dir"], "run", "step_4")
    texts = ["what is F2LLM?", "F2LLM is an embedding model.", "a", "a longer text " * 40]
    encoder = load_encoder(path, device="cpu")
    ours = encoder.encode(texts)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (4, 32)
    tensor = encoder.encode(texts, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and np.allclose(tensor.numpy(), ours)
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 6, snippet
    scope = {"path": path, "texts": texts}
    exec(snippet.replace("max_length=1024", f"max_length={encoder.max_seq_length}"), scope)
    cosines = (torch.as_tensor(ours) * scope["vectors"].detach().float()).sum(1)
    assert (cosines >= 0.9999).all(), cosines


def test_readme_own_data_starts_with_pairs_then_mines():
    text = open(os.path.join(REPO_DIR, "README.md")).read()
    section = text.split("## Training on your own data", 1)[1].split("\n## ", 1)[0]
    assert "--num_hard_neg 0" in section and "configs/own_data.json" in section
    assert section.index("--num_hard_neg 0") < section.index("python mine_negatives.py")
    launches = [line for line in section.splitlines() if "accelerate launch" in line]
    assert launches and all("--num_processes" in line for line in launches), launches
