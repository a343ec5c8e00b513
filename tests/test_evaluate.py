"""Retrieval metrics against hand-computed values, the retrieval set of a split, and evaluate.py's CLI."""
import math
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_user_error, call_main, write_config

import demo
import evaluate
import metrics
import tokenize_data_qwen
from config import load_config
from data import load_splits, token_columns
from model import load_encoder, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def scores_ranking(n, order):
    """[n] scores under which the docs in `order` take ranks 1, 2, ... (the others follow)."""
    scores = torch.zeros(n)
    for rank, doc in enumerate(order):
        scores[doc] = 1.0 - rank / n
    return scores


def test_metrics_relevant_at_rank_1_3_and_11():
    n = 12
    scores = torch.stack([scores_ranking(n, [4]),                      # doc 4: rank 1
                          scores_ranking(n, [0, 1, 7]),                # doc 7: rank 3
                          scores_ranking(n, [d for d in range(n) if d != 2][:10] + [2])])  # doc 2: rank 11
    m = metrics.retrieval_metrics(scores, [[4], [7], [2]])
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    # k moves the cut-off: at k=11 the third query's doc at rank 11 counts
    m11 = metrics.retrieval_metrics(scores, [[4], [7], [2]], k=11)
    assert m11["mrr@11"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)


def test_metrics_two_relevant_docs():
    n = 12
    scores = torch.stack([scores_ranking(n, [0, 5, 1, 6]),         # relevant 5 and 6: ranks 2 and 4
                          scores_ranking(n, list(range(n))[::-1])])  # relevant 10 (rank 2) and 0 (rank 12)
    m = metrics.retrieval_metrics(scores, [[5, 6], [10, 0]])
    ideal = 1 + 1 / math.log2(3)
    ndcg = [(1 / math.log2(3) + 1 / math.log2(5)) / ideal, (1 / math.log2(3)) / ideal]
    assert m["ndcg@10"] == pytest.approx(sum(ndcg) / 2)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@10"] == pytest.approx((1 + 0.5) / 2)
    # a query with one relevant doc beside one with two: the padding of the shorter list is not counted
    m = metrics.retrieval_metrics(scores, [[5, 6], [11]])
    assert m["recall@10"] == pytest.approx(1.0) and m["ndcg@10"] == pytest.approx((ndcg[0] + 1) / 2)


def test_ties_count_against_the_relevant_docs():
    # all four docs tie: the relevant one ranks 4th, whatever its index
    for relevant in (0, 3):
        m = metrics.retrieval_metrics(torch.zeros(1, 4), [[relevant]])
        assert m == pytest.approx({"ndcg@10": 1 / math.log2(5), "mrr@10": 0.25, "recall@10": 1.0})
    # two relevant docs tied with two irrelevant ones take ranks 3 and 4
    m = metrics.retrieval_metrics(torch.zeros(1, 4), [[0, 1]])
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert m["mrr@10"] == pytest.approx(1 / 3)
    # a partial tie: doc 2 ties doc 1 for second place and goes below it; the order of docs does not matter
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    assert metrics.retrieval_metrics(scores, [[2]])["mrr@10"] == pytest.approx(1 / 3)
    assert metrics.retrieval_metrics(scores[:, [2, 1, 0, 3]], [[0]])["mrr@10"] == pytest.approx(1 / 3)
    # NaN scores (a broken model) rank last, not first
    nan = torch.full((1, 12), float("nan"))
    assert metrics.retrieval_metrics(nan, [[0]]) == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0}


def test_retrieval_set_dedups_docs_and_keeps_each_querys_positive():
    split = datasets.Dataset.from_dict({
        "query_input_ids": [[1, 0], [2, 0], [3, 0]],
        "passage_input_ids": [[10, 0], [11, 0], [14, 0]],
        "negative_2_input_ids": [[12, 0], [13, 0], [12, 0]],  # columns out of order: negative_1 comes first
        "negative_1_input_ids": [[11, 0], [10, 0], [10, 0]],
    })
    queries, docs, relevant = metrics.retrieval_set(split)
    assert queries == [[1, 0], [2, 0], [3, 0]]
    # row 0's negative [11, 0] is row 1's positive: one document, relevant to row 1 only
    assert docs == [[10, 0], [11, 0], [12, 0], [13, 0], [14, 0]]
    assert relevant == [[0], [1], [4]]
    queries, docs, relevant = metrics.retrieval_set(split, max_queries=2)
    assert queries == [[1, 0], [2, 0]] and docs == [[10, 0], [11, 0], [12, 0], [13, 0]] and relevant == [[0], [1]]


def test_format_table_rows_mean_and_the_demo_parses_it():
    results = {"a": {"ndcg@10": 0.5, "mrr@10": 0.25, "recall@10": 1.0},
               "natural_questions": {"ndcg@10": 0.3, "mrr@10": 0.75, "recall@10": 0.5}}
    table = evaluate.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "nDCG@10", "MRR@10", "recall@10"]
    assert [line.split() for line in lines[1:]] == [["a", "0.5000", "0.2500", "1.0000"],
                                                     ["natural_questions", "0.3000", "0.7500", "0.5000"],
                                                     ["mean", "0.4000", "0.5000", "0.7500"]]
    assert demo.mean_mrr("skip imdb: ...\n" + table + "\n") == 0.5


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory):
    """A config that holds out 20% (12 of the 60 rows per retrieval dataset) with seed 3."""
    tmp = tmp_path_factory.mktemp("eval_config")
    return write_config(tmp / "config.json", model_path="unused", train_data_path="unused",
                        cache_dir=str(tmp / "cache"), validation_fraction=0.2, seed=3)


def test_validation_rows_are_load_splits_rows_for_tokenized_and_raw_files(tiny, tokenized, eval_config):
    cfg = load_config(eval_config)
    tokenizer = load_tokenizer(f"{tiny}/backbone")
    path = f"{tokenized}/msmarco.parquet"
    # what training holds out of a retrieval dataset: 20% of 60 rows, raised to min_eval_queries (at most half)
    want = load_splits(path, token_columns(path, 0), cfg, cfg.min_eval_queries)[1].with_format("arrow")[:]
    assert want.num_rows == 30
    raw_path = f"{tiny}/raw/msmarco.parquet"
    for file in (path, raw_path):
        for max_queries in (5, None):
            rows = evaluate.eval_rows(file, evaluate.columns_of(file), cfg, "validation", max_queries, tokenizer, 64)
            got = rows.with_format("arrow")[:]
            assert got.num_rows == (max_queries or 30), file
            for column in ("query_input_ids", "passage_input_ids", "negative_10_input_ids"):
                assert got.column(column).to_pylist() == want.column(column).to_pylist()[:got.num_rows], (file, column)


def test_v2_files_give_the_v1_rows(tiny, tokenized, eval_config, tmp_path):
    out = tmp_path / "v2"
    proc = call_main(tokenize_data_qwen.main, ["--model_path", f"{tiny}/backbone", "--input_dir", f"{tiny}/raw",
                                               "--output_dir", str(out), "--max_seq_length", "64", "--num_proc", "1",
                                               "--layout", "v2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = load_config(eval_config)
    paths = [f"{folder}/natural_questions.parquet" for folder in (tokenized, out)]
    for split in ("validation", "all"):
        v1, v2 = (evaluate.eval_rows(path, evaluate.columns_of(path), cfg, split, 7, None, 64).with_format("arrow")[:]
                  for path in paths)
        assert v2.column_names == v1.column_names and v2.num_rows == 7
        for column in v1.column_names:
            assert v2.column(column).to_pylist() == v1.column(column).to_pylist(), (split, column)


def test_cli_tokenized_and_raw_data_give_the_same_table(tiny, tokenized, eval_config):
    args = [f"{tiny}/backbone", "--config", eval_config, "--max_seq_length", "64"]
    from_tokens = call_main(evaluate.main, [args[0], tokenized, *args[1:]])
    from_raw = call_main(evaluate.main, [args[0], f"{tiny}/raw", *args[1:]])
    assert from_tokens.returncode == 0, from_tokens.stderr
    assert from_raw.returncode == 0, from_raw.stderr
    assert from_raw.stdout == from_tokens.stdout
    out = from_tokens.stdout
    assert "skip banking77: a clustering dataset" in out and "skip imdb: a classification dataset" in out
    assert "msmarco: 30 queries (validation rows) ranked against" in out  # 20%, raised to min_eval_queries
    # the numbers are those of the rows training holds out for validation
    cfg, encoder = load_config(eval_config), load_encoder(f"{tiny}/backbone", max_seq_length=64)
    want = {}
    for name in ("msmarco", "natural_questions"):
        path = f"{tokenized}/{name}.parquet"
        held_out = load_splits(path, token_columns(path, 0), cfg, cfg.min_eval_queries)[1]
        want[name] = evaluate.evaluate_split(encoder, held_out)[0]
    assert out.endswith(evaluate.format_table(want) + "\n")


def test_cli_split_all_caps_queries_and_evaluates_unknown_names(tiny, tmp_path):
    shutil.copy(f"{tiny}/eval/people.parquet", tmp_path / "people.parquet")  # not in dataset_types.json
    proc = call_main(evaluate.main, [f"{tiny}/backbone", str(tmp_path), "--split", "all", "--max_queries", "7"])
    assert proc.returncode == 0, proc.stderr
    assert "people: 7 queries (all rows) ranked against" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines()[-3:]] == ["dataset", "people", "mean"]
    assert 0 <= demo.mean_mrr(proc.stdout) <= 1


def write_rows(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_cli_errors_are_one_line(tiny, tmp_path):
    backbone = f"{tiny}/backbone"
    assert_user_error(call_main(evaluate.main, [str(tmp_path / "nope"), str(tmp_path)]), "checkpoint", "not found")
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path / "nope")]), "nope", "not found")
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path)]), "no *.parquet files")
    (tmp_path / "texts").mkdir()
    write_rows(tmp_path / "texts" / "reviews.parquet", text=["a", "b"], label=["x", "y"])
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path / "texts")]), "reviews.parquet",
                      "no column 'query'")
    (tmp_path / "no_passage").mkdir()
    write_rows(tmp_path / "no_passage" / "msmarco.parquet", query=["a", "b"], negative_1=["x", "y"])
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path / "no_passage")]), "msmarco.parquet",
                      "no column 'passage'")
    (tmp_path / "classification").mkdir()
    write_rows(tmp_path / "classification" / "imdb.parquet", query=["a", "b"], passage=["x", "y"])
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path / "classification")]),
                      "no retrieval dataset")
    (tmp_path / "foreign").mkdir()  # tokenized with another, larger vocabulary
    ids = [[5, 99999], [6, 1]]
    write_rows(tmp_path / "foreign" / "msmarco.parquet", query_input_ids=ids, passage_input_ids=ids)
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path / "foreign"), "--split", "all"]),
                      "msmarco.parquet", "token id 99999 outside the model's vocabulary")
    assert_user_error(call_main(evaluate.main, [backbone, str(tmp_path), "--max_queries", "-1"]), "--max_queries")
