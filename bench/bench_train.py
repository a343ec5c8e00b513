"""Figure 4: training throughput on the CPU, packed vs padded batches.

A small Qwen3 (random init from a Qwen3Config built here: vocab 8000, 4 heads, 2 kv heads,
intermediate 3 x hidden, tied embeddings; float32) is saved to a temporary folder and loaded
twice through model.load_backbone, as training loads it:

- packed: load_backbone(..., packed=True) -> attention "auto" = our sdpa_varlen on the CPU,
  Embedder layout "packed" (one row, per-sequence boundaries, no padding);
- padded: load_backbone(..., packed=False) -> PyTorch "sdpa", Embedder layout "padded" (all
  sequences right-padded to the longest, the published layout; mask from lengths).

Both start from the same weights and run on the SAME batches (one collate output per step, bs
16 x (2 + 7) from bench/lengths.py): forward, loss.f2llm_losses(..., "retrieval") (in-batch +
hard), backward, AdamW step (betas 0.9/0.98, weight decay 0.01), zero_grad. The two alternate
within each step and swap order every step; warm-up steps are excluded. Before training, both
embed the first batch and must agree (the layouts compute the same function).

Throughput = real tokens (sum of lengths) / seconds. Speedup = padded time / packed time over
the measured steps. Goal: packed >= 1.5x.

--quick uses a scaled length distribution (bench/lengths.py with scale 0.25, max len 256: same
shape, a quarter of the length), hidden 128, 2 layers, 1 warm-up + 6 measured steps; the default
uses the full distribution (max len 1024), hidden 128, 2 layers, 1 + 4 steps.

OpenMP runs at its default (see bench/benchutil.py): on a machine where other processes are
busy, the packed steps (many small kernels) slow down far more than the padded ones; the report
prints the load average before and after. OMP_WAIT_POLICY=PASSIVE is the robust setting there.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import io
import tempfile
import time

import numpy as np
import torch

import lengths
from benchutil import two_decimals
from data import collate
from loss import f2llm_losses
from model import Embedder, load_backbone


def build_model_dir(path, hidden, layers, vocab_size=8000, seed=0):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 4, max_position_embeddings=2048, tie_word_embeddings=True)
    model = Qwen3Model(config)
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load(path, layout):
    with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
        backbone = load_backbone(path, dtype="float32", packed=layout == "packed")
    model = Embedder(backbone, layout=layout, pad_token_id=lengths.PAD_ID)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    return model, opt


def train_step(model, opt, batch):
    t0 = time.perf_counter()
    emb = model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])
    loss = sum(f2llm_losses(emb, batch["num_queries"], batch["num_neg"], "retrieval").values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.detach().item()


def run(quick=False, hidden=128, layers=2, scale=None, max_len=None, warmup=1, steps=None, bs=16, num_neg=7,
        seed=0):
    scale = scale or (0.25 if quick else 1.0)
    max_len = max_len or (256 if quick else 1024)
    steps = steps or (6 if quick else 4)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = [collate(lengths.sample_table(bs, 24, seed=seed * 1_000_003 + i, max_len=max_len, scale=scale),
                       num_neg=num_neg, max_seq_length=max_len, eos_id=lengths.EOS_ID, rng=rng)
               for i in range(warmup + steps)]
    with tempfile.TemporaryDirectory() as path:
        num_params = build_model_dir(path, hidden, layers)
        models = {layout: load(path, layout) for layout in ("packed", "padded")}
    attn = {layout: m.backbone.config._attn_implementation for layout, (m, _) in models.items()}
    with torch.no_grad():
        b = batches[0]
        emb = {layout: m(b["input_ids"], b["lengths"], num_queries=b["num_queries"])
               for layout, (m, _) in models.items()}
    max_diff = float((emb["packed"] - emb["padded"]).abs().max())
    assert torch.allclose(emb["packed"], emb["padded"], atol=1e-3, rtol=1e-3), f"layouts disagree by {max_diff}"

    load_before = benchutil.load_average()
    steps_done = benchutil.alternate(models, batches, warmup, train_step)  # packed first, then padded first, ...
    times = {layout: [dt for dt, _ in done] for layout, done in steps_done.items()}
    losses = {layout: [loss for _, loss in done] for layout, done in steps_done.items()}
    measured = batches[warmup:]
    real = sum(int(b["lengths"].sum()) for b in measured)
    padded_tokens = sum(len(b["lengths"]) * int(b["lengths"].max()) for b in measured)
    result = {"hidden": hidden, "layers": layers, "params": num_params, "bs": bs, "num_neg": num_neg,
              "max_len": max_len, "length_scale": scale, "warmup_steps": warmup, "measured_steps": steps,
              "threads": torch.get_num_threads(), "attn_implementation": attn,
              "load_average": [load_before, benchutil.load_average()],
              "first_batch_max_abs_diff": max_diff, "real_tokens_per_step": real / steps,
              "padded_tokens_per_real_token": padded_tokens / real}
    for layout, layout_times in times.items():
        total = sum(layout_times)
        result[layout] = {"seconds_per_step": total / steps, "median_step_s": benchutil.median(layout_times),
                          "real_tokens_per_s": real / total, "final_loss": losses[layout][-1]}
    result["train_speedup"] = sum(times["padded"]) / sum(times["packed"])
    result["goal_ge_1.5x"] = result["train_speedup"] >= 1.5
    return result


def report(result):
    rows = [[f"{layout} ({result['attn_implementation'][layout]})", f"{result[layout]['seconds_per_step']:.2f}",
             f"{result[layout]['median_step_s']:.2f}", f"{result[layout]['real_tokens_per_s']:,.0f}"]
            for layout in ("packed", "padded")]
    return (f"Figure 4: training throughput on the CPU ({result['threads']} threads), Qwen3 hidden {result['hidden']}, "
            f"{result['layers']} layers ({result['params'] / 1e6:.2f}M params), float32, bs {result['bs']} x "
            f"(2 + {result['num_neg']}), max len {result['max_len']}, length scale {result['length_scale']}, "
            f"{result['real_tokens_per_step']:,.0f} real tokens/step, padded computes "
            f"{result['padded_tokens_per_real_token']:.2f} tokens per real one; {result['warmup_steps']} warm-up + "
            f"{result['measured_steps']} measured steps\n"
            + benchutil.table(["layout", "s/step (mean)", "s/step (median)", "real tokens/s"], rows)
            + f"\nspeedup packed vs padded: {result['train_speedup']:.2f}x (goal >= 1.5x: "
              f"{'met' if result['goal_ge_1.5x'] else 'MISSED'}); first-batch embeddings agree to "
              f"{result['first_batch_max_abs_diff']:.1e}; load average "
              f"{two_decimals(result['load_average'][0])} before, "
              f"{two_decimals(result['load_average'][1])} after")


def add_size_flags(parser):
    """The model and batch sizes of a training-throughput bench (bench_families takes them too)."""
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=None, help="length scale (bench/lengths.py)")
    parser.add_argument("--max_len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1)
    return parser


def main(argv=None):
    p = add_size_flags(benchutil.add_quick_flag(
        argparse.ArgumentParser(description="Figure 4: training throughput, packed vs padded.")))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.hidden, args.layers, args.scale, args.max_len, args.warmup, args.steps)
    return benchutil.emit(result, report)


if __name__ == "__main__":
    main()
