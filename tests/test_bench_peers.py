"""bench/bench_peers.py at its tiniest: what makes its comparison fair.

Before training, SentenceTransformer.encode of the ST export, FlagEmbedding's decoder-only embedder
(inference and training forward) and our encoder embed texts alike (same weights, pooling, eos and
cut: about 20 s). One epoch of ours-f2llm and st-mnrl on 32 short rows through the real commands:
ours-joint's loss on one batch is MNRL's with the same-text rule, both sides train the same steps on
the same rows (over a whole epoch they see exactly the same real tokens) and the measurements come
back sane (about a minute on 2 shared cores: five subprocesses start torch). FlagEmbedding's side
against ST's on a family's rows: the same rows, tokens and MRR (about 40 s). The data families:
what makes each hard is in its rows (no training, a few seconds)."""
import collections
import json
import os
import shutil
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO_DIR
from model import load_tokenizer

sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
import bench_peers  # noqa: E402


def copy_of(folder):
    return lambda path: shutil.copytree(folder, path, dirs_exist_ok=True)


def test_untrained_embeddings_agree(qwen3_tokenizer, tmp_path):
    backbone_dir, st_dir = bench_peers.build_models(str(tmp_path), hidden=16, layers=1,
                                                    tokenizer_builder=copy_of(qwen3_tokenizer))
    words = bench_peers.single_token_words(load_tokenizer(backbone_dir))
    paths = bench_peers.write_data(str(tmp_path), "long", words, 32, 16, 2)
    assert len(bench_peers.train_split(pq.read_table(paths["train"]))) == 32  # what run.py trains on
    queries, docs, relevant = bench_peers.heldout_set(paths["heldout"])
    long_text = " ".join(words[:700])  # cut at max_seq_length on both sides
    agreement = bench_peers.untrained_agreement(backbone_dir, st_dir, (queries, docs + [long_text], relevant))
    assert agreement["lowest_cosine"] > 0.9999
    assert agreement["flag_lowest_cosine"] > 0.9999 and agreement["flag_training_lowest_cosine"] > 0.9999
    assert agreement["flag_without_eos_lowest_cosine"] < 0.99  # what its embedder's own tokenizer load would do
    assert agreement["ours"] == pytest.approx(agreement["st"], abs=1e-6)
    assert agreement["ours"] == pytest.approx(agreement["flag"], abs=1e-6)


@pytest.mark.breadth  # the benchmark's own harness, training
def test_both_sides_train_alike(qwen3_tokenizer, tmp_path):
    sizes = {"short": (32, 2, 1), "num_neg": 2, "heldout": 16}
    result = bench_peers.run(sizes=sizes, regimes=("short",), variants=["ours-f2llm", "st-mnrl"], hidden=16,
                             layers=1, work_dir=str(tmp_path), tokenizer_builder=copy_of(qwen3_tokenizer))
    out = result["regimes"]["short"]
    untrained = out["untrained"]
    assert untrained["lowest_cosine"] > 0.9999
    assert untrained["ours"]["mrr@10"] == pytest.approx(untrained["st"]["mrr@10"], abs=1e-6)
    # ours' joint loss is MNRL with the same-text rule: on one batch, the same loss and gradient
    one_batch = out["one_batch"]
    assert one_batch["st-mnrl-mask"]["loss"] == pytest.approx(one_batch["ours-joint"]["loss"], rel=1e-5)
    assert one_batch["st-mnrl-mask"]["gradient_difference"] < 1e-4
    ours, st = out["variants"]["ours-f2llm"], out["variants"]["st-mnrl"]
    assert ours["steps"] == st["steps"] == 2 and ours["rows"] == st["rows"] == 32
    assert ours["real_tokens"] == st["real_tokens"] > 32 * 4  # query, positive, 2 negatives: the same texts
    assert ours["padding"] == 1.0 and st["padding"] >= 1.0
    for side in (ours, st):
        assert [p["step"] for p in side["curve"]] == [1, 2]
        assert 0 < side["curve"][0]["train_s"] < side["train_s"] < side["e2e_s"]
        assert all(0 <= p["mrr@10"] <= 1 and 0 <= p["ndcg@10"] <= 1 for p in side["curve"])
        assert side["peak_rss_mib"] > 100
    assert "ours-f2llm" in bench_peers.report(result)
    json.dumps(result)


@pytest.mark.breadth
def test_flag_side_trains_alike(qwen3_tokenizer, tmp_path):
    # FlagEmbedding's Trainer draws ST's batches (the same sampler and seed) and its in-batch loss over
    # every positive and hard negative is MNRL's: the same curve, to float rounding
    sizes = {"neardup": (32, 2, 1), "num_neg": 2, "heldout": 16}
    result = bench_peers.run(sizes=sizes, regimes=("neardup",), variants=["st-mnrl", "flag"], hidden=16, layers=1,
                             work_dir=str(tmp_path), tokenizer_builder=copy_of(qwen3_tokenizer))
    out = result["regimes"]["neardup"]
    assert out["untrained"]["flag_lowest_cosine"] > 0.9999
    st, flag = out["variants"]["st-mnrl"], out["variants"]["flag"]
    assert flag["steps"] == st["steps"] == 2 and flag["rows"] == st["rows"] == 32
    assert flag["real_tokens"] == st["real_tokens"] and flag["padding"] >= 1.0
    assert 0 < flag["train_s"] < flag["e2e_s"] and flag["peak_rss_mib"] > 100
    assert [p["mrr@10"] for p in flag["curve"]] == pytest.approx([p["mrr@10"] for p in st["curve"]], abs=1e-3)
    assert "flag" in bench_peers.report(result)


def test_families_are_hard_in_their_own_way(qwen3_tokenizer):
    words = bench_peers.single_token_words(load_tokenizer(qwen3_tokenizer))

    def rows(family, n=200):
        gen = bench_peers.TextGen.for_regime(0, words, family)
        return gen, gen.rows(n, family, 3)

    negatives = ["negative_1", "negative_2", "negative_3"]
    _, keyword = rows("keyword")
    for row in keyword:  # 2-4 words, every one in the positive, none in a negative
        query = row["query"].split()
        assert 2 <= len(query) <= 4 and set(query) <= set(row["passage"].split())
        assert not any(set(query) & set(row[c].split()) for c in negatives)
    gen, paraphrase = rows("paraphrase")
    shared = [len(set(r["query"].split()) & set(r["passage"].split()) & set(gen.rare)) for r in paraphrase]
    synonyms = [len(set(r["query"].split()) & set(gen.synonym.values())) for r in paraphrase]
    assert sum(synonyms) > 3 * sum(shared) > 0  # mostly synonyms of the positive's rare words
    _, needle = rows("needle")
    assert min(len(r["passage"].split()) for r in needle) >= 4 * 15  # at least 4 passages of 15+ words
    assert all(set(r["query"].split()) - set(bench_peers.QUESTION_WORDS) <= set(r["passage"].split()) for r in needle)
    gen, neardup = rows("neardup")
    for row in neardup:  # the positive with the query's rare words swapped (and one more where it has one)
        passage, keys = row["passage"].split(), set(row["query"].split()) & set(row["passage"].split()) & set(gen.rare)
        assert keys
        for c in negatives:
            negative = row[c].split()
            swapped = {p for p, n in zip(passage, negative) if p != n}
            assert len(negative) == len(passage) and keys <= swapped and not keys & set(negative)
    gen, zipf = rows("zipf", 400)
    topics = collections.Counter(max(range(64), key=lambda t: len(gen.topic_sets[t] & set(r["passage"].split())))
                                 for r in zipf)
    assert len(gen.topics) == 64 and topics.most_common(1)[0][1] > 10 * 400 / 64  # the head topic: over 10x uniform
