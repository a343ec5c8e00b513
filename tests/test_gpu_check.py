"""bench/gpu_check.py --tiny through the launch the GPU check is run with (`accelerate launch` with the
published ZeRO-2 yaml, 1 process), on the CPU: the JSON's fields and values, its FLOP count and MFU
against a count made here by hand; and the batch search's policy (doubling, bisecting, a fresh
engine after an out-of-memory try, the time and size caps) with an engine that runs out of memory
on cue, since no CPU run reaches the GPU's out-of-memory path."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from config import Config
from conftest import BIN, REPO_DIR, free_port, launch_env

ZERO2 = os.path.join(REPO_DIR, "configs/accelerate_config.yaml")
PEAK_TFLOPS = 1.0  # a CPU has no default peak; any peak gives an MFU to check against the formula
# --tiny's model and batches, as the test expects them.
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=192)
BS, NUM_NEG, STEPS, MAX_BATCH = 4, 7, 2, 8


@pytest.fixture(scope="module")
def check(tmp_path_factory, deepspeed_op):
    """(the JSON, stdout, seconds) of docs/speed-and-memory.md's command with --tiny."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", ZERO2, "--num_processes", "1",
           "--main_process_port", free_port(), "bench/gpu_check.py", "--tiny", "--peak_tflops", str(PEAK_TFLOPS),
           "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_DIR, env=launch_env(), capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"gpu_check --tiny through accelerate launch: {seconds:.0f} s")
    with open(out) as f:
        return json.load(f), proc.stdout, seconds


def hand_non_embedding_params(m):
    """Qwen3 without bias: q, k, v, o projections, q and k norms (head_dim each), a gated MLP of three
    matrices, two norms per layer, and the final norm. The tiny shape: 4096 + 2048 + 2048 + 4096 + 32 +
    36864 + 128 = 49312 per layer, x 2 + 64 = 98688."""
    q = m["num_attention_heads"] * m["head_dim"]
    kv = m["num_key_value_heads"] * m["head_dim"]
    h = m["hidden_size"]
    layer = h * q + 2 * h * kv + q * h + 2 * m["head_dim"] + 3 * h * m["intermediate_size"] + 2 * h
    return m["num_hidden_layers"] * layer + h


def hand_flops(seq_lengths, padded):
    longest = max(seq_lengths)
    tokens = len(seq_lengths) * longest if padded else sum(seq_lengths)
    pairs = len(seq_lengths) * longest**2 if padded else sum(n * n for n in seq_lengths)
    per_pair = 12 * 2 * 4 * 16  # 12 x layers x heads x head_dim: QK^T and AV, 2 FLOPs per MAC, x3 for backward
    return 6 * 98688 * tokens + per_pair * pairs, tokens


@pytest.mark.breadth  # a launch of the benchmark on the CPU
def test_tiny_check_fields_and_values(check):
    result, stdout, _ = check
    env = result["environment"]
    assert {"python", "torch", "transformers", "accelerate", "deepspeed", "flash_attn", "device"} <= env.keys()
    assert env["torch"] == torch.__version__ and env["device"]
    assert (env["distributed_type"], env["mixed_precision"], env["num_processes"]) == ("DEEPSPEED", "bf16", 1)
    assert result["tiny"] and result["model"]["gradient_checkpointing"] and result["model"]["dtype"] == "bfloat16"
    assert {key: result["model"][key] for key in TINY} == TINY

    packed, padded = result["layouts"]["packed"], result["layouts"]["padded"]
    assert (packed["attn_implementation"], padded["attn_implementation"]) == ("sdpa_varlen", "sdpa")
    for layout in (packed, padded):
        assert len(layout["step_seconds"]) == STEPS and all(s > 0 for s in layout["step_seconds"])
        assert layout["real_tokens_per_s"] > 0 and layout["achieved_tflops"] > 0
        assert layout["peak_memory_bytes"] > 0 and layout["final_loss"] > 0
        assert 0 < layout["mfu"] < 1 and 0 < layout["mfu_real"] <= layout["mfu"]
    assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"]  # the same batches
    assert packed["computed_tokens_per_step"] == packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] > packed["computed_tokens_per_step"]
    assert result["speedup_packed_vs_padded"] > 0
    assert result["memory_kind"].startswith("peak RSS")

    agree = result["embedding_agreement"]
    assert agree["dtype"] == "bfloat16"
    assert agree["min_cosine"] > 0.999
    assert agree["max_abs_diff"] <= 0.05 * agree["max_abs_value"]  # a few bf16 steps at the largest values

    search = result["batch_search"]
    plain, cached = search["plain"], search["cached"]
    assert plain["fits"] >= 1 and cached["fits"] >= plain["fits"]
    # nothing runs out of memory at these sizes: doubling from 1 up to the cap, then the cached step at it
    assert [t["batch_size"] for t in plain["tries"]] == [1, 2, 4, 8]
    assert [t["batch_size"] for t in cached["tries"]] == [MAX_BATCH]
    assert all(t["fits"] for t in plain["tries"] + cached["tries"])
    assert plain["fits"] == cached["fits"] == MAX_BATCH == search["max_batch"]
    assert plain["stopped_by"] == cached["stopped_by"] == "max_batch"
    assert "packed vs padded" in stdout and "largest batch" in stdout


@pytest.mark.breadth
def test_tiny_check_flops_and_mfu_by_hand(check):
    result = check[0]
    assert result["model"]["non_embedding_params"] == hand_non_embedding_params(TINY) == 98688
    assert result["model"]["params"] == 98688 + TINY["vocab_size"] * TINY["hidden_size"]  # one tied matrix
    batches = result["batches"]["measured_lengths"]
    assert len(batches) == STEPS and all(len(b) == BS * (2 + NUM_NEG) for b in batches)
    for name in ("packed", "padded"):
        layout = result["layouts"][name]
        flops, tokens = (sum(x) for x in zip(*(hand_flops(b, name == "padded") for b in batches)))
        real_flops = sum(hand_flops(b, padded=False)[0] for b in batches)
        assert layout["model_flops_per_step"] == pytest.approx(flops / STEPS, rel=1e-12)
        assert layout["real_model_flops_per_step"] == pytest.approx(real_flops / STEPS, rel=1e-12)
        assert layout["computed_tokens_per_step"] == tokens / STEPS
        seconds = sum(layout["step_seconds"])
        assert layout["mfu"] == pytest.approx(flops / seconds / (PEAK_TFLOPS * 1e12), rel=1e-9)
        assert layout["mfu_real"] == pytest.approx(real_flops / seconds / (PEAK_TFLOPS * 1e12), rel=1e-9)
        assert layout["real_tokens_per_s"] == pytest.approx(sum(map(sum, batches)) / seconds, rel=1e-9)


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.append(os.path.join(REPO_DIR, "bench"))
    import gpu_check

    return gpu_check


class FakeEngine:
    """A Training whose step runs out of memory above `limit` queries, as torch reports it on a GPU."""

    def __init__(self, limit):
        self.limit, self.closed, self.cfg = limit, False, None

    def step(self, batch):
        if batch["num_queries"] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.001, 1.0

    def close(self):
        self.closed = True


def searcher(gpu_check, limit, engines):
    class Search(gpu_check.BatchSearch):
        def rebuild(self):
            self.training = FakeEngine(limit)
            engines.append(self.training)
            return True

    def make(bs, seed):
        return {"lengths": torch.full((bs * 9,), 10), "num_queries": bs}

    engines.append(FakeEngine(limit))
    return Search(engines[0], None, Config(model_path="-", train_data_path="-"), make, tokens_per_query=90,
                  seconds_per_token=1e-9, build_seconds=0.0)


def test_batch_search_doubles_bisects_and_rebuilds_after_out_of_memory(gpu_check):
    engines = []
    search = searcher(gpu_check, 37, engines)
    plain = search.run(0, 16, 4096, time.monotonic() + 60)
    assert [t["batch_size"] for t in plain["tries"]] == [16, 32, 64, 48, 40, 36, 38]
    assert (plain["fits"], plain["fails"], plain["stopped_by"]) == (36, 38, None)
    # each failed try closes its engine; the next try gets a fresh one (none after the last, 38)
    assert len(engines) == 4 and all(e.closed for e in engines) and search.training is None
    cached = search.run(8, plain["fits"], 4096, time.monotonic() + 60)
    assert [t["batch_size"] for t in cached["tries"]] == [36, 72, 54, 45, 40, 38]
    assert cached["fits"] == 36 >= plain["fits"]
    assert engines[4].cfg.grad_cache_chunk_size == 8  # the fresh engine runs the cached step


def test_batch_search_stops_at_the_cap_and_the_deadline(gpu_check):
    capped = searcher(gpu_check, 10**9, []).run(0, 16, 100, time.monotonic() + 60)
    assert [t["batch_size"] for t in capped["tries"]] == [16, 32, 64, 100]
    assert (capped["fits"], capped["fails"], capped["stopped_by"]) == (100, None, "max_batch")
    late = searcher(gpu_check, 10**9, []).run(0, 16, 100, time.monotonic() - 1)
    assert (late["fits"], late["tries"], late["stopped_by"]) == (0, [], "time")
