"""Mining benchmark: mine_negatives.py vs sentence-transformers' mine_hard_negatives, same model, corpus and settings.

The model (build_models): a random-init Qwen3 like bench_peers' (hidden 64, 2 layers, Qwen3's tokenizer and
151,936 embedding rows) but with initializer_range 0.2, exported with model.save_inference_model; both
sides load that export (ours through model.load_encoder: last-token pooling, max_seq_length 512, no
prompt), so they embed alike. With the default init (0.02) every pair scores ~0.9 (every text ends in
the same eos, which dominates a tiny random model's last hidden state): the margin then leaves ~90% of
the rows short and near-ties everywhere, nothing like a trained model; at 0.2 the scores spread.
The data (write_pairs, reusable for a training-quality comparison): (query, passage) pairs with known
topics from bench_peers.TextGen (a passage mixes common words, words of its topic and rare words; its
query holds a few of its rare and topic words), an extra corpus of passages without queries, and a
held-out split of pairs about other passages; regime "short" (queries ~4-12 words, passages ~4-16) or
"long" (F2LLM-like: ~22 / ~170 words).

Variants (VARIANTS): "top", num_negatives 8 from the first 50 candidates (ours --max_rank 50, ST
range_max 50), no margin, sampling top: the main path, every window full; "top-margin", the same with
the false-negative margin at 95% of the positive score (ours --positive_margin 0.95, ST relative_margin
0.05): a random model ranks the labelled positive anywhere, so most windows lie wholly above it and
those rows go to ours' fill or are dropped by ST, which this variant times; "top-margin-drop", the
same with ours' --on_short drop, so that both sides do the same work. Batch 32, float32, one
thread (torch.set_num_threads(1), TOKENIZERS_PARALLELISM=false). Each side runs what a user would: ours
mine_negatives.mine (model load, read, embed, rank, select, write parquet), ST SentenceTransformer(...)
+ mine_hard_negatives(..., output_format="n-tuple") + to_parquet, in this process, alternating the two
(ours first on even repeats), after one untimed load of each side's model (the first load imports
transformers' model code); the table shows the medians. queries/s = input rows / wall s, docs/s =
corpus texts (distinct passages + extra) / wall s.

Not equal, by design: ST drops the rows that found fewer than n negatives, ours fills them (the table
counts both); ST retrieves range_max + max_positives texts and then applies the margin, ours applies
the margin within the first max_rank candidates after the exclusions, and ours also excludes a text
equal to the query: with top sampling and enough candidates the two choose the same texts, which the
agreement figures check (rows present in both: identical lists, and the mean share of negatives in
common). Ours stores float16 embeddings: the first variant reruns ours with a float32 store and reports
the share of its negatives that differ, the price of the smaller store.

--quick: short regime, 2,000 pairs + 2,000 extra texts, 2 repeats (about 1.5 minutes on 2 cores, 20 s of
it building Qwen3's tokenizer). Default: short 20,000 + 20,000, 3 repeats; long 2,000 + 2,000, 2 repeats.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import io
import os
import re
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import bench_peers

INIT_RANGE = 0.2
SETTINGS = {"num_negatives": 8, "max_rank": 50, "positive_margin": None, "sampling": "top", "batch_size": 32,
            "on_short": "fill_random"}
# no margin: the main path (full windows); margin: a random model ranks the positive anywhere, so most
# windows lie wholly above it and the rows go to the fill (ours) or are dropped (ST); margin-drop: ours
# drops them too, the same work as ST's
VARIANTS = {"top": {}, "top-margin": {"positive_margin": 0.95},
            "top-margin-drop": {"positive_margin": 0.95, "on_short": "drop"}}
SIZES = {  # regime: (pairs, extra corpus texts, held-out pairs, repeats)
    True: {"short": (2000, 2000, 200, 2)},
    False: {"short": (20000, 20000, 1000, 3), "long": (2000, 2000, 200, 2)},
}


# ---- data ---------------------------------------------------------------------------------------

def write_pairs(root, words, rows, extra, heldout, regime="short", seed=0, name="pairs"):
    """(query, passage, topic) pairs in raw/NAME.parquet, extra corpus texts (text, topic) in
    extra.parquet, held-out pairs about other passages in heldout.parquet; their paths."""
    gen = bench_peers.TextGen(seed, words)
    spec = bench_peers.REGIMES[regime]

    def pairs(n):
        topics = gen.rng.integers(0, len(gen.topics), n)
        out = {"query": [], "passage": [], "topic": topics.tolist()}
        for topic in topics.tolist():
            doc, relevant = gen.document(topic, spec)
            out["query"].append(gen.query(relevant, topic, spec)[0])
            out["passage"].append(" ".join(doc))
        return pa.table(out)

    paths = {"raw_dir": os.path.join(root, "raw"), "extra": os.path.join(root, "extra.parquet"),
             "heldout": os.path.join(root, "heldout.parquet")}
    paths["train"] = os.path.join(paths["raw_dir"], f"{name}.parquet")
    os.makedirs(paths["raw_dir"], exist_ok=True)
    pq.write_table(pairs(rows), paths["train"])
    corpus = pairs(extra)
    pq.write_table(pa.table({"text": corpus.column("passage"), "topic": corpus.column("topic")}), paths["extra"])
    pq.write_table(pairs(heldout), paths["heldout"])
    return paths


# ---- the model ----------------------------------------------------------------------------------

def build_models(root, hidden=bench_peers.HIDDEN, layers=bench_peers.LAYERS, tokenizer_builder=None,
                 init_range=INIT_RANGE):
    """A random-init Qwen3 backbone folder with Qwen3's tokenizer (bench_peers.build_models' model with
    initializer_range `init_range`) and its sentence-transformers export (max_seq_length 512), which both
    sides mine with. Returns both paths."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import demo
    from model import load_backbone, load_tokenizer, save_inference_model

    backbone_dir, st_dir = os.path.join(root, "backbone"), os.path.join(root, "st_init")
    with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
        (tokenizer_builder or demo.build_qwen3_tokenizer)(backbone_dir)
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=demo.QWEN3_EMBEDDING_ROWS, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=hidden // 4, tie_word_embeddings=True, initializer_range=init_range)
        Qwen3ForCausalLM(config).save_pretrained(backbone_dir)
        save_inference_model(load_backbone(backbone_dir, dtype="float32"), load_tokenizer(backbone_dir), st_dir,
                             max_seq_length=bench_peers.MAX_SEQ_LENGTH)
    return backbone_dir, st_dir


def warm_up(model_dir):
    """One untimed load of each side's model: the first imports transformers' Qwen3 code (seconds)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from model import load_encoder

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        load_encoder(model_dir, device="cpu", dtype="float32").encode(["warm up"])
        SentenceTransformer(model_dir, device="cpu", model_kwargs={"dtype": torch.float32}).encode(["warm up"])


# ---- the two sides ------------------------------------------------------------------------------

def run_ours(model_dir, paths, out_dir, settings):
    """mine_negatives.mine as the CLI runs it: (seconds, its output table, short rows)."""
    import mine_negatives

    rules = mine_negatives.Settings(num_negatives=settings["num_negatives"], max_rank=settings["max_rank"],
                                    positive_margin=settings["positive_margin"], sampling=settings["sampling"],
                                    on_short=settings["on_short"])
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mine_negatives.mine(model_dir, paths["raw_dir"], out_dir, settings=rules, corpus=paths["extra"],
                            batch_size=settings["batch_size"], device="cpu", dtype="float32", overwrite=True)
    seconds = time.perf_counter() - t0
    short = re.search(r": (\d+) of \d+ row\(s\) had fewer than", out.getvalue())
    name = os.path.basename(paths["train"])
    return seconds, pq.read_table(os.path.join(out_dir, name)), int(short.group(1)) if short else 0


def run_st(model_dir, paths, out_path, settings):
    """sentence-transformers' mine_hard_negatives as its docs use it: (seconds, its output table)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    margin = None if settings["positive_margin"] is None else round(1 - settings["positive_margin"], 10)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"dtype": torch.float32})
        pairs = pq.read_table(paths["train"], columns=["query", "passage"])
        corpus = pq.read_table(paths["extra"], columns=["text"]).column("text").to_pylist()
        mined = mine_hard_negatives(Dataset(pairs_table(pairs)), model, corpus=corpus,
                                    range_max=settings["max_rank"], num_negatives=settings["num_negatives"],
                                    relative_margin=margin,
                                    sampling_strategy=settings["sampling"], output_format="n-tuple",
                                    batch_size=settings["batch_size"], verbose=False)
        mined.to_parquet(out_path)
    return time.perf_counter() - t0, pq.read_table(out_path)


def pairs_table(table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


def negatives(table, n):
    """{(query, passage): [negative_1 .. negative_n]} of an output table."""
    cols = [table.column(f"negative_{i}").to_pylist() for i in range(1, n + 1)]
    return {(q, p): list(row) for q, p, *row in zip(table.column("query").to_pylist(),
                                                    table.column("passage").to_pylist(), *cols)}


def agreement(ours, theirs, n):
    """Over the rows in both: the share with identical negative lists, and the mean share in common."""
    a, b = negatives(ours, n), negatives(theirs, n)
    both = [key for key in b if key in a]
    if not both:
        return {"rows": 0, "identical": None, "overlap": None}
    return {"rows": len(both), "identical": sum(a[k] == b[k] for k in both) / len(both),
            "overlap": float(np.mean([len(set(a[k]) & set(b[k])) / n for k in both]))}


def float32_store(model_dir, paths, out_dir, settings, float16_table):
    """Ours with float32 embeddings on disk: its seconds and the share of negatives that differ."""
    import mine_negatives

    saved = mine_negatives.STORE_DTYPE
    mine_negatives.STORE_DTYPE = np.float32
    try:
        seconds, table, _ = run_ours(model_dir, paths, out_dir, settings)
    finally:
        mine_negatives.STORE_DTYPE = saved
    a, b = negatives(float16_table, settings["num_negatives"]), negatives(table, settings["num_negatives"])
    differ = sum(len(set(a[k]) - set(b[k])) for k in a) / (len(a) * settings["num_negatives"])
    return {"s": seconds, "negatives_differ": differ}


# ---- the benchmark ------------------------------------------------------------------------------

def run(quick=False, sizes=None, hidden=bench_peers.HIDDEN, layers=bench_peers.LAYERS, work_dir=None,
        tokenizer_builder=None, variants=None, init_range=INIT_RANGE, float32=True):
    """Every variant (name -> settings overrides) on every regime; the result dict (see report). float32:
    also rerun ours on the first variant with a float32 store."""
    import torch

    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    sizes, variants = sizes or SIZES[quick], variants or VARIANTS
    result = {"hidden": hidden, "layers": layers, "init_range": init_range, "threads": torch.get_num_threads(),
              "load_average": [benchutil.load_average()], "regimes": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as root:
        t0 = time.perf_counter()
        _, model_dir = build_models(root, hidden, layers, tokenizer_builder, init_range)
        result["build_s"] = time.perf_counter() - t0
        warm_up(model_dir)
        from model import load_tokenizer

        words = bench_peers.single_token_words(load_tokenizer(model_dir))
        for regime, (rows, extra, heldout, repeats) in sizes.items():
            paths = write_pairs(os.path.join(root, regime), words, rows, extra, heldout, regime)
            corpus = len(pa.concat_arrays([pq.read_table(paths["train"]).column("passage").combine_chunks(),
                                           pq.read_table(paths["extra"]).column("text").combine_chunks()]).unique())
            out = {"rows": rows, "corpus": corpus, "repeats": repeats, "variants": {}}
            for i, (name, overrides) in enumerate(variants.items()):
                settings = {**SETTINGS, **overrides}
                out["variants"][name] = compare(model_dir, paths, os.path.join(root, f"{regime}_{name}"), settings,
                                                repeats, rows, corpus, float32=float32 and i == 0)
            result["regimes"][regime] = out
            result["load_average"].append(benchutil.load_average())
    return result


def compare(model_dir, paths, work, settings, repeats, rows, corpus, float32=True):
    """Both sides `repeats` times, alternating, then (float32) ours with a float32 store; their figures."""
    times, tables, short = {"ours": [], "st": []}, {}, 0
    for r in range(repeats):
        for side in (("ours", "st") if r % 2 == 0 else ("st", "ours")):
            folder = f"{work}_{side}_{r}"
            if side == "ours":
                seconds, tables["ours"], short = run_ours(model_dir, paths, folder, settings)
            else:
                os.makedirs(folder)
                seconds, tables["st"] = run_st(model_dir, paths, os.path.join(folder, "mined.parquet"), settings)
            times[side].append(seconds)
            shutil.rmtree(folder)
    sides = {}
    for side in ("ours", "st"):
        s = statistics.median(times[side])
        sides[side] = {"s": s, "all_s": times[side], "queries_per_s": rows / s, "docs_per_s": corpus / s,
                       "rows_out": tables[side].num_rows}
    sides["ours"]["short_rows"] = short
    out = {"settings": settings, "sides": sides,
           "agreement": agreement(tables["ours"], tables["st"], settings["num_negatives"])}
    if float32:
        out["float32_store"] = float32_store(model_dir, paths, f"{work}_f32", settings, tables["ours"])
    return out


def describe(settings):
    margin = settings["positive_margin"]
    return (f"{settings['num_negatives']} negatives, first {settings['max_rank']} candidates, "
            f"{'no margin' if margin is None else f'margin {margin} x positive'}, sampling {settings['sampling']}, "
            f"batch {settings['batch_size']}, ours' short rows {settings['on_short']}")


def report(result):
    lines = [benchutil.machine(),
             (f"model: random-init Qwen3 (initializer_range {result['init_range']}) hidden {result['hidden']}, "
              f"{result['layers']} layers, Qwen3's tokenizer, float32, {result['threads']} thread per side; "
              "wall s: model load to output written; load average "
              + " -> ".join("?" if v is None else f"{v:.2f}" for v in result["load_average"]))]
    for regime, out in result["regimes"].items():
        lines += ["", (f"regime {regime}: {out['rows']:,} pairs, corpus {out['corpus']:,} texts, median of "
                       f"{out['repeats']} alternating runs per side")]
        rows, notes = [], []
        for name, v in out["variants"].items():
            for side, m in v["sides"].items():
                filled = side == "ours" and v["settings"]["on_short"] == "fill_random"
                left = f"{m['short_rows']:,} filled" if filled else f"{out['rows'] - m['rows_out']:,} dropped"
                rows.append([f"{name} {side}", f"{m['s']:.1f}", f"{m['queries_per_s']:,.0f}", f"{m['docs_per_s']:,.0f}",
                             f"{m['rows_out']:,}", left])
            a, f32 = v["agreement"], v.get("float32_store")
            agree = ("no rows in common" if a["identical"] is None else
                     f"identical negatives in {a['identical']:.1%} of the {a['rows']:,} rows in both, "
                     f"{a['overlap']:.1%} of negatives in common")
            store = (f"; ours with a float32 store: {f32['s']:.1f} s, {f32['negatives_differ']:.2%} of its negatives "
                     "differ" if f32 else "")
            notes.append(f"{name} ({describe(v['settings'])}): ours / ST speed "
                         f"{v['sides']['st']['s'] / v['sides']['ours']['s']:.2f}x; {agree}{store}")
        lines.append(benchutil.table(["variant side", "wall s", "queries/s", "docs/s", "rows out", "short rows"], rows))
        lines += notes
    return "\n".join(lines)


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--regimes", nargs="+", choices=list(bench_peers.REGIMES), help="default: the mode's regimes")
    args = p.parse_args(argv)
    sizes = SIZES[args.quick]
    if args.regimes:
        sizes = {r: SIZES[False].get(r, SIZES[True].get(r)) for r in args.regimes}
    return benchutil.emit(run(args.quick, sizes), report)


if __name__ == "__main__":
    main()
