"""Training reads the published F2LLM-v2 tokenized layout: `NAME_query.parquet` files whose document
columns hold string ids "NAME_i", and one `corpus.parquet` (or the `NAME_corpus.parquet` files it is
concatenated from). The files here are written as the published tokenize_data_qwen.py (v2) and its
README write them (conftest.write_published_v2), and must give the same batches as the v1 layout of
the same data."""
import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_user_error, call_main, write_config
from test_v2_layout import DATASETS, batches_per_dataset

import run


def assert_same_batches(expected, got):
    assert sorted(expected) == sorted(got) == DATASETS
    for name in DATASETS:
        (train1, valid1, n1), (train2, valid2, n2) = expected[name], got[name]
        assert n1 == n2 and len(valid1) == len(valid2) > 1
        for a, b in zip(train1[0] + train1[1] + valid1, train2[0] + train2[1] + valid2, strict=True):
            assert a["num_neg"] == b["num_neg"] and torch.equal(a["lengths"], b["lengths"]), name
            assert torch.equal(a["input_ids"], b["input_ids"]), name


def test_published_v2_files_give_the_v1_batches(tiny, tokenized, published_v2_data, tmp_path):
    assert_same_batches(batches_per_dataset(tiny, tokenized, tmp_path / "c1"),
                        batches_per_dataset(tiny, published_v2_data, tmp_path / "c2"))


def test_the_per_dataset_corpus_files_serve_without_concatenation(tiny, tokenized, published_v2_data, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(published_v2_data, folder)
    os.remove(folder / "corpus.parquet")
    assert_same_batches(batches_per_dataset(tiny, tokenized, tmp_path / "c1"),
                        batches_per_dataset(tiny, str(folder), tmp_path / "c2"))


def test_integer_ids_are_made_once_and_remade_when_a_file_changes(tiny, published_v2_data, tmp_path):
    folder, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(published_v2_data, folder)
    batches_per_dataset(tiny, str(folder), cache)
    twins = {f: os.stat(cache / "published_v2" / f).st_mtime_ns for f in os.listdir(cache / "published_v2")}
    assert sorted(f.rsplit("-", 1)[0] for f in twins) == DATASETS
    batches_per_dataset(tiny, str(folder), cache)
    assert {f: os.stat(cache / "published_v2" / f).st_mtime_ns for f in os.listdir(cache / "published_v2")} == twins
    os.utime(folder / "imdb_query.parquet")  # a rewritten query file gets a new twin
    batches_per_dataset(tiny, str(folder), cache)
    assert len(os.listdir(cache / "published_v2")) == len(twins) + 1


def rewrite(path, change):
    df = pd.read_parquet(path)
    change(df)
    df.to_parquet(path)


BAD = {  # case: (how to break a copy of the published folder, the file the error names, fragments)
    "unknown id": (lambda d: rewrite(f"{d}/msmarco_query.parquet", lambda df: df.__setitem__(
        "passage_input_ids", df["passage_input_ids"].where(df.index != 4, "msmarco_999999"))),
        "msmarco_query.parquet", ["'passage_input_ids'", "1 document id(s)", "rows 4", "msmarco_999999"]),
    "duplicate doc_id": (lambda d: pd.concat([pd.read_parquet(f"{d}/corpus.parquet")] * 2).to_parquet(
        f"{d}/corpus.parquet"), "corpus.parquet", ["appear more than once"]),
    "integer ids": (lambda d: rewrite(f"{d}/imdb_query.parquet", lambda df: df.__setitem__(
        "negative_1_input_ids", 0)), "imdb_query.parquet", ["'negative_1_input_ids'", "string document ids"]),
    "stray file": (lambda d: shutil.copy(f"{d}/imdb_query.parquet", f"{d}/extra.parquet"), "extra.parquet",
                   ["published v2 layout", "move it out"]),
    "corpus tokens as strings": (lambda d: rewrite(f"{d}/corpus.parquet", lambda df: df.__setitem__(
        "input_ids", df["input_ids"].map(str))), "corpus.parquet", ["'input_ids'", "not a list of token ids"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_published_v2_input_is_one_line_naming_the_file(tiny, published_v2_data, tmp_path, case):
    folder = tmp_path / "data"
    shutil.copytree(published_v2_data, folder)
    breaks, named, fragments = BAD[case]
    breaks(folder)
    config = write_config(tmp_path / "c.json", model_path=f"{tiny}/backbone", train_data_path=str(folder),
                          cache_dir=str(tmp_path / "cache"), num_hard_neg=3)
    proc = call_main(run.main, ["--config", config, "--prepare_only"])
    assert_user_error(proc, str(folder / named), *fragments)


def test_prepare_only_lists_the_published_datasets_by_name(tiny, published_v2_data, tmp_path):
    config = write_config(tmp_path / "c.json", model_path=f"{tiny}/backbone", train_data_path=published_v2_data,
                          cache_dir=str(tmp_path / "cache"), num_hard_neg=3)
    proc = call_main(run.main, ["--config", config, "--prepare_only"])
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == DATASETS
    assert pq.read_metadata(f"{published_v2_data}/corpus.parquet").num_rows == sum(
        pq.read_metadata(f"{published_v2_data}/{n}_corpus.parquet").num_rows for n in DATASETS)


@pytest.mark.parametrize("split", ["validation", "all"])
def test_evaluate_reads_the_published_layout(tiny, tokenized, published_v2_data, split):
    import evaluate

    tables = [call_main(evaluate.main, [f"{tiny}/backbone", folder, "--split", split, "--max_queries", "20"])
              for folder in (tokenized, published_v2_data)]
    assert all(proc.returncode == 0 for proc in tables), tables[1].stderr
    assert tables[0].stdout.splitlines()[-4:] == tables[1].stdout.splitlines()[-4:]
    assert "msmarco" in tables[1].stdout and "natural_questions" in tables[1].stdout
