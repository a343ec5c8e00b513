"""How the data pipeline's time and memory grow with the dataset's size: one retrieval dataset of
10k, 100k and 1M rows (--quick: 500, 5k and 400k), each row a query, a passage and 24 hard negatives.

Data: bench_tokenize's F2LLM-like corpus (its TextGen texts: queries of 4-16 words, passages of
~150 words, about 285 tokens with Qwen3's tokenizer) at any size: a pool of 2 x rows passages, the
first `rows` of them the rows' positives; each row's 24 negatives drawn without replacement from the
pool minus its own positive, so each passage appears ~12.5 times, as in make_corpus (whose per-row
np.delete costs time in rows squared; the draw here is the same without it). Raw files are written
10,000 rows at a time.

Layout: tokenized with `--layout v2` (a query file of document ids plus a corpus of the unique
documents), because v1 stores each row's own 26 token lists: ~7,200 tokens a row, so 29 GB of int32
ids at 1M rows, and as much again in the `datasets` cache; this machine's disk and time do not
allow that. v2 holds ~600 tokens a row (the corpus of 2 x rows documents plus the queries).

The largest size is tokenized only with --tokenize_all: writing its raw file (~26 GB of text, ~14 GB
on disk) and tokenizing its 2M distinct passages (~1.9 billion characters) take about half an hour
on 2 cores.
Memory no longer stops it: tokenize_data_qwen.py streams a file in chunks of --chunk_rows rows, its
memory bounded by the chunk, not by the file (it read the file whole until 2026-12-01: 4,661 MB anon
at 100k rows). Without the flag the largest size's tokenized files are the middle size's replicated
(10 times; --quick: 80) with distinct document ids (copy r's ids + r x the middle corpus's size;
doc_id the row position), so its rows have exactly the middle size's token lengths and duplication;
they are written in row groups as tokenize_data_qwen.py writes them. The output and the JSON say so.

Stages, each in its own process, timed from the parent's clock before the process starts to its exit:
1. tokenize: the real CLI, `tokenize_data_qwen.py --layout v2 --num_proc <cores>`, with Qwen3's real
   tokenizer (demo.build_qwen3_tokenizer, 151,669 ids), max_seq_length 1024. texts/s counts every
   text cell (rows x 26) over the whole wall time, start-up included (imports, tokenizer load and,
   for inputs of at least --pool_min_chars characters, the worker pool: the `mode` column).
2. prepare: the real CLI, `run.py --config X --prepare_only`, with an empty cache_dir (the split
   cache of the query file and its corpus is built). `import run` alone is measured once: the fixed
   part of that time.
3. loader: a child process (this script with --loader_stage) that loads the splits from the now
   warm cache (data.load_splits: "splits (warm)"), builds the training loader as run.py does
   (data.make_loader, data.MultiDatasetLoader; batch 16, 7 of 24 negatives, max 1024) and draws
   batches. First-batch latency is given both from the loader's creation (make_loader) to the first
   collated batch, and from the child process's start (the parent's time.time() before it starts to
   the child's at its first batch). The data-path cost per step is the median (and p90) over the next
   batches of fetch + collate (the loader's next batch: DatasetBatches.batch).

Memory of each stage: `max RSS`, the stage's ru_maxrss written by benchutil.with_peak_rss's launcher
(exact: its largest single process, reaped workers included; it counts the file pages of memory maps,
such as the `datasets` cache, that the process touched; not inflated by this process's own peak, which
a direct child's ru_maxrss inherits) and `anon`, the peak of the sum of RssAnon over the stage's
process tree (workers and the small launcher included), from /proc every 0.05 s: the memory the
processes hold themselves, file-backed memory maps excluded.

Checks: "linear or better": every time and anonymous memory grows with an exponent
log(y2 / y1) / log(n2 / n1) of at most 1.15 between successive sizes (0: constant, 1: linear; the
margin is for a loaded machine). "holds the token lists": a stage whose anonymous memory grows by at
least half the growth of the stored token ids (int32 bytes of the corpus and the queries) from the
first to the last size it ran at. Prepare's anonymous memory still grows slowly (exponent ~0.15): the
`datasets` conversion decodes one row group at a time (files.ROW_GROUP_BYTES, ~4x in memory) and the
allocators keep some of what it frees; the cache itself is memory-mapped.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench_tokenize import NUM_NEGATIVES, TextGen
from files import row_group_rows

FULL_SIZES, QUICK_SIZES = (10_000, 100_000, 1_000_000), (500, 5_000, 400_000)
MAX_SEQ_LENGTH = 1024
DATASET = "msmarco"  # a retrieval dataset of configs/dataset_types.json
WRITE_ROWS = 10_000  # rows per written batch: no generator holds a whole file's cells
TEXTS_PER_ROW = 2 + NUM_NEGATIVES
LINEAR_LIMIT = 1.15
HOLDS_FRACTION = 0.5
SAMPLE_S = 0.05


# ---- data ------------------------------------------------------------------------------------

def write_raw(path, num_rows, seed=0, pool_factor=2):
    """The F2LLM-like raw file of num_rows rows (module docstring), written WRITE_ROWS rows at a time."""
    gen = TextGen(seed)
    queries = [gen.query() for _ in range(num_rows)]
    pool = [gen.passage() for _ in range(pool_factor * num_rows)]
    names = ["query", "passage"] + [f"negative_{i}" for i in range(1, NUM_NEGATIVES + 1)]
    schema = pa.schema([(name, pa.string()) for name in names])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, num_rows, WRITE_ROWS):
            rows = range(start, min(start + WRITE_ROWS, num_rows))
            draws = np.array([gen.rng.choice(len(pool) - 1, NUM_NEGATIVES, replace=False) for _ in rows])
            negs = draws + (draws >= np.array(rows)[:, None])  # skip the row's own positive
            cells = [queries[rows.start:rows.stop], pool[rows.start:rows.stop]]
            cells += [[pool[j] for j in negs[:, c]] for c in range(NUM_NEGATIVES)]
            writer.write_table(pa.table(dict(zip(names, cells)), schema=schema))


def v2_paths(folder):
    return os.path.join(folder, f"{DATASET}.parquet"), os.path.join(folder, "corpus", f"{DATASET}.parquet")


def replicate_v2(src, dst, copies):
    """dst: src's v2 files `copies` times, copy r's document ids (and doc_id) shifted by r x src's corpus
    size; each copy written on its own (the tokenizer's record is dropped: the tokenizer did not write these)."""
    (src_queries, src_corpus), (dst_queries, dst_corpus) = v2_paths(src), v2_paths(dst)
    os.makedirs(os.path.dirname(dst_corpus))
    corpus = pq.read_table(src_corpus).replace_schema_metadata(None)
    size = corpus.num_rows
    with pq.ParquetWriter(dst_corpus, corpus.schema) as writer:
        for r in range(copies):
            copy = corpus.set_column(0, "doc_id", pa.array(np.arange(r * size, (r + 1) * size)))
            writer.write_table(copy, row_group_size=row_group_rows(copy))  # as tokenize_data_qwen writes
    queries = pq.read_table(src_queries).replace_schema_metadata(None)
    with pq.ParquetWriter(dst_queries, queries.schema) as writer:
        for r in range(copies):
            shifted = [pc.add(queries.column(c), r * size) if c.endswith("_id") else queries.column(c)
                       for c in queries.column_names]
            copy = pa.table(shifted, schema=queries.schema)
            writer.write_table(copy, row_group_size=row_group_rows(copy))


def token_counts(folder):
    """(stored tokens: the corpus's and the queries', tokens the training reads: every row's query,
    passage and 24 negatives), read a row group at a time."""
    queries, corpus = (pq.ParquetFile(p) for p in v2_paths(folder))
    doc_lengths = np.concatenate([np.asarray(pc.list_value_length(b.column(0)), dtype=np.int64)
                                  for b in corpus.iter_batches(columns=["input_ids"])])
    stored = int(doc_lengths.sum())
    read = 0
    for batch in queries.iter_batches():
        query_tokens = int(pc.sum(pc.list_value_length(batch.column("query_input_ids"))).as_py())
        stored, read = stored + query_tokens, read + query_tokens
        read += sum(int(doc_lengths[batch.column(c).to_numpy()].sum()) for c in batch.schema.names if c.endswith("_id"))
    return stored, read


def folder_mb(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files) / 2**20


# ---- running a stage -------------------------------------------------------------------------

def process_tree(root):
    """root and its descendants, from the parent pids in /proc/PID/stat."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def run_stage(cmd, log):
    """Run cmd (from the repository root) to its end: {wall_s, max_rss_mb, anon_mb, stdout, start}."""
    start, t0 = time.time(), time.perf_counter()
    with open(log, "w") as out, open(log + ".err", "w") as err:
        proc = subprocess.Popen(benchutil.with_peak_rss(cmd, log + ".rss"), cwd=benchutil.REPO_DIR, stdout=out,
                                stderr=err)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(benchutil.proc_status_kb("RssAnon", p) or 0 for p in process_tree(proc.pid)))
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - t0
    with open(log) as f:
        stdout = f.read()
    if proc.returncode:
        with open(log + ".err") as f:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}:\n{f.read()[-3000:]}")
    with open(log + ".rss") as f:
        max_rss_kb = int(f.read())
    return {"wall_s": wall, "max_rss_mb": max_rss_kb / 1024, "anon_mb": peak / 1024, "stdout": stdout,
            "start": start}


def memory(stage):
    return {"max_rss_mb": stage["max_rss_mb"], "anon_mb": stage["anon_mb"]}


# ---- the loader stage (a child process) -------------------------------------------------------

def loader_stage(config_path, eos_id, vocab_size, steps):
    """Splits from the warm cache, the training loader, its first batch and `steps` more: one JSON line."""
    from config import load_config, load_dataset_types
    from data import MultiDatasetLoader, check_datasets, load_splits, make_loader

    cfg = load_config(config_path)
    [(name, path, task, columns)] = check_datasets(cfg, load_dataset_types(cfg))
    t0 = time.perf_counter()
    train, _ = load_splits(path, columns, cfg)
    t1 = time.perf_counter()
    loader = MultiDatasetLoader({name: make_loader(train, task, cfg, eos_id, train=True, name=name,
                                                   vocab_size=vocab_size)}, seed=cfg.seed)
    batches = iter(loader)
    first = next(batches)[1]
    t2, first_at = time.perf_counter(), time.time()
    step_s, tokens = [], []
    for _ in range(steps):
        a = time.perf_counter()
        batch = next(batches)[1]
        step_s.append(time.perf_counter() - a)
        tokens.append(len(batch["input_ids"]))
    benchutil.print_json({"splits_s": t1 - t0, "first_batch_from_loader_s": t2 - t1, "first_batch_at": first_at,
                          "first_batch_tokens": len(first["input_ids"]), "step_ms_median": 1000 * np.median(step_s),
                          "step_ms_p90": 1000 * np.percentile(step_s, 90), "tokens_per_batch": float(np.mean(tokens)),
                          "batches_per_epoch": len(loader), "train_rows": len(train)})


# ---- the bench -------------------------------------------------------------------------------

def write_config(path, model_path, data_path, cache_dir, work):
    with open(path, "w") as f:
        json.dump({"model_path": model_path, "train_data_path": data_path, "cache_dir": cache_dir,
                   "output_dir": os.path.join(work, "output"), "tb_dir": os.path.join(work, "tb"),
                   "max_seq_length": MAX_SEQ_LENGTH}, f)
    return path


def exponent(n1, y1, n2, y2):
    return math.log(y2 / y1) / math.log(n2 / n1) if y1 > 0 and y2 > 0 else None


def measure_size(rows, tokenize_it, source, work, model_path, tokenizer, num_proc, steps):
    """All stages at one size; tokenize_it False: replicate `source`'s tokenized files instead."""
    here = os.path.join(work, str(rows))
    data_dir = os.path.join(here, "tokenized")
    out = {"rows": rows, "tokenized_by": "tokenize_data_qwen.py" if tokenize_it else None}
    if tokenize_it:
        raw = os.path.join(here, "raw")
        os.makedirs(raw)
        _, out["raw_write_s"] = benchutil.timed(write_raw, os.path.join(raw, f"{DATASET}.parquet"), rows)
        out["raw_mb"] = folder_mb(raw)
        stage = run_stage([sys.executable, "tokenize_data_qwen.py", "--model_path", model_path, "--input_dir", raw,
                           "--output_dir", data_dir, "--max_seq_length", str(MAX_SEQ_LENGTH), "--num_proc",
                           str(num_proc), "--layout", "v2"], os.path.join(here, "tokenize.log"))
        found = re.search(r"starting (\d+) tokenizer worker processes", stage["stdout"])
        out["tokenize"] = {"wall_s": stage["wall_s"], "texts_per_s": rows * TEXTS_PER_ROW / stage["wall_s"],
                           "mode": f"pool of {found.group(1)}" if found else "in-process", **memory(stage)}
        os.remove(os.path.join(raw, f"{DATASET}.parquet"))  # the largest file, and no later stage reads it
    else:
        copies = rows // source["rows"]
        _, out["replicate_s"] = benchutil.timed(replicate_v2, source["data_dir"], data_dir, copies)
        out["tokenized_by"] = f"the {source['rows']:,}-row files replicated {copies} times"
    out["data_dir"] = data_dir
    out["tokenized_mb"] = folder_mb(data_dir)
    out["stored_tokens"], out["read_tokens"] = token_counts(data_dir)
    cache = os.path.join(here, "cache")
    config = write_config(os.path.join(here, "config.json"), model_path, data_dir, cache, here)
    stage = run_stage([sys.executable, "run.py", "--config", config, "--prepare_only"],
                      os.path.join(here, "prepare.log"))
    out["prepare"] = {"wall_s": stage["wall_s"], **memory(stage)}
    out["cache_mb"] = folder_mb(cache)
    stage = run_stage([sys.executable, os.path.abspath(__file__), "--loader_stage", config, "--eos_id",
                       str(tokenizer.eos_token_id), "--vocab_size", str(len(tokenizer)), "--steps", str(steps)],
                      os.path.join(here, "loader.log"))
    child = json.loads(stage["stdout"].strip().splitlines()[-1])
    child["first_batch_from_start_s"] = child.pop("first_batch_at") - stage["start"]
    out["loader"] = {**child, "wall_s": stage["wall_s"], **memory(stage)}
    return out


def checks(results):
    """Growth exponents between successive sizes, and which stages hold the token lists."""
    series = {
        "tokenize time": lambda r: r.get("tokenize", {}).get("wall_s"),
        "tokenize anon": lambda r: r.get("tokenize", {}).get("anon_mb"),
        "prepare time": lambda r: r["prepare"]["wall_s"],
        "prepare anon": lambda r: r["prepare"]["anon_mb"],
        "splits (warm) time": lambda r: r["loader"]["splits_s"],
        "first batch from loader": lambda r: r["loader"]["first_batch_from_loader_s"],
        "first batch from start": lambda r: r["loader"]["first_batch_from_start_s"],
        "data path per step": lambda r: r["loader"]["step_ms_median"],
        "loader anon": lambda r: r["loader"]["anon_mb"],
    }
    exponents = {}
    for label, get in series.items():
        points = [(r["rows"], get(r)) for r in results if get(r) is not None]
        exponents[label] = [exponent(n1, y1, n2, y2) for (n1, y1), (n2, y2) in zip(points, points[1:])]
    holds = {}
    for stage in ("tokenize", "prepare", "loader"):
        ran = [r for r in results if stage in r]
        grow_mb = ran[-1][stage]["anon_mb"] - ran[0][stage]["anon_mb"]
        token_mb = 4 * (ran[-1]["stored_tokens"] - ran[0]["stored_tokens"]) / 2**20
        holds[stage] = {"anon_growth_mb": grow_mb, "token_growth_mb": token_mb, "ratio": grow_mb / token_mb,
                        "holds_token_lists": grow_mb >= HOLDS_FRACTION * token_mb,
                        "from_rows": ran[0]["rows"], "to_rows": ran[-1]["rows"]}
    linear = all(e is None or e <= LINEAR_LIMIT for values in exponents.values() for e in values)
    return exponents, holds, linear


def run(quick=False, sizes=None, num_proc=None, steps=None, work_dir=None, tokenize_all=False):
    from demo import build_qwen3_tokenizer

    sizes = sorted(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    num_proc = num_proc or len(os.sched_getaffinity(0))
    steps = steps or (30 if quick else 100)
    result = {"sizes": sizes, "num_proc": num_proc, "steps": steps, "machine": benchutil.machine(),
              "layout": "v2", "max_seq_length": MAX_SEQ_LENGTH, "tokenize_all": tokenize_all}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as work:
        model_path = os.path.join(work, "qwen3")
        tokenizer = build_qwen3_tokenizer(model_path)
        result["vocab_size"] = len(tokenizer)
        baseline = run_stage([sys.executable, "-c", "import run"], os.path.join(work, "import_run.log"))
        result["import_run"] = {"wall_s": baseline["wall_s"], **memory(baseline)}
        results, source = [], None
        for i, rows in enumerate(sizes):
            tokenize_it = tokenize_all or i < len(sizes) - 1
            r = measure_size(rows, tokenize_it, source, work, model_path, tokenizer, num_proc, steps)
            r["load_average"] = benchutil.load_average()
            source = r if tokenize_it else source
            results.append(r)
            print(f"  {rows:,} rows done ({time.perf_counter() - t0:.0f} s so far, {benchutil.load()})",
                  file=sys.stderr, flush=True)
        for r in results:
            del r["data_dir"]
    result["results"] = results
    result["exponents"], result["memory_check"], result["goal_linear"] = checks(results)
    result["goal_no_token_lists_held"] = {stage: not check["holds_token_lists"]
                                          for stage, check in result["memory_check"].items()}
    result["total_s"] = time.perf_counter() - t0
    return result


def report(result):
    rows = result["results"]

    def cell(r, stage, key, fmt):
        return fmt.format(r[stage][key]) if stage in r else "-"

    lines = [result["machine"],
             f"Scaling of the data pipeline (layout v2, Qwen3's tokenizer of {result['vocab_size']:,} ids, max "
             f"{result['max_seq_length']}, {result['num_proc']} tokenizer processes allowed; batch 16 x (2 + 7))."]
    for r in rows:
        if "replicate_s" in r:
            lines.append(f"NOTE: the {r['rows']:,}-row dataset was not tokenized: {r['tokenized_by']} with distinct "
                         "document ids (same token lengths and duplication).")
    base = result["import_run"]
    lines.append(f"`import run` alone (the fixed part of prepare): {base['wall_s']:.1f} s, "
                 f"max RSS {base['max_rss_mb']:,.0f} MB, anon {base['anon_mb']:,.0f} MB")
    lines.append("\nTime (wall seconds of each stage's process unless noted; first batch from the loader's creation "
                 "/ from the child's start):")
    lines.append(benchutil.table(
        ["rows", "stored tokens", "tokenize s", "mode", "texts/s", "prepare s (cold)", "splits s (warm)",
         "first batch s", "ms/step median (p90)"],
        [[f"{r['rows']:,}", f"{r['stored_tokens']:,}", cell(r, "tokenize", "wall_s", "{:.1f}"),
          cell(r, "tokenize", "mode", "{}"), cell(r, "tokenize", "texts_per_s", "{:,.0f}"),
          f"{r['prepare']['wall_s']:.1f}", f"{r['loader']['splits_s']:.2f}",
          f"{r['loader']['first_batch_from_loader_s']:.3f} / {r['loader']['first_batch_from_start_s']:.1f}",
          f"{r['loader']['step_ms_median']:.2f} ({r['loader']['step_ms_p90']:.2f})"] for r in rows]))
    lines.append("\nPeak memory in MB (max RSS: largest single process, exact, memory-mapped file pages included; "
                 "anon: sum of RssAnon over the process tree, sampled):")
    lines.append(benchutil.table(
        ["rows", "token ids MB", "raw file MB", "tokenize max RSS", "tokenize anon", "prepare max RSS",
         "prepare anon", "loader max RSS", "loader anon", "on disk: tokenized / cache"],
        [[f"{r['rows']:,}", f"{4 * r['stored_tokens'] / 2**20:,.0f}",
          f"{r['raw_mb']:,.0f}" if "raw_mb" in r else "-", cell(r, "tokenize", "max_rss_mb", "{:,.0f}"),
          cell(r, "tokenize", "anon_mb", "{:,.0f}"), f"{r['prepare']['max_rss_mb']:,.0f}",
          f"{r['prepare']['anon_mb']:,.0f}", f"{r['loader']['max_rss_mb']:,.0f}", f"{r['loader']['anon_mb']:,.0f}",
          f"{r['tokenized_mb']:,.0f} / {r['cache_mb']:,.0f}"] for r in rows]))
    steps = [f"{a['rows']:,}->{b['rows']:,}" for a, b in zip(rows, rows[1:])]
    lines.append("\nGrowth exponents between successive sizes (1: linear, 0: constant; '-' where a stage did not run):")
    lines.append(benchutil.table(["series"] + steps, [
        [label] + [f"{e:.2f}" for e in values] + ["-"] * (len(steps) - len(values))
        for label, values in result["exponents"].items()]))
    lines.append(f"goal, each grows linearly or better (every exponent <= {LINEAR_LIMIT}): "
                 f"{'met' if result['goal_linear'] else 'MISSED'}")
    for stage, c in result["memory_check"].items():
        verdict = "GROWS with the data (holds it in memory)" if c["holds_token_lists"] else "does not hold them"
        lines.append(f"{stage}: anonymous memory {c['anon_growth_mb']:+,.0f} MB from {c['from_rows']:,} to "
                     f"{c['to_rows']:,} rows while the token ids grew by {c['token_growth_mb']:,.0f} MB (ratio "
                     f"{c['ratio']:.2f}): {verdict}")
    lines.append(f"total {result['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description="How the data pipeline scales with the rows."))
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="rows of each size, the largest replicated from the one before it (a multiple of it) "
                        "unless --tokenize_all")
    p.add_argument("--num_proc", type=int, default=None, help="tokenize_data_qwen.py --num_proc (default: cores)")
    p.add_argument("--steps", type=int, default=None, help="batches timed after the first (default 100, quick 30)")
    p.add_argument("--work_dir", default=None, help="where the temporary files go (default: the system's temp folder)")
    p.add_argument("--tokenize_all", action="store_true",
                   help="tokenize the largest size too instead of replicating the one before it (full sizes: about "
                        "half an hour more on 2 cores, and ~18 GB of disk for the raw file, the outputs and the cache)")
    p.add_argument("--loader_stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eos_id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab_size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loader_stage:
        return loader_stage(args.loader_stage, args.eos_id, args.vocab_size, args.steps)
    replicated = not args.tokenize_all
    if args.sizes and (len(args.sizes) < 2 or replicated and sorted(args.sizes)[-1] % sorted(args.sizes)[-2]):
        p.error("--sizes: at least two, the largest a multiple of the one before it (unless --tokenize_all)")
    return benchutil.emit(run(args.quick, args.sizes, args.num_proc, args.steps, args.work_dir, args.tokenize_all),
                          report)


if __name__ == "__main__":
    main()
