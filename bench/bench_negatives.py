"""What mined negatives are worth: the same model trained on the same pairs with (a) random negatives,
(b) negatives mined by mine_negatives.py, (c) negatives mined by sentence-transformers'
mine_hard_negatives, compared by held-out MRR@10 at the same number of steps.

The flow a user with (query, positive) pairs follows: a first model trained with random negatives
(a) is the miner; (b) and (c) each mine with it, with the same settings (bench_mine.SETTINGS: 8
negatives from the first 50 candidates, top sampling, the margin as given), and train a model from
the same initial weights for the same steps. The data: bench_mine.write_pairs (topic-structured
(query, passage) pairs, an extra corpus of passages without queries, held-out pairs about other
passages); the model: bench_peers' tiny Qwen3 (hidden 64, 2 layers, Qwen3's tokenizer); training:
`accelerate launch ... run.py` on the raw folder (bench_peers' settings: batch 16, lr 1e-3, warmup
10% then cosine, the recipe's loss; num_hard_neg 7, drawn per row from its 8 negatives). MRR@10
ranks each held-out query against all held-out passages (bench_peers.metrics). Random negatives are
other rows' passages (never the row's own, nor a passage of the same query), drawn per row with a
seeded generator.

--quick: 800 pairs, 60 steps, one seed (about 3 minutes on 2 cores); default: 3,000 pairs, 300
steps, seeds 0 and 1.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import bench_mine
import bench_peers

NEG = 7  # hard negatives per row in training, of the 8 mined (bench_mine.SETTINGS)
SIZES = {True: {"pairs": 800, "extra": 800, "heldout": 200, "steps": 60, "seeds": (0,)},
         False: {"pairs": 3000, "extra": 3000, "heldout": 300, "steps": 300, "seeds": (0, 1)}}
SOURCES = ("random", "ours", "st")


def random_negatives(table, n, seed):
    """The pairs with negative_1..n: other rows' passages, distinct, none a passage of the same query."""
    queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
    pool = list(dict.fromkeys(passages))
    positives = {}
    for q, p in zip(queries, passages):
        positives.setdefault(q, set()).add(p)
    rng = np.random.default_rng(seed)
    rows = []
    for q in queries:
        picked = []
        while len(picked) < n:
            text = pool[rng.integers(len(pool))]
            if text not in positives[q] and text not in picked:
                picked.append(text)
        rows.append(picked)
    for i in range(n):
        table = table.append_column(f"negative_{i + 1}", pa.array([r[i] for r in rows], pa.string()))
    return table


def st_as_f2llm(table, n):
    """sentence-transformers' n-tuple output (anchor, positive, negative_1..n) in the F2LLM columns."""
    names = table.column_names
    return pa.table({"query": table.column(names[0]), "passage": table.column(names[1]),
                     **{f"negative_{i}": table.column(names[1 + i]) for i in range(1, n + 1)}})


def train(work, backbone_dir, raw_dir, steps, seed):
    """run.py on raw_dir (one dataset, retrieval) through accelerate launch; the final checkpoint."""
    run = {"variant": "run", "work": work, "backbone_dir": backbone_dir, "raw_dir": raw_dir, "name": "pairs",
           "train_rows": pq.read_metadata(os.path.join(raw_dir, "pairs.parquet")).num_rows, "steps": steps,
           "eval_every": steps, "num_neg": NEG, "seed": seed}
    config = bench_peers.ours_config(run, {})
    os.makedirs(work)
    path = os.path.join(work, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    _, _, out = bench_peers.launch([accelerate, "launch", "--config_file", "configs/accelerate_cpu.yaml", "run.py",
                                    "--config", path], os.path.join(work, "run.log.txt"))
    final = [line for line in out.splitlines() if line.startswith("final checkpoint: ")][-1]
    return os.path.join(bench_peers.REPO_DIR, final[len("final checkpoint: "):])


def mrr(checkpoint, heldout):
    from model import load_encoder

    with contextlib.redirect_stderr(io.StringIO()):
        encoder = load_encoder(checkpoint, device="cpu", dtype="float32", max_seq_length=bench_peers.MAX_SEQ_LENGTH)
    return bench_peers.metrics(encoder.encode, heldout)["mrr@10"]


def write_source(root, name, table):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, "pairs.parquet"))
    return folder


def one_seed(root, backbone_dir, paths, heldout, steps, seed, margin):
    """MRR@10 of the untrained model and of the three trainings; the mining seconds of each side."""
    settings = {**bench_mine.SETTINGS, "positive_margin": margin}
    pairs = pq.read_table(paths["train"], columns=["query", "passage"])
    out = {"untrained": mrr(backbone_dir, heldout), "mine_s": {}}
    raw = write_source(root, "random", random_negatives(pairs, settings["num_negatives"], seed))
    miner = train(os.path.join(root, "train_random"), backbone_dir, raw, steps, seed)
    out["random"] = mrr(miner, heldout)
    mined_dir = os.path.join(root, "mined_ours")
    seconds, table, short = bench_mine.run_ours(miner, paths, mined_dir, settings)
    out["mine_s"]["ours"], out["ours_short_rows"] = seconds, short
    seconds, st_table = bench_mine.run_st(miner, paths, os.path.join(root, "st_mined.parquet"), settings)
    out["mine_s"]["st"], out["st_rows"] = seconds, st_table.num_rows
    for name, mined in (("ours", table.select(["query", "passage", *[f"negative_{i}" for i in
                                                                      range(1, settings["num_negatives"] + 1)]])),
                        ("st", st_as_f2llm(st_table, settings["num_negatives"]))):
        checkpoint = train(os.path.join(root, f"train_{name}"), backbone_dir, write_source(root, name, mined),
                           steps, seed)
        out[name] = mrr(checkpoint, heldout)
    return out


def run(quick=False, sizes=None, margin=0.95, work_dir=None, tokenizer_builder=None):
    sizes = sizes or SIZES[quick]
    result = {"sizes": sizes, "margin": margin, "load_average": [benchutil.load_average()], "seeds": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as root:
        backbone_dir, _ = bench_peers.build_models(root, tokenizer_builder=tokenizer_builder)
        from model import load_tokenizer

        words = bench_peers.single_token_words(load_tokenizer(backbone_dir))
        paths = bench_mine.write_pairs(os.path.join(root, "data"), words, sizes["pairs"], sizes["extra"],
                                       sizes["heldout"])
        heldout = bench_peers.heldout_set(paths["heldout"])
        for seed in sizes["seeds"]:
            t0 = time.time()
            work = os.path.join(root, f"seed_{seed}")
            os.makedirs(work)
            result["seeds"][seed] = one_seed(work, backbone_dir, paths, heldout, sizes["steps"], seed, margin)
            bench_peers.progress(f"seed {seed}: {json.dumps(result['seeds'][seed])} ({time.time() - t0:.0f} s)")
            shutil.rmtree(work)
        result["load_average"].append(benchutil.load_average())
    return result


def report(result):
    sizes, seeds = result["sizes"], result["seeds"]
    lines = [benchutil.machine(),
             (f"{sizes['pairs']} pairs + {sizes['extra']} extra corpus texts, {sizes['steps']} steps per training, "
              f"batch 16 x (query, positive, {NEG} negatives); mining: 8 of the first 50, top, margin "
              f"{result['margin']}; held-out {sizes['heldout']} pairs; load average "
              f"{' -> '.join(f'{x:.2f}' for x in result['load_average'] if x is not None)}")]
    rows = []
    for name, label in (("untrained", "untrained"), ("random", "(a) random negatives (the miner)"),
                        ("ours", "(b) mined by mine_negatives.py"), ("st", "(c) mined by sentence-transformers")):
        values = [s[name] for s in seeds.values()]
        rows.append([label, f"{np.mean(values):.4f}", " ".join(f"{v:.4f}" for v in values)])
    lines.append(benchutil.table(["negatives", "MRR@10 (mean)", "seeds"], rows))
    for seed, s in seeds.items():
        lines.append(f"seed {seed}: mining {s['mine_s']['ours']:.1f} s (ours, {s['ours_short_rows']} short rows "
                     f"filled) vs {s['mine_s']['st']:.1f} s (ST, {s['st_rows']} rows kept of {sizes['pairs']})")
    return "\n".join(lines)


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--margin", type=float, default=0.95, help="--positive_margin of both miners (ST: 1 - it)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the mode's)")
    args = p.parse_args(argv)
    sizes = {**SIZES[args.quick], **({"seeds": tuple(args.seeds)} if args.seeds else {})}
    return benchutil.emit(run(args.quick, sizes, margin=args.margin), report)


if __name__ == "__main__":
    main()
