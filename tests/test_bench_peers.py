"""bench/bench_peers.py at its tiniest: what makes its comparison fair.

Before training, SentenceTransformer.encode of the ST export and our encoder embed texts alike
(same weights, pooling, eos and cut: about 15 s). One epoch of ours-f2llm and st-mnrl on 32 short
rows through the real commands: both sides train the same steps on the same rows (over a whole
epoch they see exactly the same real tokens) and the measurements come back sane (about a minute
on 2 shared cores: five subprocesses start torch)."""
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
    assert agreement["ours"] == pytest.approx(agreement["st"], abs=1e-6)


def test_both_sides_train_alike(qwen3_tokenizer, tmp_path):
    sizes = {"short": (32, 2, 1), "num_neg": 2, "heldout": 16}
    result = bench_peers.run(sizes=sizes, regimes=("short",), variants=["ours-f2llm", "st-mnrl"], hidden=16,
                             layers=1, work_dir=str(tmp_path), tokenizer_builder=copy_of(qwen3_tokenizer))
    out = result["regimes"]["short"]
    untrained = out["untrained"]
    assert untrained["lowest_cosine"] > 0.9999
    assert untrained["ours"]["mrr@10"] == pytest.approx(untrained["st"]["mrr@10"], abs=1e-6)
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
