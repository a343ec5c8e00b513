"""mteb_eval.py: mteb runs a local retrieval task built from our eval data and agrees with our own
nDCG@10 / MRR@10 / recall@10; bad input gives one clear line."""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_user_error, call_main

import mteb_eval
from metrics import retrieval_metrics
from model import load_encoder

pytestmark = pytest.mark.usefixtures("one_thread")
QUERY_PROMPT = "Instruct: find the person's biography\nQuery: "


@pytest.fixture(autouse=True)
def mteb_home(tmp_path, monkeypatch):
    """Keep mteb's default result cache out of the home folder."""
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb_cache"))


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """The tiny backbone with a query prompt, as a sentence-transformers checkpoint stores it."""
    path = str(tmp_path_factory.mktemp("mteb") / "checkpoint")
    shutil.copytree(f"{tiny}/backbone", path)
    with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"query": QUERY_PROMPT}}, f)
    return path


def reference_metrics(encoder, path, query_prompt, batch_size):
    """Our nDCG@10, MRR@10 and recall@10 (metrics.retrieval_metrics) on the file's queries against
    its distinct passages and negatives, from Encoder embeddings made as mteb_eval makes them (same
    batches, hence bit-identical scores: the random tiny model puts many within float noise of each
    other). Exact ties would be broken differently (mteb: by document id; ours: against the relevant
    document), so there must be none."""
    table = pq.read_table(path).to_pydict()
    docs = [c for c in table if c == "passage" or c.startswith("negative_")]
    corpus = sorted({t for c in docs for t in table[c]})
    relevant = [[corpus.index(t)] for t in table["passage"]]
    scores = (encoder.encode(table["query"], query_prompt, batch_size, convert_to_tensor=True)
              @ encoder.encode(corpus, None, batch_size, convert_to_tensor=True).T)
    positive = scores.gather(1, torch.tensor(relevant))
    assert (scores == positive).sum() == len(relevant), "exact ties: the metrics would depend on tie-breaking"
    return {key.replace("@", "_at_"): value for key, value in retrieval_metrics(scores, relevant).items()}


def test_local_task_agrees_with_our_metrics(tiny, checkpoint, tmp_path):
    out = tmp_path / "results"
    proc = call_main(mteb_eval.main, [checkpoint, "--local", f"{tiny}/eval", "--output_dir", str(out),
                                      "--batch_size", "64"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.load(open(out / "results" / "f2llm__checkpoint" / "local" / "people.json"))
    scores = saved["scores"]["test"][0]

    encoder = load_encoder(checkpoint)
    ours = reference_metrics(encoder, f"{tiny}/eval/people.parquet", "query", 64)
    for key, value in ours.items():
        assert scores[key] == pytest.approx(value, abs=1e-4), key
    assert 0.02 < ours["ndcg_at_10"] < 0.98  # neither trivial end, so a wrong ranking would show
    # the checkpoint's query prompt reached mteb's queries: without it the scores differ
    assert abs(reference_metrics(encoder, f"{tiny}/eval/people.parquet", None, 64)["mrr_at_10"]
               - scores["mrr_at_10"]) > 1e-3

    header, row = proc.stdout.splitlines()[:2]
    assert header.split() == ["task", "main", "score", "nDCG@10", "MRR@10", "recall@10"]
    assert row.split() == ["people", f"{scores['ndcg_at_10']:.4f}", "(ndcg_at_10)", f"{scores['ndcg_at_10']:.4f}",
                           f"{scores['mrr_at_10']:.4f}", f"{scores['recall_at_10']:.4f}"]


def test_named_task_without_retrieval_metrics(checkpoint, tmp_path, monkeypatch):
    """The path of a named task, on mteb's own offline STS mock (its scores are not retrieval metrics)."""
    from mteb.mocks.mock_tasks.sts import MockSTSTask

    monkeypatch.setattr(mteb_eval, "named_tasks", lambda names: [MockSTSTask()])
    proc = call_main(mteb_eval.main, [checkpoint, "--tasks", "MockSTSTask", "--output_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.load(open(tmp_path / "results" / "f2llm__checkpoint" / "local" / "MockSTSTask.json"))
    spearman = saved["scores"]["test"][0]["cosine_spearman"]
    assert proc.stdout.splitlines()[1].split() == ["MockSTSTask", f"{spearman:.4f}", "(cosine_spearman)", "-", "-", "-"]


def test_query_repeated_on_rows_has_all_its_passages_relevant(tmp_path):
    """One mteb query per distinct text; the corpus is every distinct passage and negative."""
    path = str(tmp_path / "dup.parquet")
    rows = [{"query": "q", "passage": "a", "negative_1": "c"},
            {"query": "q", "passage": "b", "negative_1": None},  # fewer negatives on this row
            {"query": "r", "passage": "c", "negative_1": "a"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert mteb_eval.read_retrieval_file(path) == (["q", "r"], ["a", "b", "c"], [[0, 1], [2]])


@pytest.mark.parametrize("case", ["missing checkpoint", "unknown task", "offline task", "no passage column"])
def test_bad_input_gives_one_line(tiny, tmp_path, case):
    args, fragments = {
        "missing checkpoint": ([str(tmp_path / "nope"), "--local", f"{tiny}/eval"], ["nope"]),
        "unknown task": ([f"{tiny}/backbone", "--tasks", "NoSuchTask"], ["NoSuchTask", "mteb available-tasks"]),
        # HF_HUB_OFFLINE=1 (conftest): the download fails at once, as it would with no network
        "offline task": ([f"{tiny}/backbone", "--tasks", "NFCorpus"], ["NFCorpus", "network"]),
        "no passage column": ([f"{tiny}/backbone", "--local", str(tmp_path)], ["bad.parquet", "'passage'"]),
    }[case]
    if case == "no passage column":
        pq.write_table(pa.Table.from_pylist([{"query": "q", "negative_1": "n"}]), tmp_path / "bad.parquet")
    proc = call_main(mteb_eval.main, [*args, "--output_dir", str(tmp_path / "out")])
    assert_user_error(proc, *fragments)
