"""The F2LLM-v2 tokenized layout (tokenize_data_qwen.py --layout v2): per dataset a query file of
document ids and a corpus of the unique passages and negatives.

The central property: the `tiny` raw data tokenized as v1 (the session fixture `tokenized`) and as
v2 gives identical batches from data.make_loader, for training (shuffled, sampled negatives) and
validation, so that everything downstream of load_splits is the same on either layout.
"""
import glob
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import data
import run
import tokenize_data_qwen
from config import Config
from conftest import assert_user_error, call_main, launch, make_config, run_cli, run_dir, write_config
from model import load_tokenizer
from test_train import steps_per_epoch

DATASETS = ["banking77", "imdb", "msmarco", "natural_questions"]  # the `tiny` raw files, sorted
TYPES = {"banking77": "clustering", "imdb": "classification", "msmarco": "retrieval", "natural_questions": "retrieval"}


def tokenize_args(tiny, output_dir, *extra, input_dir=None):
    return ["--model_path", f"{tiny}/backbone", "--input_dir", input_dir or f"{tiny}/raw", "--output_dir",
            str(output_dir), "--max_seq_length", "64", "--num_proc", "1", *extra]


@pytest.fixture(scope="module")
def v2(tiny, tmp_path_factory):
    """The `tiny` raw data tokenized with --layout v2, like the `tokenized` fixture (max_seq_length 64)."""
    out = tmp_path_factory.mktemp("tokenized_v2")
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, "--layout", "v2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def files_of(folder):
    """Every file under folder, relative: the query files and corpus/ ones."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


# ---- the tokenizer's output ------------------------------------------------------------------------

def test_v2_files_columns_and_record(tiny, v2):
    assert files_of(v2) == sorted([f"{n}.parquet" for n in DATASETS] + [f"corpus/{n}.parquet" for n in DATASETS])
    for name in DATASETS:
        queries, corpus = pq.read_table(f"{v2}/{name}.parquet"), pq.read_table(f"{v2}/corpus/{name}.parquet")
        negatives = 1 if name == "imdb" else 10
        assert queries.schema.names == ["query_input_ids", "passage_id"] + [f"negative_{i}_id"
                                                                             for i in range(1, negatives + 1)]
        assert queries.schema.field("query_input_ids").type == pa.list_(pa.int32())
        assert all(queries.schema.field(c).type == pa.int64() for c in queries.schema.names[1:])
        assert corpus.schema.names == ["doc_id", "input_ids"]
        assert corpus.column("doc_id").to_pylist() == list(range(corpus.num_rows))
        record = tokenize_data_qwen.read_record(f"{v2}/{name}.parquet")
        assert record["layout"] == "v2" and tokenize_data_qwen.read_record(f"{v2}/corpus/{name}.parquet") == record


def test_corpus_holds_each_unique_text_once_with_the_v1_tokens(tiny, tokenized, v2):
    """Text -> doc id is a bijection onto 0 .. n-1 over every passage and negative cell, and the
    corpus entry of each cell is the v1 file's token list of that cell."""
    shared = {}
    for name in DATASETS:
        raw, v1 = pq.read_table(f"{tiny}/raw/{name}.parquet"), pq.read_table(f"{tokenized}/{name}.parquet")
        queries, corpus = pq.read_table(f"{v2}/{name}.parquet"), pq.read_table(f"{v2}/corpus/{name}.parquet")
        docs = ["passage"] + [c for c in raw.column_names if c.startswith("negative_")]
        pairs = {pair for c in docs for pair in zip(raw.column(c).to_pylist(), queries.column(f"{c}_id").to_pylist())}
        texts = {text for text, _ in pairs}
        assert len(pairs) == len(texts) == corpus.num_rows, name  # one id per text, one text per id
        assert {i for _, i in pairs} == set(range(corpus.num_rows)), name
        shared[name] = raw.num_rows * len(docs) - corpus.num_rows
        assert queries.column("query_input_ids").equals(v1.column("query_input_ids"))
        for c in docs:
            assert corpus.column("input_ids").take(queries.column(f"{c}_id")).equals(v1.column(f"{c}_input_ids"))
    print(f"\ncells that reuse a text: {shared}")
    assert shared["imdb"] == 600 - 2 and shared["msmarco"] > 0, "both labels once; retrieval shares negatives"


def test_v2_is_smaller_on_disk(tokenized, v2, tmp_path):
    """Smaller than what v1 writes (which keeps the texts); smaller than v1's token columns alone
    where texts repeat across rows (the retrieval sets' shared negatives), not where they do not
    (banking77: every text distinct, so the ids come on top)."""
    v1, v1_tokens, v2_sizes = {}, {}, {}
    for name in DATASETS:
        table = pq.read_table(f"{tokenized}/{name}.parquet")
        pq.write_table(table.select([c for c in table.column_names if c.endswith("_input_ids")]), tmp_path / name)
        v1[name], v1_tokens[name] = os.path.getsize(f"{tokenized}/{name}.parquet"), os.path.getsize(tmp_path / name)
        v2_sizes[name] = os.path.getsize(f"{v2}/{name}.parquet") + os.path.getsize(f"{v2}/corpus/{name}.parquet")
    print(f"\non disk, v2 / v1: {sum(v2_sizes.values()) / sum(v1.values()):.2f} in all; v2 / v1 token columns: "
          + ", ".join(f"{n} {v2_sizes[n] / v1_tokens[n]:.2f}" for n in DATASETS))
    assert sum(v2_sizes.values()) < 0.7 * sum(v1.values())
    assert all(v2_sizes[n] < v1[n] for n in DATASETS)
    assert v2_sizes["msmarco"] < 0.6 * v1_tokens["msmarco"] and v2_sizes["natural_questions"] < 0.6 * v1_tokens[
        "natural_questions"]


def stamps(folder):
    return {n: (os.stat(os.path.join(folder, n)).st_ino, os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in files_of(folder)}


def same_tables(folder, reference):
    assert files_of(folder) == files_of(reference)
    for n in files_of(reference):
        assert pq.read_table(f"{folder}/{n}").equals(pq.read_table(f"{reference}/{n}")), n


def test_rerun_skips_and_a_missing_or_stale_corpus_redoes_its_dataset(tiny, v2, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(v2, out)
    before = stamps(out)
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, "--layout", "v2"))
    assert proc.returncode == 0 and "tokenized 0 file(s), skipped 4 already tokenized" in proc.stdout, proc.stdout
    assert stamps(out) == before

    os.remove(out / "corpus" / "msmarco.parquet")
    shutil.copy(out / "corpus" / "imdb.parquet", out / "corpus" / "banking77.parquet")  # another record
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, "--layout", "v2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    redone = sorted(line for line in proc.stdout.splitlines() if line.startswith("retokenize "))
    assert redone == [f"retokenize banking77: its corpus {out}/corpus/banking77.parquet is not from the same input "
                      "and settings", f"retokenize msmarco: its corpus {out}/corpus/msmarco.parquet is missing"]
    assert "tokenized 2 file(s), skipped 2 already tokenized" in proc.stdout
    same_tables(out, v2)


def test_layout_switch_retokenizes_and_old_records_count_as_v1(tiny, tokenized, v2, tmp_path):
    """A v1 output is stale for a v2 run and vice versa; a v1 record written before --layout existed
    (no "layout" key) still skips on a v1 run."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy2(f"{tiny}/raw/msmarco.parquet", raw)  # one dataset: quick
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy2(f"{tokenized}/msmarco.parquet", out)
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, "--layout", "v2", input_dir=str(raw)))
    assert "retokenize msmarco: --layout changed (v1 -> v2)" in proc.stdout, proc.stdout + proc.stderr
    assert pq.read_table(out / "msmarco.parquet").equals(pq.read_table(f"{v2}/msmarco.parquet"))
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, input_dir=str(raw)))
    assert "retokenize msmarco: --layout changed (v2 -> v1)" in proc.stdout, proc.stdout + proc.stderr
    table = pq.read_table(out / "msmarco.parquet")
    assert table.equals(pq.read_table(f"{tokenized}/msmarco.parquet"))

    old = tokenize_data_qwen.read_record(out / "msmarco.parquet")
    del old["layout"]
    pq.write_table(tokenize_data_qwen.with_record(table, old), out / "msmarco.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, out, input_dir=str(raw)))
    assert "skip msmarco: already tokenized" in proc.stdout, proc.stdout + proc.stderr


def test_corpus_is_written_before_its_query_file(tiny, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy2(f"{tiny}/raw/imdb.parquet", raw)
    written = []
    write = tokenize_data_qwen.write_atomic
    monkeypatch.setattr(tokenize_data_qwen, "write_atomic", lambda table, path: (written.append(path),
                                                                                 write(table, path)))
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, tmp_path / "out", "--layout", "v2",
                                                            input_dir=str(raw)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert written == [f"{tmp_path}/out/corpus/imdb.parquet", f"{tmp_path}/out/imdb.parquet"]


def test_v2_refuses_to_write_into_the_input_folder(tiny, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy2(f"{tiny}/raw/imdb.parquet", raw)
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, "--layout", "v2", input_dir=str(raw)))
    assert_user_error(proc, "--layout v2", "--input_dir", "--output_dir")
    assert os.listdir(raw) == ["imdb.parquet"]


# ---- the training side: identical batches -------------------------------------------------------------

def batches_per_dataset(tiny, folder, cache):
    """{name: (train batches of epochs 0 and 1, validation batches, len(train))} as run.py builds them."""
    cfg = Config(model_path=f"{tiny}/backbone", train_data_path=folder, cache_dir=str(cache), train_batch_size=4,
                 num_hard_neg=3, num_hard_neg_clustering=5, max_seq_length=24, validation_fraction=0.2, seed=3)
    eos = load_tokenizer(cfg.model_path).eos_token_id
    out = {}
    for stream, (name, path, task, columns) in enumerate(data.check_datasets(cfg, TYPES)):
        train, valid = data.load_splits(path, columns, cfg)
        loader = data.make_loader(train, task, cfg, eos, train=True, stream=stream, vocab_size=400)
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs.append(list(loader))
        out[name] = (epochs, list(data.make_loader(valid, task, cfg, eos, train=False)), len(train))
    return out


def test_v1_and_v2_give_identical_batches(tiny, tokenized, v2, tmp_path):
    v1_batches = batches_per_dataset(tiny, tokenized, tmp_path / "cache1")
    v2_batches = batches_per_dataset(tiny, v2, tmp_path / "cache2")
    assert sorted(v1_batches) == sorted(v2_batches) == DATASETS
    for name in DATASETS:
        (train1, valid1, n1), (train2, valid2, n2) = v1_batches[name], v2_batches[name]
        assert n1 == n2 and len(valid1) == len(valid2) > 1
        for a, b in zip(train1[0] + train1[1] + valid1, train2[0] + train2[1] + valid2, strict=True):
            assert a["num_queries"] == b["num_queries"] and a["num_neg"] == b["num_neg"], name
            assert torch.equal(a["lengths"], b["lengths"]) and torch.equal(a["input_ids"], b["input_ids"]), name
        k = {"banking77": 5, "imdb": 1}.get(name, 3)
        assert {b["num_neg"] for b in train2[0] + valid2} == {k}, name
        assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(train2[0], train2[1]))


def test_corpus_rows_fetch_v1_columns(tiny, v2, tmp_path):
    """rows_of a v2 split: a CorpusRows, passed through unchanged, giving v1 token columns."""
    cfg = Config(model_path=f"{tiny}/backbone", train_data_path=v2, cache_dir=str(tmp_path), num_hard_neg=3)
    path = f"{v2}/imdb.parquet"
    train, valid = data.load_splits(path, data.token_columns(path, 1), cfg)
    assert isinstance(train, data.CorpusRows) and data.rows_of(train) is train
    assert len(train) + len(valid) == 300
    table = train.__getitems__([5, 0, 5])
    assert table.column_names == ["query_input_ids", "passage_input_ids", "negative_1_input_ids"]
    assert table.slice(0, 1).equals(table.slice(2, 1)) and train[0].equals(table.slice(1, 1))


def test_documents_are_taken_chunk_by_chunk_in_id_order():
    """A corpus in many chunks (as datasets memory-maps it), some empty: each id gets its own token
    list, in the order asked, repeats included, whichever chunk it sits in."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, rng.integers(1, 6)).tolist() for _ in range(50)]
    sizes = [0, 7, 1, 0, 20, 13, 9, 0]
    cuts = np.cumsum([0] + sizes)
    chunked = pa.chunked_array([pa.array(docs[a:b], type=pa.list_(pa.int32())) for a, b in zip(cuts[:-1], cuts[1:])])
    assert chunked.num_chunks == len(sizes) and len(chunked) == 50
    rows = data.CorpusRows(datasets.Dataset.from_dict({"query_input_ids": [[1]]}), chunked)
    ids = np.concatenate([rng.integers(0, 50, 200), [49, 0, 7, 8, 27, 27, 0]])
    assert rows.take_documents(ids).to_pylist() == [docs[i] for i in ids]


# ---- the training side: bad v2 input ---------------------------------------------------------------

def with_column(path, column, array):
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index(column), column, array), path)


def set_value(path, column, row, value):
    values = pq.read_table(path).column(column).to_pylist()
    values[row] = value
    with_column(path, column, pa.array(values, pa.int64()))


QUERY, CORPUS = "msmarco.parquet", "corpus/msmarco.parquet"
BAD_V2 = {  # case: (how to break a copy of msmarco's files, the file the error names, fragments)
    "id out of range": (lambda d: set_value(f"{d}/{QUERY}", "passage_id", 7, 10**6), QUERY,
                        ["'passage_id'", "outside the corpus", "rows 7"]),
    "negative id": (lambda d: set_value(f"{d}/{QUERY}", "negative_2_id", 0, -1), QUERY,
                    ["'negative_2_id'", "outside the corpus", "e.g. -1"]),
    "null id": (lambda d: set_value(f"{d}/{QUERY}", "negative_10_id", 3, None), QUERY,
                ["'negative_10_id'", "null document id", "rows 3"]),
    "string id": (lambda d: with_column(f"{d}/{QUERY}", "passage_id", pa.array(["0"] * 60)), QUERY,
                  ["'passage_id'", "not integer document ids"]),
    "missing corpus": (lambda d: os.remove(f"{d}/{CORPUS}"), QUERY,
                       [f"corpus/{QUERY} is missing", "tokenize_data_qwen.py --layout v2"]),
    "corpus tokens as strings": (lambda d: with_column(f"{d}/{CORPUS}", "input_ids", pa.array(
        [str(x) for x in pq.read_table(f"{d}/{CORPUS}").column("input_ids").to_pylist()])), CORPUS,
        ["'input_ids'", "not a list of token ids"]),
    "corpus doc_id as strings": (lambda d: with_column(f"{d}/{CORPUS}", "doc_id", pc.cast(
        pq.read_table(f"{d}/{CORPUS}").column("doc_id"), pa.string())), CORPUS, ["'doc_id'", "not integer ids"]),
    "corpus without doc_id": (lambda d: pq.write_table(pq.read_table(f"{d}/{CORPUS}").drop_columns(["doc_id"]),
                                                       f"{d}/{CORPUS}"), CORPUS, ["no column 'doc_id'"]),
    "doc_id not the position": (lambda d: with_column(f"{d}/{CORPUS}", "doc_id", pa.array(
        range(pq.read_metadata(f"{d}/{CORPUS}").num_rows, 0, -1), pa.int64())), CORPUS, ["'doc_id'", "row position"]),
}


@pytest.mark.parametrize("case", sorted(BAD_V2))
def test_bad_v2_input_is_one_line_naming_the_file(tiny, v2, tmp_path, case):
    folder = tmp_path / "data"
    (folder / "corpus").mkdir(parents=True)
    for name in (QUERY, CORPUS):
        shutil.copy(f"{v2}/{name}", folder / name)
    breaks, named, fragments = BAD_V2[case]
    breaks(folder)
    config = write_config(tmp_path / "c.json", model_path=f"{tiny}/backbone", train_data_path=str(folder),
                          cache_dir=str(tmp_path / "cache"), num_hard_neg=3)
    proc = call_main(run.main, ["--config", config, "--prepare_only"])
    assert_user_error(proc, str(folder / named), *fragments)


# ---- a real training run ---------------------------------------------------------------------------

def test_training_run_on_v2_data(tiny, v2, tmp_path):
    values = dict(model_path=f"{tiny}/backbone", train_data_path=v2, experiment_id="e2e",
                  output_dir=str(tmp_path / "out"), tb_dir=str(tmp_path / "tb"), cache_dir=str(tmp_path / "cache"),
                  train_batch_size=8, max_seq_length=64, num_hard_neg=3, num_hard_neg_clustering=5,
                  learning_rate=2e-3, min_lr=1e-5, warmup_steps=2, log_interval=2, train_steps=6,
                  checkpointing_steps=0, validation_steps=0)
    proc = run_cli("run.py", "--config", write_config(tmp_path / "config.json", **values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"final checkpoint: {tmp_path}/out/e2e/step_6" in proc.stdout
    assert os.path.isfile(f"{tmp_path}/out/e2e/step_6/config.json")


# ---- training straight from the raw files ----------------------------------------------------------

def test_run_on_raw_files_tokenizes_them_into_its_cache(tiny, v2, tmp_path):
    """train_data_path may be the raw folder: the main process of a 2-process launch tokenizes it into
    cache_dir, the same files as `tokenize_data_qwen.py --layout v2`, while the other waits; a later
    run reuses them. An epoch end whose step_N was just saved gets epoch_N as hard links of it."""
    per_epoch = steps_per_epoch(v2, 8, 2)
    config, values = make_config(tmp_path, tiny, f"{tiny}/raw", "raw", train_batch_size=8, max_seq_length=64,
                                 num_hard_neg=3, train_epochs=1, checkpointing_steps=per_epoch, eval_queries=0)
    proc = launch(config, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [cache] = glob.glob(os.path.join(values["cache_dir"], "tokenized", "raw-*"))
    same_tables(cache, v2)
    assert f"tokenized {len(DATASETS)} file(s), skipped 0" in proc.stdout

    folder = run_dir(values)
    step, epoch = os.path.join(folder, f"step_{per_epoch}"), os.path.join(folder, "epoch_1")
    assert f"final checkpoint: {epoch}" in proc.stdout
    assert files_of(epoch) == files_of(step) and checkpoint.problem_with(epoch) is None
    assert all(os.path.samefile(os.path.join(step, n), os.path.join(epoch, n)) for n in files_of(step))

    proc = call_main(run.main, ["--config", config, "--prepare_only"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {len(DATASETS)} already tokenized" in proc.stdout


def test_run_on_raw_files_with_an_empty_text_stops_every_process(tiny, tmp_path):
    """The main process's tokenizer error is one line, and the waiting process stops with it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    table = pq.read_table(f"{tiny}/raw/msmarco.parquet")
    texts = table.column("passage").to_pylist()
    texts[3] = " "
    pq.write_table(table.set_column(table.schema.get_field_index("passage"), "passage", pa.array(texts)),
                   raw / "msmarco.parquet")
    config, _ = make_config(tmp_path, tiny, str(raw), "empty", train_batch_size=8, max_seq_length=64)
    proc = launch(config, processes=2, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'passage' 1 (rows 3)" in errors[0], proc.stderr[-3000:]
    assert not glob.glob(os.path.join(tmp_path, "empty", "out", "run", "step_*"))


def test_a_folder_of_raw_and_tokenized_files_is_refused(tiny, tokenized, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy2(f"{tiny}/raw/msmarco.parquet", mixed)
    shutil.copy2(f"{tokenized}/imdb.parquet", mixed)
    config, _ = make_config(tmp_path, tiny, str(mixed), "mixed")
    assert_user_error(call_main(run.main, ["--config", config]), "mixes raw files (msmarco.parquet)",
                      "keep one kind per folder")
