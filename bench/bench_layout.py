"""Figure 6: the v2 tokenized layout against v1: bytes on disk, and the cost of resolving its ids.

Corpora: bench_tokenize's generated ones, 24 hard negatives per row; the saving depends on how
often a document repeats across rows, so three points:
- "F2LLM-like": negatives are other rows' passages or negative-only passages, from a pool of
  2 x rows unique passages, each appearing ~12.5 times (bench_tokenize's corpus).
- "pool 10x": the same from a pool of 10 x rows passages, each appearing ~2.5 times.
- "unique": every text distinct, the worst case for v2 (its int64 ids come on top of the tokens).

Both layouts are written by `tokenize_data_qwen.py` itself (--layout v1 / v2, same tokenizer and
max len). Sizes compared: the v1 file (what the script writes: texts plus token lists), the v1
token columns alone (rewritten with the same pyarrow defaults), and v2 (query file + corpus).

Data path: both files loaded as training loads them (data.load_splits), then the same batches
(bs 16, 7 of the 24 negatives, shuffled indices) fetched and collated; v2's fetch adds one Arrow
lookup into the corpus. The two must give identical batches before they are timed; the median
ms per batch counts.

Corpus lookup against corpus size: a batch's 16 x 25 document ids looked up in synthetic corpora
of 10k to 400k documents (50-400 tokens, in 1000-row chunks as `datasets` memory-maps them), by
data.CorpusRows.take_documents (one slice per id) and by Arrow's take on the chunked column.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
import types

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import tokenize_data_qwen
from bench_tokenize import make_corpus
from data import CorpusRows, collate, corpus_path, load_splits, rows_of, token_columns
from demo import build_tokenizer

CORPORA = {"f2llm_like": (False, 2), "pool10": (False, 10), "unique": (True, 0)}  # name -> (unique, pool_factor)
LABELS = {"f2llm_like": "F2LLM-like (pool 2x rows)", "pool10": "pool 10x rows", "unique": "unique texts"}


def tokenize(raw_dir, model_path, out_dir, layout, max_len, num_proc):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tokenize_data_qwen.tokenize_folder(model_path, raw_dir, out_dir, max_seq_length=max_len, num_proc=num_proc,
                                           layout=layout)


def sizes(v1_dir, v2_dir, name, work_dir):
    v1_path = os.path.join(v1_dir, f"{name}.parquet")
    table = pq.read_table(v1_path)
    tokens_only = os.path.join(work_dir, f"{name}.tokens.parquet")
    pq.write_table(table.select([c for c in table.column_names if c.endswith("_input_ids")]), tokens_only)
    v2_path = os.path.join(v2_dir, f"{name}.parquet")
    v2_corpus = corpus_path(v2_path)
    return {"v1_bytes": os.path.getsize(v1_path), "v1_token_bytes": os.path.getsize(tokens_only),
            "v2_bytes": os.path.getsize(v2_path) + os.path.getsize(v2_corpus),
            "v2_corpus_rows": pq.ParquetFile(v2_corpus).metadata.num_rows}


def fetch_ms(splits, num_batches, bs, num_neg, max_len, eos_id, seed):
    """Median ms per batch (fetch + collate) of each layout, the same batches for both."""
    rng = np.random.default_rng(seed)
    n = min(len(s) for s in splits.values())
    order = [rng.permutation(n)[:bs] for _ in range(num_batches)]
    rows = {k: rows_of(s) for k, s in splits.items()}
    for idx in order[:3]:  # warm-up, and the two layouts must agree
        out = {k: collate(r.__getitems__(idx), num_neg=num_neg, max_seq_length=max_len, eos_id=eos_id,
                          rng=np.random.default_rng(0)) for k, r in rows.items()}
        assert all(out["v1"][key].equal(out["v2"][key]) for key in ("input_ids", "lengths")), "v1 and v2 differ"
    times = {k: [] for k in rows}
    for i, idx in enumerate(order):
        for k in (("v1", "v2") if i % 2 == 0 else ("v2", "v1")):
            t0 = time.perf_counter()
            collate(rows[k].__getitems__(idx), num_neg=num_neg, max_seq_length=max_len, eos_id=eos_id,
                    rng=np.random.default_rng(i))
            times[k].append(1000 * (time.perf_counter() - t0))
    return {f"{k}_ms": statistics.median(v) for k, v in times.items()}


def lookup_ms(sizes, num_ids=16 * 25, repeats=20, seed=0):
    """{corpus size: (ms per batch of Arrow's chunked take, ms of take_documents)}, results checked equal."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        lengths = rng.integers(50, 401, n)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        docs = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 8000, lengths.sum(), dtype=np.int32)))
        chunked = pa.chunked_array([docs.slice(i, 1000) for i in range(0, n, 1000)])
        rows = CorpusRows(datasets.Dataset.from_dict({"query_input_ids": [[0]]}), chunked)
        ids = rng.integers(0, n, num_ids)
        assert rows.take_documents(ids).equals(chunked.take(pa.array(ids)).combine_chunks())
        arrow = min(benchutil.timed(chunked.take, pa.array(ids))[1] for _ in range(repeats))
        ours = min(benchutil.timed(rows.take_documents, ids)[1] for _ in range(repeats))
        out[n] = (1000 * arrow, 1000 * ours)
    return out


def run(quick=False, num_rows=None, num_batches=None, bs=16, num_neg=7, max_len=1024, seed=0):
    num_rows = num_rows or (400 if quick else 2000)
    num_batches = num_batches or (100 if quick else 300)
    num_proc = min(os.cpu_count() or 1, 8)
    result = {"rows": num_rows, "bs": bs, "num_neg": num_neg, "max_len": max_len}
    with tempfile.TemporaryDirectory() as work:
        raw, v1_dir, v2_dir, model_path = (os.path.join(work, d) for d in ("raw", "v1", "v2", "model"))
        os.makedirs(raw)
        texts = {}
        for i, (name, (unique, pool_factor)) in enumerate(CORPORA.items()):
            table = make_corpus(num_rows, unique=unique, seed=seed + i, pool_factor=pool_factor)
            pq.write_table(table, os.path.join(raw, f"{name}.parquet"))
            texts.update(dict.fromkeys(t for col in table.columns for t in col.to_pylist()))
        tokenizer = build_tokenizer(model_path, list(texts), vocab_size=8000)
        for layout, out in (("v1", v1_dir), ("v2", v2_dir)):
            tokenize(raw, model_path, out, layout, max_len, num_proc)
        cfg = types.SimpleNamespace(cache_dir=os.path.join(work, "cache"), validation_fraction=0.01, seed=seed,
                                    model_path=model_path, max_seq_length=max_len)
        for name in CORPORA:
            r = sizes(v1_dir, v2_dir, name, work)
            r["raw_bytes"] = os.path.getsize(os.path.join(raw, f"{name}.parquet"))
            r["documents"] = num_rows * 25
            splits = {}
            for layout, folder in (("v1", v1_dir), ("v2", v2_dir)):
                path = os.path.join(folder, f"{name}.parquet")
                splits[layout], _ = load_splits(path, token_columns(path, num_neg), cfg)
            r.update(fetch_ms(splits, num_batches, bs, num_neg, max_len, tokenizer.eos_token_id, seed))
            r["v2_over_v1"] = r["v2_bytes"] / r["v1_bytes"]
            r["v2_over_v1_tokens"] = r["v2_bytes"] / r["v1_token_bytes"]
            r["fetch_ratio"] = r["v2_ms"] / r["v1_ms"]
            result[name] = r
    result["lookup_ms"] = lookup_ms((10_000, 100_000) if quick else (10_000, 100_000, 400_000))
    result["v2_over_v1_tokens_f2llm_like"] = result["f2llm_like"]["v2_over_v1_tokens"]
    return result


def mib(n):
    return f"{n / 2**20:.2f}"


def report(result):
    rows = []
    for name, label in LABELS.items():
        r = result[name]
        rows.append([label, f"{r['documents']:,} / {r['v2_corpus_rows']:,}", mib(r["raw_bytes"]), mib(r["v1_bytes"]),
                     mib(r["v1_token_bytes"]), mib(r["v2_bytes"]), f"{r['v2_over_v1']:.2f}",
                     f"{r['v2_over_v1_tokens']:.2f}", f"{r['v1_ms']:.2f} / {r['v2_ms']:.2f}",
                     f"{r['fetch_ratio']:.2f}"])
    return (f"Figure 6: v2 layout vs v1, {result['rows']} rows x 24 negatives, max len {result['max_len']}; "
            f"fetch + collate of bs {result['bs']} x 7 negatives\n"
            + benchutil.table(["corpus", "doc cells / corpus rows", "raw MiB", "v1 MiB", "v1 tokens MiB", "v2 MiB",
                               "v2/v1", "v2/v1 tokens", "ms/batch v1 / v2", "v2/v1 time"], rows)
            + "\n\ncorpus lookup of 400 ids, ms: Arrow's take on the chunked column vs take_documents\n"
            + benchutil.table(["documents", "chunked take", "take_documents", "ratio"],
                              [[f"{n:,}", f"{a:.2f}", f"{o:.2f}", f"{a / o:.1f}x"]
                               for n, (a, o) in result["lookup_ms"].items()]))


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description="Figure 6: v2 layout vs v1."))
    p.add_argument("--num_rows", type=int, default=None)
    args = p.parse_args(argv)
    return benchutil.emit(run(args.quick, args.num_rows), report)


if __name__ == "__main__":
    main()
