"""bench/bench_families.py at its tiniest (hidden 16, 1 layer, bs 4 x (2 + 1), lengths up to 32, one
warm-up and one measured step): every decoder and encoder family is built, loaded through load_backbone
and trained on the same batches in both layouts (DeBERTa-v2 padded only), with the attention training
picks on the CPU, the packed and padded embeddings of the first batch agreeing, and a report and a JSON
line that hold every family (about 5 s on 2 cores)."""
import json
import os
import sys

import pytest
import torch

from conftest import REPO_DIR

sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
import bench_families  # noqa: E402

EXPECTED_ATTENTION = {family: {"packed": "sdpa_varlen", "padded": "sdpa"} for family in bench_families.FAMILIES}
EXPECTED_ATTENTION["gemma2"] = {"packed": "eager_varlen", "padded": "eager"}  # logit soft-capping: no SDPA
EXPECTED_ATTENTION["deberta-v2"] = {"padded": "eager"}  # its own attention, padded batches only


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: as fast, and no stall when the other core is busy
    try:
        return bench_families.run(hidden=16, layers=1, scale=0.05, max_len=32, warmup=1, steps=1, bs=4, num_neg=1,
                                  work_dir=str(tmp_path_factory.mktemp("bench_families")))
    finally:
        torch.set_num_threads(threads)


def test_every_family_trains_in_the_layouts_it_can_take(result):
    assert list(result["families"]) == bench_families.FAMILIES
    assert len(bench_families.FAMILIES) == 15
    for family, r in result["families"].items():
        assert r["attn_implementation"] == EXPECTED_ATTENTION[family], family
        assert r["layouts"] == list(EXPECTED_ATTENTION[family]), family
        assert r["kind"] == ("encoder" if family in ("bert", "roberta", "xlm-roberta", "distilbert", "electra",
                                                     "deberta-v2", "modernbert") else "decoder")
        assert r["pooling"] == {"decoder": "lasttoken", "encoder": "mean"}[r["kind"]]
        for layout in r["layouts"]:
            assert r[layout]["real_tokens_per_s"] > 0 and r[layout]["seconds_per_step"] > 0, (family, layout)
            assert r[layout]["final_loss"] == pytest.approx(r[layout]["final_loss"])  # finite
        if "packed" in r["layouts"]:
            assert r["first_batch_max_abs_diff"] < bench_families.AGREEMENT_ATOL, family
            assert r["train_speedup"] > 0
        else:
            assert r["train_speedup"] is None


def test_all_families_train_on_the_same_batches(result):
    tokens = {r["real_tokens_per_step"] for r in result["families"].values()}
    ratios = {round(r["padded_tokens_per_real_token"], 9) for r in result["families"].values()}
    assert len(tokens) == 1 and len(ratios) == 1
    assert ratios.pop() >= 1


def test_report_and_json(result):
    text = bench_families.report(result)
    assert text.startswith("Figure 10")
    for family in bench_families.FAMILIES:
        assert f"\n{family} " in text
    assert "padded only" in text  # DeBERTa-v2's row
    json.loads(json.dumps(result))
