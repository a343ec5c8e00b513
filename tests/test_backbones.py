"""Issue 23 through the commands users type: tiny backbones of each tested family, built by
demo.build_family in a temporary folder outside the repository with their own tokenizers, train under
the published launch (`accelerate launch` with configs/accelerate_config.yaml: DeepSpeed ZeRO-2, bf16;
2 CPU processes), and their checkpoints work with the downstream tools.

Llama and BERT go the README's way: tokenize_data_qwen.py, the launch, evaluate.py on the backbone and
on the final checkpoint (the retrieval metric rises). Mistral, Gemma 3, Phi-3, XLM-RoBERTa and
ModernBERT: one launch each on the raw files (run.py tokenizes them), the loss falls. Every final
checkpoint embeds alike in sentence-transformers and model.load_encoder with its family's pooling.
configs/config_bert.json trains as published; evaluate.py (raw and tokenized data), mine_negatives.py,
merge_checkpoints.py and mteb_eval.py take the BERT checkpoint, and the Llama one where it is cheap.
"""
import dataclasses
import json
import os
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (BIN, REPO_DIR, assert_user_error, call_main, curves, free_port, launch_env, run_cli,
                      write_config)
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

import demo
import evaluate
import merge_checkpoints
import mine_negatives
import model
import mteb_eval
import run
import tokenize_data_qwen
from config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

POOLING = {"llama": "lasttoken", "mistral": "lasttoken", "gemma3_text": "lasttoken", "phi3": "lasttoken",
           "bert": "mean", "xlm-roberta": "mean", "modernbert": "mean"}
TOKENIZED = ("llama", "bert")  # tokenized by the CLI first, as the README does; the others train on raw files
# make test: BERT, the encoder (Qwen3, the decoder, is every other test's); Llama with the breadth tests
BY_CLI = [pytest.param("llama", marks=pytest.mark.breadth), "bert"]
# Each launch: 2 processes x 8 queries with 7 hard negatives, two epochs of 24 steps over the 360 rows
# left for training; lr 2e-3 moves a random tiny backbone far within them.
TRAINING = dict(experiment_id="run", train_batch_size=8, max_seq_length=64, num_hard_neg=7, learning_rate=2e-3,
                min_lr=1e-5, warmup_steps=3, train_epochs=2, log_interval=4, checkpointing_steps=0,
                validation_steps=0, validation_fraction=0.1, min_eval_queries=0, gradient_checkpointing=False)
# The last is longer than max_seq_length: both sides must cut it alike
TEXTS = ["who is kalomar", "kalomar is a baker from north harbor who enjoys chess.", "a",
         " ".join(["the sailor from river town loves poetry"] * 12)]
BERT_PUBLISHED = dict(model_path="models/bert-base-uncased", model_type="encoder",
                      experiment_id="bert-base+lr.2e-5+bs.32x32+context.512+3epochs",
                      train_data_path="data_tokenized_bert", output_dir="output", tb_dir="output/tb", cache_dir="cache",
                      train_batch_size=32, checkpointing_steps=5000, validation_steps=5000, max_seq_length=512,
                      learning_rate=2e-5, min_lr=1e-7, weight_decay=0.01, warmup_steps=500, train_epochs=3,
                      log_interval=100, num_hard_neg=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """raw/: two retrieval datasets of 200 people each (10 hard negatives a row), eval/: 200 people never
    trained on, texts: every text, which the backbones' tokenizers are trained on."""
    root = tmp_path_factory.mktemp("backbone_data")
    texts = demo.write_sample_data(str(root / "raw"), str(root / "eval"), people_per_dataset=200, num_negatives=10)
    for name in ("banking77", "imdb"):  # retrieval only: every step trains what evaluate.py measures
        os.remove(root / "raw" / f"{name}.parquet")
    return SimpleNamespace(raw=str(root / "raw"), eval=str(root / "eval"), texts=texts)


@pytest.fixture(scope="module")
def backbone(data, tmp_path_factory):
    """family -> the folder of its tiny backbone, built on first use."""
    root, built = tmp_path_factory.mktemp("backbones"), {}

    def get(family):
        if family not in built:
            built[family] = str(root / family)
            demo.build_family(built[family], family, data.texts)
        return built[family]

    return get


@dataclasses.dataclass
class Trained:
    """A family's launch: its backbone, the folder it trained on, its config and what the launch printed."""

    backbone: str
    data: str  # the folder training read: tokenized, or the raw files
    config: str
    values: dict
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def run_dir(self):
        return os.path.join(self.values["output_dir"], self.values["experiment_id"])

    @property
    def final(self):
        return os.path.join(self.run_dir, f"epoch_{self.values['train_epochs']}")


@pytest.fixture(scope="module")
def trained(data, backbone, tmp_path_factory, deepspeed_op):
    """family -> its Trained run (one launch per family, on first use)."""
    runs = {}

    def get(family):
        if family not in runs:
            runs[family] = train(family, backbone(family), data.raw, tmp_path_factory.mktemp(f"run_{family}"))
        return runs[family]

    yield get
    print("\nlaunch seconds: " + ", ".join(f"{family} {r.seconds:.1f}" for family, r in runs.items()))


def train(family, backbone_dir, raw, root):
    train_data = raw
    if family in TOKENIZED:
        train_data = str(root / "tokenized")
        run_cli("tokenize_data_qwen.py", "--model_path", backbone_dir, "--input_dir", raw, "--output_dir", train_data,
                "--max_seq_length", "64", check=True)
    values = dict(model_path=backbone_dir, train_data_path=train_data, output_dir=str(root / "out"),
                  tb_dir=str(root / "tb"), cache_dir=str(root / "cache"), **TRAINING)
    config = write_config(root / "config.json", **values)
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "configs/accelerate_config.yaml",
           "--num_processes", "2", "--main_process_port", free_port(), "run.py", "--config", config]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO_DIR, env=launch_env(), capture_output=True, text=True, timeout=600)
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Trained(backbone_dir, train_data, config, values, proc, seconds)


def losses(run_):
    return [value for _, value in sorted(curves(run_.values)["train/loss"].items())]


def check_sentence_transformers(path, pooling):
    """The checkpoint names `pooling` for sentence-transformers, which then embeds as load_encoder
    does; returns the lowest cosine similarity of the two."""
    with open(os.path.join(path, "1_Pooling", "config.json")) as f:
        modes = [key for key, on in json.load(f).items() if key.startswith("pooling_mode_") and on]
    assert modes == [model.ST_POOLING[pooling]]
    encoder = model.load_encoder(path, device="cpu")
    assert encoder.embedder.pooling == pooling
    ours = encoder.encode(TEXTS)
    theirs = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.float32}).encode(TEXTS)
    cosine = (torch.as_tensor(ours) * torch.as_tensor(theirs)).sum(dim=1)
    assert (cosine >= 0.9999).all(), cosine
    return cosine.min().item()


def mean_mrr_cli(checkpoint, run_):
    proc = run_cli("evaluate.py", checkpoint, run_.data, "--config", run_.config, check=True)
    assert "msmarco: 20 queries (validation rows)" in proc.stdout, proc.stdout
    return demo.mean_mrr(proc.stdout)


# ---- the "done when": Llama and BERT through tokenize, launch, evaluate ---------------------------

@pytest.mark.parametrize("family", BY_CLI)
def test_tokenize_launch_evaluate(trained, family):
    run_ = trained(family)
    tokenizer = AutoTokenizer.from_pretrained(run_.backbone)
    first = pq.read_table(os.path.join(run_.data, "msmarco.parquet"), columns=["query_input_ids"]).column(0)[0]
    if family == "bert":  # the tokenizer's own [CLS] ... [SEP]
        assert first.as_py()[0] == tokenizer.cls_token_id and first.as_py()[-1] == tokenizer.sep_token_id
    else:  # no special tokens (not Llama's bos), the eos appended
        assert first.as_py()[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in first.as_py()
    assert "2 process(es)" in run_.proc.stdout and f"final checkpoint: {run_.final}" in run_.proc.stdout

    before, after = mean_mrr_cli(run_.backbone, run_), mean_mrr_cli(run_.final, run_)
    assert after > before + 0.25 and after > 0.6, (before, after)
    cosine = check_sentence_transformers(run_.final, POOLING[family])
    curve = losses(run_)
    print(f"\n{family}: launch {run_.seconds:.1f} s, loss {curve[0]:.3f} -> {curve[-1]:.3f}, validation MRR@10 "
          f"{before:.4f} -> {after:.4f}, sentence-transformers cosine >= {cosine:.6f}")


# ---- one launch per other family ---------------------------------------------------------------------

@pytest.mark.breadth
@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "phi3", "xlm-roberta", "modernbert"])
def test_family_trains_under_the_published_launch(trained, family):
    run_ = trained(family)
    assert "2 process(es)" in run_.proc.stdout and f"final checkpoint: {run_.final}" in run_.proc.stdout
    curve = losses(run_)
    assert curve[-1] < 0.7 * curve[0], curve
    cosine = check_sentence_transformers(run_.final, POOLING[family])
    print(f"\n{family}: launch {run_.seconds:.1f} s, loss {curve[0]:.3f} -> {curve[-1]:.3f}, "
          f"sentence-transformers cosine >= {cosine:.6f}")


# ---- configs/config_bert.json, the published encoder branch's ----------------------------------------------

def test_published_bert_config_trains(trained, tmp_path):
    """Loaded as shipped; a copy pointed at the tiny BERT and its data (nothing else changed) trains its
    three epochs in one process."""
    path = os.path.join(REPO_DIR, "configs", "config_bert.json")
    published = load_config(path)
    assert {key: getattr(published, key) for key in BERT_PUBLISHED} == BERT_PUBLISHED
    with open(path) as f:
        values = json.load(f)
    assert values == BERT_PUBLISHED
    bert = trained("bert")
    values.update(model_path=bert.backbone, train_data_path=bert.data, output_dir=str(tmp_path / "output"),
                  tb_dir=str(tmp_path / "output" / "tb"), cache_dir=str(tmp_path / "cache"))
    proc = call_main(run.main, ["--config", write_config(tmp_path / "config_bert.json", **values)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = os.path.join(values["output_dir"], values["experiment_id"], "epoch_3")
    assert f"final checkpoint: {final}" in proc.stdout
    with open(os.path.join(values["output_dir"], values["experiment_id"], "args.json")) as f:
        args = json.load(f)
    assert args["model_type"] == "encoder" and args["learning_rate"] == 2e-5 and args["train_batch_size"] == 32
    assert not np.allclose(model.load_encoder(final, device="cpu").encode(TEXTS),
                           model.load_encoder(bert.backbone, device="cpu").encode(TEXTS), rtol=0, atol=1e-6)
    check_sentence_transformers(final, "mean")


# ---- a learned position table bounds max_seq_length -------------------------------------------------------

@pytest.mark.parametrize("family, limit", [("bert", 512), ("xlm-roberta", 512), ("distilbert", 512),
                                           ("electra", 512), ("modernbert", None), ("deberta-v2", None),
                                           ("llama", None)])
def test_position_limit(backbone, family, limit):
    """The limit is exact: a sequence of `limit` tokens embeds, one more does not (XLM-RoBERTa's
    positions start at 2, so 514 rows hold 512)."""
    path = backbone(family)
    assert model.position_limit(path, model.backbone_family(path)) == limit
    if limit is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(TEXTS[-1] * 20, add_special_tokens=False)["input_ids"]
        assert len(ids) > limit
        embedder = model.load_encoder(path, device="cpu").embedder
        assert torch.isfinite(embedder(torch.tensor(ids[:limit]), torch.tensor([limit]))).all()
        with pytest.raises((IndexError, RuntimeError)):
            embedder(torch.tensor(ids[: limit + 1]), torch.tensor([limit + 1]))


def test_training_refuses_a_length_above_the_positions(backbone, data, tmp_path):
    values = dict(model_path=backbone("bert"), train_data_path=data.raw, output_dir=str(tmp_path / "out"),
                  tb_dir=str(tmp_path / "tb"), cache_dir=str(tmp_path / "cache"), **{**TRAINING, "max_seq_length": 513})
    proc = call_main(run.main, ["--config", write_config(tmp_path / "config.json", **values)])
    assert_user_error(proc, "max_seq_length 513 is above the 512 positions", 'set "max_seq_length": 512 or less')
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "cache")


# ---- downstream tools with the trained checkpoints --------------------------------------------------------

@pytest.mark.parametrize("family", BY_CLI)
def test_evaluate_raw_and_tokenized(trained, data, family):
    """The raw files and their tokenized copies give one table (the checkpoint's rule tokenizes the raw
    ones), and the people never trained on are found far better after training."""
    run_ = trained(family)
    tables = []
    for folder in (run_.data, data.raw):
        proc = call_main(evaluate.main, [run_.final, folder, "--config", run_.config])
        assert proc.returncode == 0, proc.stderr
        tables.append(proc.stdout.splitlines()[-3:])
    assert tables[0] == tables[1]
    held_out = []
    for checkpoint in (run_.backbone, run_.final):
        proc = call_main(evaluate.main, [checkpoint, data.eval, "--split", "all"])
        assert proc.returncode == 0, proc.stderr
        held_out.append(demo.mean_mrr(proc.stdout))
    assert held_out[1] > held_out[0] + 0.2, held_out


@pytest.mark.parametrize("family", BY_CLI)
def test_mine_then_tokenize_and_train(trained, data, family, tmp_path):
    """The checkpoint mines each row's negatives: the passages it scores highest after the row's own, as
    load_encoder embeds them (the family's tokenization rule and pooling) and the float16 store keeps
    them; the output tokenizes and trains on from the checkpoint."""
    run_ = trained(family)
    pairs = pq.read_table(os.path.join(data.raw, "msmarco.parquet"), columns=["query", "passage"])
    queries, passages = pairs.column("query").to_pylist(), pairs.column("passage").to_pylist()
    assert len(set(queries)) == len(set(passages)) == len(queries)  # row i's passage is corpus text i
    (tmp_path / "pairs").mkdir()
    pq.write_table(pairs, tmp_path / "pairs" / "people.parquet")
    mined_dir = tmp_path / "mined"
    proc = call_main(mine_negatives.main, ["--model", run_.final, "--input_dir", str(tmp_path / "pairs"),
                                           "--output_dir", str(mined_dir), "--num_negatives", "7",
                                           "--positive_margin", "none"])
    assert proc.returncode == 0, proc.stderr
    mined = pq.read_table(mined_dir / "people.parquet")
    rows = list(zip(*(mined.column(f"negative_{i}").to_pylist() for i in range(1, 8))))

    encoder = model.load_encoder(run_.final, device="cpu")

    def stored(texts):  # mine_negatives.py's batches and float16 store
        return encoder.encode(texts, batch_size=32).astype(np.float16).astype(np.float64)

    scores = stored(queries) @ stored(passages).T
    np.fill_diagonal(scores, -np.inf)
    checked = 0
    for i, row in enumerate(rows):
        best = np.argsort(-scores[i], kind="stable")[:8]
        if np.diff(scores[i][best]).max() > -1e-5:  # a near-tie: either order is right
            continue
        assert list(row) == [passages[j] for j in best[:7]], i
        checked += 1
    assert checked >= 0.9 * len(rows)

    tokenized = tmp_path / "tokenized"
    proc = call_main(tokenize_data_qwen.main, ["--model_path", run_.final, "--input_dir", str(mined_dir),
                                               "--output_dir", str(tokenized), "--max_seq_length", "64",
                                               "--num_proc", "1"])
    assert proc.returncode == 0, proc.stderr
    values = dict(model_path=run_.final, train_data_path=str(tokenized), dataset_types={"people": "retrieval"},
                  output_dir=str(tmp_path / "out"), tb_dir=str(tmp_path / "tb"), cache_dir=str(tmp_path / "cache"),
                  **{**TRAINING, "train_steps": 3})
    proc = call_main(run.main, ["--config", write_config(tmp_path / "config.json", **values)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"final checkpoint: {tmp_path / 'out' / 'run' / 'step_3'}" in proc.stdout


@pytest.mark.parametrize("family", BY_CLI)
def test_merge_two_checkpoints(trained, family, tmp_path):
    """The mean of epoch_1 and epoch_2, with their sentence-transformers modules and pooling."""
    run_ = trained(family)
    parts = [os.path.join(run_.run_dir, f"epoch_{epoch}") for epoch in (1, 2)]
    out = str(tmp_path / "merged")
    proc = call_main(merge_checkpoints.main, [out, *parts])
    assert proc.returncode == 0, proc.stderr
    merged, (a, b) = load_file(os.path.join(out, "model.safetensors")), [
        load_file(os.path.join(p, "model.safetensors")) for p in parts]
    assert merged.keys() == a.keys()
    for key in merged:
        assert torch.equal(merged[key], ((a[key].float() + b[key].float()) / 2).to(a[key].dtype)), key
    assert any(not torch.equal(merged[key], b[key]) for key in merged)
    for name in ("modules.json", os.path.join("1_Pooling", "config.json"), "sentence_bert_config.json"):
        with open(os.path.join(out, name)) as f, open(os.path.join(parts[1], name)) as g:
            assert json.load(f) == json.load(g), name
    check_sentence_transformers(out, POOLING[family])


@pytest.mark.parametrize("family", BY_CLI)
def test_mteb_local(trained, data, family, tmp_path, monkeypatch):
    """mteb ranks the held-out people as evaluate.py does (same candidates: every distinct document)."""
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb_cache"))
    run_ = trained(family)
    proc = call_main(mteb_eval.main, [run_.final, "--local", data.eval, "--output_dir", str(tmp_path / "results")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "results" / "results" / "f2llm__epoch_2" / "local" / "people.json") as f:
        scores = json.load(f)["scores"]["test"][0]
    ours = evaluate.evaluate(run_.final, data.eval, split="all")["people"]
    for key in ("ndcg@10", "mrr@10", "recall@10"):
        assert scores[key.replace("@", "_at_")] == pytest.approx(ours[key], abs=1e-3), key
