"""Figure 1: tokens the backbone computes per real token, by batch layout.

Batches of bs 16 queries x (2 + 7) sequences (7 negatives picked from 24, as in training) are drawn
from the synthetic F2LLM-like length distribution (bench/lengths.py, max length 1024) and
collated by data.collate. Each collate output is then fed to model.Embedder in every layout
with a stub backbone that only records the shape of the input_ids it receives, so the counts are
what the Embedder actually computes, not a formula:

- packed:  our training default, all sequences in one row (varlen attention); no padding.
- grouped: queries and documents padded separately, each group to its own longest.
- padded:  the published layout, all n sequences right-padded to the longest (n x max len).

Ratio = sum of computed tokens / sum of real tokens over all batches (the per-batch mean is
printed too). Goal: packed <= 1.05.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import types

import numpy as np
import torch

import lengths
from data import collate
from config import BATCH_LAYOUTS as LAYOUTS
from model import Embedder


class ShapeRecorder(torch.nn.Module):
    """A stand-in backbone: records input_ids.numel() of every call, returns zero hidden states."""

    def __init__(self):
        super().__init__()
        self.computed = 0
        self.calls = 0

    def forward(self, input_ids, **kwargs):
        self.computed += input_ids.numel()
        self.calls += 1
        return types.SimpleNamespace(last_hidden_state=torch.zeros(1).expand(*input_ids.shape, 1))  # no allocation


def run(quick=False, num_batches=None, bs=16, num_neg=7, max_len=lengths.MAX_LEN, seed=0):
    num_batches = num_batches or (100 if quick else 1000)
    recorders = {layout: ShapeRecorder() for layout in LAYOUTS}
    embedders = {layout: Embedder(rec, layout=layout, pad_token_id=lengths.PAD_ID) for layout, rec in recorders.items()}
    rng = np.random.default_rng(seed)
    real_total, per_batch = 0, {layout: [] for layout in LAYOUTS}
    for i in range(num_batches):
        rows = lengths.sample_table(bs, 24, seed=seed * 1_000_003 + i, max_len=max_len)
        batch = collate(rows, num_neg=num_neg, max_seq_length=max_len, eos_id=lengths.EOS_ID, rng=rng)
        real = int(batch["lengths"].sum())
        assert len(batch["input_ids"]) == real and len(batch["lengths"]) == bs * (2 + num_neg)
        real_total += real
        for layout, embedder in embedders.items():
            before = recorders[layout].computed
            with torch.no_grad():
                out = embedder(batch["input_ids"], batch["lengths"], num_queries=bs)
            assert out.shape[0] == bs * (2 + num_neg)
            per_batch[layout].append((recorders[layout].computed - before) / real)
    result = {"num_batches": num_batches, "bs": bs, "num_neg": num_neg, "max_len": max_len,
              "real_tokens_per_batch": real_total / num_batches}
    for layout in LAYOUTS:
        result[layout] = {"tokens_per_real_token": recorders[layout].computed / real_total,
                          "mean_of_batches": float(np.mean(per_batch[layout])),
                          "worst_batch": float(np.max(per_batch[layout])),
                          "backbone_calls_per_batch": recorders[layout].calls / num_batches}
    result["goal_packed_le_1.05"] = result["packed"]["tokens_per_real_token"] <= 1.05
    return result


def report(result):
    names = {"packed": "packed (ours, default)", "grouped": "grouped (ours)", "padded": "padded (published)"}
    rows = [[names[layout], result[layout]["tokens_per_real_token"], result[layout]["mean_of_batches"],
             result[layout]["worst_batch"], result[layout]["backbone_calls_per_batch"]] for layout in LAYOUTS]
    return (f"Figure 1: computed tokens per real token ({result['num_batches']} batches of {result['bs']} x "
            f"(2 + {result['num_neg']}), max len {result['max_len']}, "
            f"{result['real_tokens_per_batch']:,.0f} real tokens per batch)\n"
            + benchutil.table(["layout", "tokens/real (all)", "mean of batches", "worst batch", "backbone calls"], rows)
            + f"\ngoal packed <= 1.05: {'met' if result['goal_packed_le_1.05'] else 'MISSED'}")


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description="Figure 1: padding overhead by layout."))
    p.add_argument("--num_batches", type=int, default=None)
    args = p.parse_args(argv)
    result = run(args.quick, args.num_batches)
    return benchutil.emit(result, report)


if __name__ == "__main__":
    main()
