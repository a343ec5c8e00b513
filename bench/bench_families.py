"""Figure 10: training throughput of each backbone family on the CPU, packed vs padded batches.

Every decoder and encoder family that demo.build_family builds (qwen3, qwen2, llama, mistral, gemma,
gemma2, gemma3_text, phi3, bert, roberta, xlm-roberta, distilbert, electra, deberta-v2, modernbert) is
built as a small random-init checkpoint (hidden 128, 2 layers, 4 heads of 32 (Gemma's of 64, as Gemma
7B's are wider than hidden / heads), decoders 2 key/value heads, MLP 2 x hidden, its own tokenizer of
about 400 ids; float32), with the sliding windows of the real checkpoints written into its
config.json (demo's tiny windows exist for the tests): Mistral 7B v0.1 and Gemma 2 4096, Gemma 3 1B
512, Phi-3 mini 2047 (demo's already), ModernBERT's local attention 128. Each is then loaded as
training loads it, through model.load_backbone and model.Embedder with the family's pooling
(lasttoken for decoders, mean for encoders):

- packed: load_backbone(..., packed=True) -> attention "auto" on the CPU: our sdpa_varlen (causal
  or not, as the family), eager_varlen for Gemma 2 (logit soft-capping); one row, no padding;
- padded: load_backbone(..., packed=False) -> "sdpa" (eager for Gemma 2), every sequence right-
  padded to the longest, the mask from the lengths.

DeBERTa-v2 runs padded only: its attention is not transformers' attention interface, so nothing
keeps a packed row's sequences apart (model.UNPACKABLE; training falls back to padded batches).

As bench/bench_train.py measures Qwen (figure 4): every family trains on the same batches
(bench/lengths.py's distribution scaled down, bs 16 x (2 + 7), one collate output per step with
the family's end token: eos for decoders, [SEP] or </s> for encoders): forward, loss.f2llm_losses
(..., "retrieval"), backward, AdamW (betas 0.9/0.98, weight decay 0.01), zero_grad; the two layouts
alternate within each step and swap order every step; warm-up steps are excluded. Before training,
both layouts embed the first batch and must agree. Throughput = real tokens / seconds; speedup =
padded time / packed time.

--quick: length scale 0.25 (max len 256), 1 warm-up + 2 measured steps (2 min 15 s on 2 cores
at load 1); the default: length scale 0.5, max len 512 (the longest BERT-style encoders take), 1 + 3
steps (10 minutes). One torch thread unless --threads says otherwise (0: torch's default, one per core), as
figure 7 runs: on a 2-core machine shared with other busy processes, two OpenMP threads spin against
them and the packed steps (many small kernels) slow down several times more than the padded ones
(bench/benchutil.py); one thread is robust there (BENCHMARKS.md, figure 10). The report prints
the load average before the first family and after each.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import demo
import lengths
from bench_train import add_size_flags, train_step
from benchutil import two_decimals
from data import collate
from model import Embedder, backbone_family, end_token_id, load_backbone, load_tokenizer

FAMILIES = [family for family, kind in demo.FAMILIES.items() if kind != "refused"]
# The real checkpoints' windows, in config.json's names (Phi-3 mini's 2047 is demo's already).
REAL_WINDOWS = {"mistral": {"sliding_window": 4096}, "gemma2": {"sliding_window": 4096},
                "gemma3_text": {"sliding_window": 512}, "modernbert": {"local_attention": 128}}
# Token ids of the bench's texts: below every demo tokenizer's size, so that all families embed the
# same batches; 0-2 are left out (pads and ends of several families).
TEXT_VOCAB = 256
AGREEMENT_ATOL = 1e-3


def build(path, family, corpus, hidden, layers, seed=0):
    """A demo checkpoint of `family` in `path`, with the real checkpoints' windows."""
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        demo.build_family(path, family, corpus, hidden_size=hidden, num_layers=layers, seed=seed)
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(REAL_WINDOWS.get(family, {}))
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def load(path, layout, pooling, pad_token_id):
    with contextlib.redirect_stderr(io.StringIO()), _quiet_transformers():  # progress bars, load reports
        backbone = load_backbone(path, dtype="float32", packed=layout == "packed")
    model = Embedder(backbone, layout=layout, pad_token_id=pad_token_id, pooling=pooling)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    return model, opt


@contextlib.contextmanager
def _quiet_transformers():
    """No load report (a checkpoint saved with its pre-training heads lists them as unexpected)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def sizes(quick=False, scale=None, max_len=None, steps=None):
    return {"length_scale": scale or (0.25 if quick else 0.5), "max_len": max_len or (256 if quick else 512),
            "measured_steps": steps or (2 if quick else 3)}


def measure(path, family, tables, size, warmup, num_neg, seed):
    """One family's packed and padded training on the batches of `tables` (one per step)."""
    fam = backbone_family(path)
    tokenizer = load_tokenizer(path, special_tokens=fam.special_tokens)
    end_id = end_token_id(tokenizer, fam.special_tokens)
    rng = np.random.default_rng(seed)  # the same negatives for every family
    batches = [collate(table, num_neg=num_neg, max_seq_length=size["max_len"], eos_id=end_id, rng=rng)
               for table in tables]
    layouts = ("packed", "padded") if fam.packable else ("padded",)
    torch.manual_seed(seed)
    models = {layout: load(path, layout, fam.pooling(), tokenizer.pad_token_id) for layout in layouts}
    out = {"kind": fam.kind, "pooling": fam.pooling(), "layouts": list(layouts),
           "params": sum(p.numel() for p in models["padded"][0].parameters()),
           "attn_implementation": {layout: m.backbone.config._attn_implementation for layout, (m, _) in models.items()}}
    if fam.packable:  # in eval mode: the encoders' dropout would make the two differ
        with torch.no_grad():
            b = batches[0]
            emb = {layout: m.eval()(b["input_ids"], b["lengths"], num_queries=b["num_queries"])
                   for layout, (m, _) in models.items()}
        for m, _ in models.values():
            m.train()
        out["first_batch_max_abs_diff"] = float((emb["packed"] - emb["padded"]).abs().max())
        if not torch.allclose(emb["packed"], emb["padded"], atol=AGREEMENT_ATOL, rtol=AGREEMENT_ATOL):
            raise AssertionError(f"{family}: packed and padded embeddings differ by {out['first_batch_max_abs_diff']}")
    steps_done = benchutil.alternate(models, batches, warmup, train_step)
    times = {layout: [dt for dt, _ in done] for layout, done in steps_done.items()}
    losses = {layout: [loss for _, loss in done] for layout, done in steps_done.items()}
    measured = batches[warmup:]
    real = sum(int(b["lengths"].sum()) for b in measured)
    out["real_tokens_per_step"] = real / len(measured)
    out["padded_tokens_per_real_token"] = sum(len(b["lengths"]) * int(b["lengths"].max()) for b in measured) / real
    for layout in layouts:
        total = sum(times[layout])
        out[layout] = {"seconds_per_step": total / len(measured), "median_step_s": benchutil.median(times[layout]),
                       "real_tokens_per_s": real / total, "final_loss": losses[layout][-1]}
    out["train_speedup"] = sum(times["padded"]) / sum(times["packed"]) if fam.packable else None
    return out


def run(quick=False, families=None, hidden=128, layers=2, scale=None, max_len=None, warmup=1, steps=None, bs=16,
        num_neg=7, seed=0, work_dir=None):
    size = sizes(quick, scale, max_len, steps)
    families = families or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
    tables = [lengths.sample_table(bs, 24, seed=seed * 1_000_003 + i, vocab_size=TEXT_VOCAB,
                                   max_len=size["max_len"], scale=size["length_scale"])
              for i in range(warmup + size["measured_steps"])]
    result = {"hidden": hidden, "layers": layers, "bs": bs, "num_neg": num_neg, **size, "warmup_steps": warmup,
              "threads": torch.get_num_threads(), "load_average": [benchutil.load_average()], "families": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as root:
        corpus = demo.write_sample_data(os.path.join(root, "raw"), os.path.join(root, "eval"),
                                        people_per_dataset=60, num_negatives=2)
        t0 = time.perf_counter()
        for family in families:
            path = os.path.join(root, family)
            build(path, family, corpus, hidden, layers, seed)
            result["families"][family] = measure(path, family, tables, size, warmup, num_neg, seed)
            result["families"][family]["load_average"] = benchutil.load_average()
            print(f"{family}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        result["seconds"] = time.perf_counter() - t0
    result["load_average"].append(benchutil.load_average())
    return result


def report(result):
    rows = []
    for family, r in result["families"].items():
        attn = r["attn_implementation"]
        packed = r.get("packed")
        rows.append([family, r["kind"], r["pooling"], f"{r['params'] / 1e6:.2f}M",
                     f"{attn['packed']} / {attn['padded']}" if packed else f"- / {attn['padded']}",
                     f"{packed['seconds_per_step']:.2f}" if packed else "-", f"{r['padded']['seconds_per_step']:.2f}",
                     f"{packed['real_tokens_per_s']:,.0f}" if packed else "-",
                     f"{r['padded']['real_tokens_per_s']:,.0f}",
                     f"{r['train_speedup']:.2f}x" if packed else "padded only",
                     f"{r['first_batch_max_abs_diff']:.1e}" if packed else "-", two_decimals(r["load_average"])])
    first = next(iter(result["families"].values()))
    return (f"Figure 10: training throughput per family on the CPU (torch threads: {result['threads']}), hidden "
            f"{result['hidden']}, {result['layers']} layers, float32, bs {result['bs']} x (2 + {result['num_neg']}), "
            f"max len {result['max_len']}, length scale {result['length_scale']}, "
            f"{first['real_tokens_per_step']:,.0f} real tokens/step, padded computes "
            f"{first['padded_tokens_per_real_token']:.2f} tokens per real one; {result['warmup_steps']} warm-up + "
            f"{result['measured_steps']} measured steps; {result['seconds']:.0f} s\n"
            + benchutil.table(["family", "kind", "pooling", "params", "attention packed / padded", "packed s/step",
                               "padded s/step", "packed tokens/s", "padded tokens/s", "speedup", "agree", "load"],
                              rows)
            + f"\nload average {two_decimals(result['load_average'][0])} before, "
              f"{two_decimals(result['load_average'][1])} after; "
              "speedup = padded time / packed time; agree = largest difference of the first batch's embeddings")


def main(argv=None):
    p = add_size_flags(benchutil.add_quick_flag(
        argparse.ArgumentParser(description="Figure 10: training throughput per backbone family, packed vs padded.")))
    p.add_argument("--families", nargs="+", choices=FAMILIES, help="default: all of them")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(benchutil.machine(), flush=True)
    result = run(args.quick, args.families, args.hidden, args.layers, args.scale, args.max_len, args.warmup,
                 args.steps)
    return benchutil.emit(result, report)


if __name__ == "__main__":
    main()
