"""Figure 2: time to build one training batch (bs 16, 7 negatives of 24, max len 1024).

The rows come from a real `datasets` split, made as training makes it (data.load_splits: a
parquet file loaded with `datasets.load_dataset`, memory-mapped from its cache, then a seeded
99/1 train_test_split, whose rows are reached through an indices mapping). The token lengths
follow bench/lengths.py. Batches are 16 shuffled row indices, as the DataLoader's sampler gives.

ours       data.collate on the batch's Arrow table (data.ArrowRows.__getitems__, what our
           DataLoader passes to collate_fn): vectorized Arrow / numpy, flat ids + lengths out.
published  re-implemented here from the published recipe: rows as Python dicts of token lists
           (what a `datasets` row fetch returns), random.sample of each query's negatives, each
           sequence cut to max len with its last token set to eos, the sequences joined with a
           quadratic list sum (`sum(list_of_lists, [])`), padded in Python into a list of lists
           and turned into a tensor by torch.tensor at the end.

Both are timed on the same batches, interleaved batch by batch; the figure is the median time
per batch. "collate" excludes the row fetch (rows fetched before the clock starts); "fetch +
collate" includes it (ours: ArrowRows.__getitems__; published: Dataset.__getitems__, what the
DataLoader calls on a `datasets.Dataset`, and also the older per-row `dataset[i]`). Ours returns
flat ids: the padded layout pads later, in the model (model.pad_flat), so "ours + pad_flat"
shows that cost too. Before timing, both are checked to give the same padded ids.
Goal: collate speedup >= 10x.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import gc
import os
import random
import tempfile
import time
import types

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch

import lengths
from data import ArrowRows, collate, load_splits
from model import pad_flat


def published_collate(rows, num_neg, max_len, eos_id, pad_id, num_available=24, picks=None):
    """The published batch building on a list of row dicts: ids [n, longest] (n = bs x (2 + k))."""
    if picks is None:
        picks = [random.sample(range(num_available), num_neg) for _ in rows]
    sequences = ([row["query_input_ids"] for row in rows] + [row["passage_input_ids"] for row in rows]
                 + [row[f"negative_{j + 1}_input_ids"] for row, p in zip(rows, picks) for j in p])
    cut = []
    for seq in sequences:
        seq = seq[:max_len]  # a copy
        seq[-1] = eos_id
        cut.append(seq)
    seq_lengths = [len(seq) for seq in cut]
    flat = sum(cut, [])  # noqa: RUF017  (published; quadratic: each + copies the list so far)
    longest = max(seq_lengths)
    padded, start = [], 0
    for n in seq_lengths:
        padded.append(flat[start : start + n] + [pad_id] * (longest - n))
        start += n
    return {"input_ids": torch.tensor(padded), "lengths": torch.tensor(seq_lengths)}


def make_split(work_dir, num_rows, max_len, seed=0):
    """The train split of a synthetic tokenized dataset, loaded as training loads it."""
    table = lengths.sample_table(num_rows, 24, seed=seed, max_len=max_len)
    path = os.path.join(work_dir, "synthetic.parquet")
    pq.write_table(table, path)
    cfg = types.SimpleNamespace(cache_dir=os.path.join(work_dir, "cache"), validation_fraction=0.01, seed=0,
                                model_path=work_dir, max_seq_length=max_len)  # no config.json: ids checked for int32
    train, _ = load_splits(path, table.column_names, cfg)
    return train


def batches(num_rows, bs, num_batches, seed):
    """num_batches lists of bs shuffled row indices (a new permutation each epoch), like a
    shuffled DataLoader's sampler."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < num_batches:
        perm = torch.randperm(num_rows, generator=g).tolist()
        out += [perm[i : i + bs] for i in range(0, num_rows - bs + 1, bs)]
    return out[:num_batches]


def check_same(train, idx, num_neg, max_len):
    ours = collate(ArrowRows(train).__getitems__(idx), num_neg=num_neg, max_seq_length=max_len,
                   eos_id=lengths.EOS_ID, rng=None)
    pub = published_collate(train.__getitems__(idx), num_neg, max_len, lengths.EOS_ID, lengths.PAD_ID,
                            picks=[list(range(num_neg))] * len(idx))
    assert torch.equal(ours["lengths"], pub["lengths"])
    assert torch.equal(pad_flat(ours["input_ids"], ours["lengths"], lengths.PAD_ID), pub["input_ids"])


def run(quick=False, num_batches=None, bs=16, num_neg=7, max_len=lengths.MAX_LEN, seed=0):
    num_batches = num_batches or (100 if quick else 500)
    num_rows = 1024 if quick else 4096
    datasets.disable_progress_bars()
    random.seed(seed)
    rng = np.random.default_rng(seed)
    times = {k: [] for k in ("ours_fetch", "ours_collate", "ours_pad", "pub_fetch", "pub_fetch_rows", "pub_collate")}
    real_tokens = 0
    with tempfile.TemporaryDirectory() as work_dir:
        train = make_split(work_dir, num_rows, max_len, seed)
        arrow_rows = ArrowRows(train)
        plan = batches(len(train), bs, num_batches + 3, seed)
        check_same(train, plan[0], num_neg, max_len)
        gc.collect()
        for i, idx in enumerate(plan):
            warm = i < 3
            t0 = time.perf_counter()
            table = arrow_rows.__getitems__(idx)
            t1 = time.perf_counter()
            ours = collate(table, num_neg=num_neg, max_seq_length=max_len, eos_id=lengths.EOS_ID, rng=rng)
            t2 = time.perf_counter()
            pad_flat(ours["input_ids"], ours["lengths"], lengths.PAD_ID)
            t3 = time.perf_counter()
            rows = train.__getitems__(idx)
            t4 = time.perf_counter()
            [train[j] for j in idx]
            t5 = time.perf_counter()
            published_collate(rows, num_neg, max_len, lengths.EOS_ID, lengths.PAD_ID)
            t6 = time.perf_counter()
            if warm:
                continue
            real_tokens += int(ours["lengths"].sum())
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                times[key].append(dt)
        del train, arrow_rows
    med = {k: benchutil.median(v) for k, v in times.items()}
    result = {
        "num_batches": num_batches, "bs": bs, "num_neg": num_neg, "max_len": max_len,
        "real_tokens_per_batch": real_tokens / num_batches,
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "mean_ms": {k: 1000 * float(np.mean(v)) for k, v in times.items()},
        "collate_speedup": med["pub_collate"] / med["ours_collate"],
        "collate_speedup_vs_ours_plus_pad": med["pub_collate"] / (med["ours_collate"] + med["ours_pad"]),
        "fetch_collate_speedup": (med["pub_fetch"] + med["pub_collate"]) / (med["ours_fetch"] + med["ours_collate"]),
        "fetch_rows_collate_speedup": (med["pub_fetch_rows"] + med["pub_collate"]) / (med["ours_fetch"]
                                                                                      + med["ours_collate"]),
    }
    result["goal_collate_ge_10x"] = result["collate_speedup"] >= 10
    return result


def report(result):
    m = result["median_ms"]
    rows = [
        ["collate", f"{m['ours_collate']:.2f}", f"{m['pub_collate']:.2f}", f"{result['collate_speedup']:.1f}x"],
        ["collate (ours + pad_flat)", f"{m['ours_collate'] + m['ours_pad']:.2f}", f"{m['pub_collate']:.2f}",
         f"{result['collate_speedup_vs_ours_plus_pad']:.1f}x"],
        ["fetch (ArrowRows / ds.__getitems__)", f"{m['ours_fetch']:.2f}", f"{m['pub_fetch']:.2f}",
         f"{m['pub_fetch'] / m['ours_fetch']:.1f}x"],
        ["fetch + collate", f"{m['ours_fetch'] + m['ours_collate']:.2f}", f"{m['pub_fetch'] + m['pub_collate']:.2f}",
         f"{result['fetch_collate_speedup']:.1f}x"],
        ["fetch + collate (pub: ds[i] per row)", f"{m['ours_fetch'] + m['ours_collate']:.2f}",
         f"{m['pub_fetch_rows'] + m['pub_collate']:.2f}", f"{result['fetch_rows_collate_speedup']:.1f}x"],
    ]
    return (f"Figure 2: batch building, median ms per batch ({result['num_batches']} batches of {result['bs']} x "
            f"(2 + {result['num_neg']}) of 24, max len {result['max_len']}, "
            f"{result['real_tokens_per_batch']:,.0f} real tokens per batch)\n"
            + benchutil.table(["step", "ours ms", "published ms", "speedup"], rows)
            + f"\ngoal collate >= 10x: {'met' if result['goal_collate_ge_10x'] else 'MISSED'}")


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description="Figure 2: collate time per batch."))
    p.add_argument("--num_batches", type=int, default=None)
    args = p.parse_args(argv)
    result = run(args.quick, args.num_batches)
    return benchutil.emit(result, report)


if __name__ == "__main__":
    main()
