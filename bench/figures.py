"""Run the CPU benchmark figures (1-4 and 6) and print one JSON summary as the last line.

    python bench/figures.py --quick    # ~1.5 minutes on a 2-core CPU (< 5 minutes)
    python bench/figures.py            # bigger sizes (~8 minutes on a 2-core CPU)

Figure 1 (bench_padding):  computed tokens per real token, packed / grouped / padded layouts.
Figure 2 (bench_collate):  collate time per batch, ours (Arrow) vs the published Python lists.
Figure 3 (bench_tokenize): tokenization texts/s, ours (dedup + batched) vs one text per call.
Figure 4 (bench_train):    CPU training throughput of a small Qwen3, packed vs padded.
Figure 6 (bench_layout):   the v2 tokenized layout vs v1: bytes on disk, fetch + collate time.

What --quick changes (the default in parentheses):
- figure 1: 100 batches (1000); bs 16, 7 negatives, max len 1024 either way.
- figure 2: 100 batches from a 1024-row split (500 from 4096 rows); bs 16, 7 of 24, max len 1024.
- figure 3: 200 rows x 26 texts per corpus, best of 2 runs (1000 rows, best of 3).
- figure 4: the length distribution scaled by 0.25 with max len 256 (full distribution, max len
  1024), 1 warm-up + 6 measured steps (1 + 4); hidden 128, 2 layers either way.
- figure 6: 400 rows per corpus, 100 batches (2000 rows, 300 batches).

The last line holds exactly: tokens_per_real_token_packed, tokens_per_real_token_padded
(figure 1, the published pad-to-longest), collate_speedup (figure 2, collate only),
tokenize_speedup (figure 3, F2LLM-like corpus), train_speedup (figure 4), v2_over_v1_tokens
(figure 6, F2LLM-like corpus: v2 bytes over v1's token columns).
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import json
import time

import bench_collate
import bench_layout
import bench_padding
import bench_tokenize
import bench_train
import lengths


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    start = time.perf_counter()
    print(benchutil.machine())
    print(f"mode: {'quick' if args.quick else 'full'}")
    print("\nsynthetic lengths (bench/lengths.py), tokens incl. eos, max len 1024:")
    print(lengths.summary_table(lengths.summary()))

    results = {}
    for name, module in (("padding", bench_padding), ("collate", bench_collate), ("tokenize", bench_tokenize),
                         ("train", bench_train), ("layout", bench_layout)):
        t0 = time.perf_counter()
        results[name] = module.run(quick=args.quick)
        print()
        print(module.report(results[name]))
        print(f"({time.perf_counter() - t0:.0f} s; {benchutil.load()})", flush=True)

    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    summary = {
        "tokens_per_real_token_packed": round(results["padding"]["packed"]["tokens_per_real_token"], 4),
        "tokens_per_real_token_padded": round(results["padding"]["padded"]["tokens_per_real_token"], 4),
        "collate_speedup": round(results["collate"]["collate_speedup"], 2),
        "tokenize_speedup": round(results["tokenize"]["tokenize_speedup"], 2),
        "train_speedup": round(results["train"]["train_speedup"], 2),
        "v2_over_v1_tokens": round(results["layout"]["v2_over_v1_tokens_f2llm_like"], 3),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
