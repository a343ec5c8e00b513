"""A synthetic token-length distribution like F2LLM's training data, and batches drawn from it.

Lengths count tokens of a tokenized text *including* the eos appended to it, so they are what
tokenize_data_qwen.py writes (at most max_len = max_seq_length tokens: 1023 of text + eos).

Queries:   lognormal, median 22 tokens, sigma 0.55, clipped to [8, max_len]
           -> mostly 10-60 tokens (web search questions, titles, short sentences).
Documents: lognormal, median 200 tokens, sigma 0.95, clipped to [16, max_len]
           -> long-tailed from ~50 to the cap; the ~4% of documents longer than max_len are cut
           to exactly max_len, a visible mass at 1024 (passages, abstracts, forum posts).
Positives and hard negatives follow the document distribution, all lengths independent.

`scale` (default 1) multiplies both medians and the lower bounds: `scale=0.25, max_len=256` is
the same shape at a quarter of the length (same fraction at the cap), for small CPU runs.

Summary (`python bench/lengths.py`, 200,000 draws each, max_len 1024, seed 0):

    kind       p5   p25   p50   p75   p95   p99   mean  at cap
    query       9    15    22    32    54    79   25.6   0.00%
    document   42   105   200   381   953  1024  288.8   4.28%

A batch of bs 16 queries x (2 + 7) sequences thus holds ~37,400 real tokens on average, while
padding its 144 sequences to the longest (almost always 1024) computes ~147,000.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse

import numpy as np
import pyarrow as pa


MAX_LEN = 1024
QUERY = {"median": 22.0, "sigma": 0.55, "low": 8}
DOCUMENT = {"median": 200.0, "sigma": 0.95, "low": 16}
# The demo tokenizers' special ids: <|endoftext|> 0 (pad), <|im_start|> 1, <|im_end|> 2 (eos).
PAD_ID, EOS_ID = 0, 2
FIRST_TEXT_ID = 3


def sample_lengths(rng, n, kind="document", max_len=MAX_LEN, scale=1.0):
    """n token lengths (eos included) of queries or documents: an int64 array in [low, max_len]."""
    params = {"query": QUERY, "document": DOCUMENT}[kind]
    raw = rng.lognormal(np.log(params["median"] * scale), params["sigma"], n)
    low = max(2, round(params["low"] * scale))
    return np.clip(np.round(raw), low, max_len).astype(np.int64)


def token_list_array(rng, lengths, vocab_size, eos_id=EOS_ID):
    """A list<int32> Arrow array of random text ids in [FIRST_TEXT_ID, vocab_size), each list
    ending in eos_id, with the given lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(FIRST_TEXT_ID, vocab_size, int(offsets[-1]), dtype=np.int32)
    values[offsets[1:] - 1] = eos_id
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def sample_table(num_rows, num_negatives=24, seed=0, vocab_size=8000, max_len=MAX_LEN, scale=1.0, eos_id=EOS_ID):
    """num_rows rows in the F2LLM tokenized layout: query_input_ids, passage_input_ids,
    negative_1_input_ids ... negative_{num_negatives}_input_ids (list<int32>, each ending in eos)."""
    rng = np.random.default_rng(seed)
    columns = {"query_input_ids": token_list_array(
        rng, sample_lengths(rng, num_rows, "query", max_len, scale), vocab_size, eos_id)}
    for name in ["passage"] + [f"negative_{i}" for i in range(1, num_negatives + 1)]:
        columns[f"{name}_input_ids"] = token_list_array(
            rng, sample_lengths(rng, num_rows, "document", max_len, scale), vocab_size, eos_id)
    return pa.table(columns)


def sample_batch(bs=16, num_negatives=7, seed=0, **kwargs):
    """One batch's rows: bs queries x (2 + num_negatives) sequences, as an Arrow table."""
    return sample_table(bs, num_negatives, seed, **kwargs)


def summary(n=200_000, max_len=MAX_LEN, scale=1.0, seed=0):
    """{kind: {p5, p25, p50, p75, p95, p99, mean, at_cap}} of n draws."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in ("query", "document"):
        x = sample_lengths(rng, n, kind, max_len, scale)
        row = {f"p{q}": int(np.percentile(x, q)) for q in (5, 25, 50, 75, 95, 99)}
        row["mean"] = float(x.mean())
        row["at_cap"] = float((x == max_len).mean())
        out[kind] = row
    return out


def summary_table(stats):
    header = ["kind", "p5", "p25", "p50", "p75", "p95", "p99", "mean", "at cap"]
    rows = [[kind] + [s[f"p{q}"] for q in (5, 25, 50, 75, 95, 99)] + [f"{s['mean']:.1f}", f"{100 * s['at_cap']:.2f}%"]
            for kind, s in stats.items()]
    return benchutil.table(header, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the synthetic F2LLM-like length distribution.")
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args(argv)
    stats = summary(max_len=args.max_len, scale=args.scale)
    print(f"token lengths incl. eos (200,000 draws, max_len {args.max_len}, scale {args.scale}):")
    print(summary_table(stats))
    bs, k = 16, 7
    real = bs * (stats["query"]["mean"] + (1 + k) * stats["document"]["mean"])
    print(f"expected real tokens per batch of {bs} x (2 + {k}): {real:,.0f}")
    benchutil.print_json(stats)
    return stats


if __name__ == "__main__":
    main()
