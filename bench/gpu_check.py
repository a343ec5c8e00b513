"""Figure 5: the GPU check. A Qwen3-0.6B-shaped model trained under the published ZeRO-2 launch,
packed vs padded batches, MFU, memory and the largest batch that fits; one JSON file.

    accelerate launch --config_file configs/accelerate_config.yaml --num_processes 1 \\
        bench/gpu_check.py --out gpu_check.json

Under 8 minutes on one H100 / H200: the batch search starts no try that it predicts to end later
than --time_budget_s (400 s) after the script's imports, which leaves the launcher's start-up and
the imports a minute. `--tiny` runs the same code on the CPU in under a minute (a tiny Qwen3,
bs 4, max len 64, a search capped at 8 queries; tests/test_gpu_check.py launches it so).

The model: random init from a transformers Qwen3Config with Qwen3-0.6B's shape (vocab 151936,
hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, intermediate 3072, tied embeddings,
rope_theta 1e6, rms_norm_eps 1e-6; nothing is downloaded), saved to a temporary folder in bfloat16
and loaded from it by run.build_model (model.load_backbone with gradient checkpointing, then
model.Embedder), as training loads a backbone: bfloat16 weights under DeepSpeed bf16. AdamW and
the lr schedule are built as run.py builds them, the config is config.Config's defaults (the
published recipe; warmup_steps 0 so that every step changes the weights), and accelerate
prepares them under the launch's accelerator (distributed.make_accelerator; run.py's
configure_deepspeed). Every step is run.train_step on a "retrieval" batch: the embedding
forward, loss.f2llm_losses (in-batch + hard), the backward pass and DeepSpeed's optimizer step,
as training runs it, plus the host-to-device copy of the batch.

Batches: data.collate of synthetic F2LLM-like rows (bench/lengths.py: bs queries x (2 + num_neg)
sequences, lengths drawn from its distribution, capped at max_len), default bs 16 x (2 + 7), max
len 1024. Measured, in this order:

1. Embedding agreement: both layouts embed the first batch with the same freshly loaded weights
   (no gradient, bfloat16 under the published launch): max abs difference and min cosine over the
   bs x (2 + num_neg) embeddings, and the largest embedding value for scale.
2. Throughput per layout, on the same batches: "padded" (attn_implementation "sdpa", every
   sequence right-padded to the batch's longest: the published layout), then "packed"
   (attn_implementation "auto": flash_attention_2 varlen when flash-attn is installed, else
   flex_attention on a GPU, our sdpa_varlen on the CPU; see model.pick_attn_implementation).
   Each layout gets its own DeepSpeed engine, freed (accelerator.free_memory) before the next.
   Warm-up steps (default 2: flex_attention compiles for a first and a second, dynamic, shape)
   are excluded; real tokens/s = real (unpadded) tokens of the measured steps / their seconds.
   Peak memory per layout: torch.cuda.max_memory_allocated over the measured steps (reset after
   the warm-up; weights, gradients and AdamW state included, memory_before_steps_bytes says how
   much of it they hold); on the CPU the process's peak RSS over those steps (VmHWM, reset through
   /proc/self/clear_refs).
3. MFU = model FLOPs / step seconds / the chip's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s,
   found from torch.cuda.get_device_name; --peak_tflops overrides, and is needed on other chips
   and on the CPU, else MFU is null). Model FLOPs of one batch of sequences with lengths L_i
   (P: parameters without the embedding matrix; layers, heads, head_dim of the config):

       FLOPs = 6 * P * T + 12 * layers * heads * head_dim * S

   6 * P per token: forward (2) and backward (4) through the linear layers. 12 * layers * heads *
   head_dim per (query, key) pair: QK^T and attention x V, 2 FLOPs per multiply-add each, forward
   and backward (x3), counted over the full square as PaLM's MFU does (the causal half is not
   subtracted). Recomputation by gradient checkpointing, the embedding lookup, norms, softmax
   and the loss are not counted. T and S are what the layout computes: packed T = sum L_i,
   S = sum L_i^2; padded T = n * max L, S = n * max L^2 (n sequences padded to the longest).
   `mfu` uses the layout's FLOPs; `mfu_real` the packed count for both layouts (the FLOPs the
   real tokens need), so that padded's mfu_real is the share of the peak that does useful work.
4. The largest per-device batch (queries, each with num_neg negatives) that fits, packed layout,
   without and with the cached step (config grad_cache_chunk_size, grad_cache.py; default chunks
   of 64 sequences). One full train step per try on a fresh batch of that size: doubling from
   --search_start until a try runs out of memory (or reaches --max_batch), then bisecting until
   the gap is at most 1/16 of the largest fitting size. The cached search starts at the plain
   step's result. A try predicted (from the seconds per real token seen so far) to end past its
   deadline is not started: the plain search may use 45% of the time left when it starts, the
   cached one the rest; `stopped_by` says why a search ended (null: converged). The tries reuse
   the packed layout's engine: a step that fits leaves ZeRO-2 clean, so re-creating the engine per
   try (seconds each for 0.6B) would only cost time. A step cut short by an out-of-memory error
   leaves ZeRO-2's gradient buckets half filled, so that engine is destroyed, the memory freed
   (gc, torch.cuda.empty_cache) and a fresh engine built from the saved folder before the next
   try. On the CPU nothing is caught in practice (the kernel kills a process out of memory):
   --tiny caps the search at a small size.

The JSON (--out) also records the environment (Python, torch and its CUDA, transformers,
accelerate, deepspeed, flash-attn versions; the device's name; the launch's distributed type and
mixed precision), the model's shape and parameter counts, and each measured batch's lengths, so
the FLOP counts can be recomputed. The last lines printed are a short summary.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import io
import json
import platform
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

import lengths
from config import Config
from data import collate
from distributed import make_accelerator
from errors import UserError, exit_on_user_error
from run import build_model, configure_deepspeed, embed, make_optimizer, make_scheduler, to_device, train_step

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=192, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_position_embeddings=2048)
# What each mode runs unless told otherwise: the GPU check's sizes, and --tiny's seconds on a CPU.
DEFAULTS = {
    "gpu": dict(bs=16, num_neg=7, max_len=1024, length_scale=1.0, warmup=2, steps=8, search_start=16,
                max_batch=4096, grad_cache_chunk_size=64),
    "tiny": dict(bs=4, num_neg=7, max_len=64, length_scale=0.125, warmup=1, steps=2, search_start=1,
                 max_batch=8, grad_cache_chunk_size=8),
}
# Dense bfloat16 tensor-core peaks (no sparsity) in TFLOP/s, by a part of torch.cuda.get_device_name;
# the first match wins ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
PLAIN_SHARE = 0.45  # of the time left when the batch search starts; the cached search gets the rest
SAFETY = 1.25  # margin on a try's predicted seconds
ON_GPU = torch.cuda.is_available()
MEMORY_KIND = "torch.cuda.max_memory_allocated" if ON_GPU else "peak RSS of the process (VmHWM)"


def version_of(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(accelerator):
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": version_of("transformers"), "accelerate": version_of("accelerate"),
            "deepspeed": version_of("deepspeed"), "flash_attn": version_of("flash-attn"),
            "device": torch.cuda.get_device_name(accelerator.device) if ON_GPU else benchutil.cpu_model(),
            "torch_threads": torch.get_num_threads(), "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes}


def peak_tflops(device_name, override):
    """(dense bf16 peak in TFLOP/s or None, where it came from)."""
    if override:
        return override, "--peak_tflops"
    for part, tflops in PEAK_TFLOPS:
        if ON_GPU and part in device_name:
            return tflops, f"device name ({part})"
    return None, None


def reset_peak_memory():
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _proc_status_bytes(field):
    kb = benchutil.proc_status_kb(field)
    return None if kb is None else kb * 1024


def peak_memory():
    return torch.cuda.max_memory_allocated() if ON_GPU else _proc_status_bytes("VmHWM")


def current_memory():
    return torch.cuda.memory_allocated() if ON_GPU else _proc_status_bytes("VmRSS")


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def out_of_memory(err):
    """Allocation failures as torch (cuda, cpu) and cuBLAS report them."""
    text = str(err)
    return (isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower()
            or "CUBLAS_STATUS_ALLOC_FAILED" in text or "can't allocate memory" in text)


def save_random_model(shape, path, device, seed=0):
    """A random-init Qwen3Model of `shape` saved in bfloat16 to `path`; {its config, parameter counts}."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    with torch.device(device):  # random init of 0.6B parameters is seconds on the CPU, instant on a GPU
        backbone = Qwen3Model(Qwen3Config(**shape))
    params = sum(p.numel() for p in backbone.parameters())
    non_embedding = sum(p.numel() for name, p in backbone.named_parameters() if not name.startswith("embed_tokens."))
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        backbone.to(torch.bfloat16).save_pretrained(path)
    return {**shape, "params": params, "non_embedding_params": non_embedding}


def make_batch(bs, *, num_neg, max_len, scale, vocab_size, seed):
    """One collated batch of bs rows with num_neg negatives each, lengths from bench/lengths.py."""
    table = lengths.sample_table(bs, num_neg, seed=seed, vocab_size=vocab_size, max_len=max_len, scale=scale)
    return collate(table, num_neg=num_neg, max_seq_length=max_len, eos_id=lengths.EOS_ID)


def model_flops(seq_lengths, layout, model):
    """(FLOPs, computed tokens) of one batch in `layout` by the docstring's formula; Python ints."""
    lens = [int(n) for n in seq_lengths]
    if layout == "padded":
        tokens, squares = len(lens) * max(lens), len(lens) * max(lens) ** 2
    else:
        tokens, squares = sum(lens), sum(n * n for n in lens)
    attention = 12 * model["num_hidden_layers"] * model["num_attention_heads"] * model["head_dim"]
    return 6 * model["non_embedding_params"] * tokens + attention * squares, tokens


class Training:
    """The model, AdamW and lr schedule as run.py builds them, prepared by the launch's accelerator
    (one DeepSpeed engine under ZeRO-2), and run.train_step on them."""

    def __init__(self, accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg
        with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
            model = build_model(cfg, SimpleNamespace(pad_token_id=lengths.PAD_ID), accelerator)
        self.attn_implementation = model.backbone.config._attn_implementation
        adamw = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        self.model, self.optimizer = accelerator.prepare(model, adamw)
        self.scheduler = make_scheduler(adamw, cfg, total_steps=10**6)

    def step(self, batch):
        """(seconds, total loss or None when the step was skipped) of one train step."""
        synchronize()
        start = time.perf_counter()
        losses, _ = train_step(self.model, to_device(batch, self.accelerator.device), "retrieval", self.cfg,
                               self.accelerator, self.optimizer, self.scheduler)
        synchronize()
        seconds = time.perf_counter() - start
        return seconds, None if losses is None else sum(losses.values()).item()

    @torch.no_grad()
    def embeddings(self, batch):
        self.model.eval()
        out = embed(self.model, to_device(batch, self.accelerator.device)).float().cpu()
        self.model.train()
        return out

    def close(self):
        """Destroy the engine and free its memory (the caller drops its own references first)."""
        self.model = self.optimizer = self.scheduler = None
        self.accelerator.free_memory()
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()


def measure_layout(accelerator, cfg, batches, warmup):
    """(Training, first batch's embeddings before any step, {attn_implementation, step_seconds, ...})."""
    start = time.perf_counter()
    training = Training(accelerator, cfg)
    build_seconds = time.perf_counter() - start
    first = training.embeddings(batches[0])
    for batch in batches[:warmup]:
        training.step(batch)
    reset_peak_memory()
    before = current_memory()
    seconds, loss = [], None
    for batch in batches[warmup:]:
        dt, loss = training.step(batch)
        seconds.append(dt)
    return training, first, {"attn_implementation": training.attn_implementation, "build_seconds": build_seconds,
                             "step_seconds": seconds, "peak_memory_bytes": peak_memory(),
                             "memory_before_steps_bytes": before, "final_loss": loss}


def layout_figures(result, layout, measured, model, peak):
    """Adds the throughput, FLOP and MFU figures of `layout` to its result."""
    total = sum(result["step_seconds"])
    steps = len(measured)
    real = sum(int(b["lengths"].sum()) for b in measured)
    flops, computed = map(sum, zip(*(model_flops(b["lengths"], layout, model) for b in measured)))
    real_flops = sum(model_flops(b["lengths"], "packed", model)[0] for b in measured)
    result.update({
        "seconds_per_step": total / steps, "real_tokens_per_step": real / steps,
        "computed_tokens_per_step": computed / steps, "real_tokens_per_s": real / total,
        "model_flops_per_step": flops / steps, "real_model_flops_per_step": real_flops / steps,
        "achieved_tflops": flops / total / 1e12,
        "mfu": flops / total / (peak * 1e12) if peak else None,
        "mfu_real": real_flops / total / (peak * 1e12) if peak else None})
    return result


class BatchSearch:
    """The largest batch that fits (docstring, 4.), on one Training rebuilt after an out-of-memory try."""

    def __init__(self, training, accelerator, cfg, make, tokens_per_query, seconds_per_token, build_seconds):
        self.training, self.accelerator, self.cfg, self.make = training, accelerator, cfg, make
        self.tokens_per_query, self.seconds_per_token, self.build_seconds = (tokens_per_query, seconds_per_token,
                                                                             build_seconds)

    def predict(self, bs, first_cached):
        # the cached step adds a forward pass without graph to the plain step's work: a margin on its
        # first try, until its own seconds per token are known
        factor = 1.5 if first_cached else 1.0
        seconds = bs * self.tokens_per_query * self.seconds_per_token * factor
        return SAFETY * (seconds + (self.build_seconds if self.training is None else 0.0))

    def rebuild(self):
        """A fresh engine after an out-of-memory try; False when building it runs out of memory too."""
        start = time.perf_counter()
        try:
            self.training = Training(self.accelerator, self.cfg)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            return False
        self.build_seconds = time.perf_counter() - start
        return True

    def attempt(self, bs):
        self.training.cfg = self.cfg
        batch = self.make(bs, seed=1_000_000 + bs)
        real = int(batch["lengths"].sum())
        reset_peak_memory()
        start = time.perf_counter()
        fits = True
        try:
            self.training.step(batch)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not out_of_memory(err):
                raise
            fits = False
        seconds = time.perf_counter() - start
        out = {"batch_size": bs, "fits": fits, "seconds": seconds, "real_tokens": real,
               "peak_memory_bytes": peak_memory()}
        if fits:
            self.seconds_per_token = seconds / real
        else:  # outside the except block: its traceback holds the step's tensors
            self.training.close()
            self.training = None
            out["memory_after_free_bytes"] = current_memory()
        return out

    def run(self, chunk, start, cap, deadline):
        """{fits, fails, stopped_by, tries} of the search with grad_cache_chunk_size `chunk` (0: plain)."""
        self.cfg = dataclasses.replace(self.cfg, grad_cache_chunk_size=chunk)
        fits, fails, size, tries, stopped = 0, None, max(1, min(start, cap)), [], None
        while True:
            if time.monotonic() + self.predict(size, bool(chunk) and not tries) > deadline:
                stopped = "time"
                break
            if self.training is None and not self.rebuild():
                stopped = "out of memory building a fresh engine"
                break
            tries.append(self.attempt(size))
            if tries[-1]["fits"]:
                fits = size
            else:
                fails = size
            if fails is None:
                if size >= cap:
                    stopped = "max_batch"
                    break
                size = min(2 * size, cap)
            elif fails - fits > max(1, fits // 16):
                size = (fits + fails) // 2
            else:
                break
        return {"fits": fits, "fails": fails, "stopped_by": stopped, "tries": tries}


def run(args):
    started = time.monotonic()
    deadline = started + args.time_budget_s
    accelerator = make_accelerator()
    if accelerator.num_processes != 1:
        raise UserError(f"the GPU check measures one device: launch it with --num_processes 1 (got "
                        f"{accelerator.num_processes} processes)")
    env = environment(accelerator)
    peak, peak_source = peak_tflops(env["device"], args.peak_tflops)
    shape = TINY if args.tiny else QWEN3_06B
    make = partial(make_batch, num_neg=args.num_neg, max_len=args.max_len, scale=args.length_scale,
                   vocab_size=shape["vocab_size"])
    batches = [make(args.bs, seed=i) for i in range(args.warmup + args.steps)]
    measured = batches[args.warmup:]
    with tempfile.TemporaryDirectory() as path:
        model = save_random_model(shape, path, accelerator.device)
        base = Config(model_path=path, train_data_path=path, train_batch_size=args.bs, num_hard_neg=args.num_neg,
                      max_seq_length=args.max_len, warmup_steps=0, gradient_checkpointing=True)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(accelerator, base)
        layouts, first = {}, {}
        training, first["padded"], layouts["padded"] = measure_layout(
            accelerator, dataclasses.replace(base, batch_layout="padded", attn_implementation="sdpa"), batches,
            args.warmup)
        training.close()
        packed_cfg = dataclasses.replace(base, batch_layout="packed", attn_implementation="auto")
        training, first["packed"], layouts["packed"] = measure_layout(accelerator, packed_cfg, batches, args.warmup)
        for layout, result in layouts.items():
            layout_figures(result, layout, measured, model, peak)
        a, b = first["packed"], first["padded"]
        agreement = {"dtype": str(next(training.model.parameters()).dtype).removeprefix("torch."),
                     "max_abs_diff": float((a - b).abs().max()), "min_cosine": float(F.cosine_similarity(a, b).min()),
                     "max_abs_value": float(b.abs().max())}

        packed = layouts["packed"]
        search = BatchSearch(training, accelerator, packed_cfg, make, packed["real_tokens_per_step"] / args.bs,
                             1 / packed["real_tokens_per_s"], packed["build_seconds"])
        del training
        plain_deadline = time.monotonic() + PLAIN_SHARE * max(0.0, deadline - time.monotonic())
        plain = search.run(0, args.search_start, args.max_batch, plain_deadline)
        cached = search.run(args.grad_cache_chunk_size, max(plain["fits"], args.search_start), args.max_batch, deadline)
        if search.training is not None:
            search.training.close()

    return {
        "figure": "5: GPU check", "tiny": args.tiny, "environment": env,
        "model": {"shape": "tiny Qwen3" if args.tiny else "Qwen3-0.6B", **model, "dtype": agreement["dtype"],
                  "gradient_checkpointing": True},
        "batches": {"bs": args.bs, "num_neg": args.num_neg, "max_len": args.max_len,
                    "length_scale": args.length_scale, "warmup_steps": args.warmup, "measured_steps": args.steps,
                    "measured_lengths": [b["lengths"].tolist() for b in measured]},
        "flops_formula": "6 * non_embedding_params * T + 12 * num_hidden_layers * num_attention_heads * head_dim * S; "
                         "packed: T = sum L_i, S = sum L_i^2; padded: T = n * max L, S = n * max L^2",
        "peak_tflops": peak, "peak_tflops_source": peak_source, "memory_kind": MEMORY_KIND,
        "layouts": layouts,
        "speedup_packed_vs_padded": layouts["padded"]["seconds_per_step"] / layouts["packed"]["seconds_per_step"],
        "embedding_agreement": agreement,
        "batch_search": {"layout": "packed", "max_batch": args.max_batch, "time_budget_s": args.time_budget_s,
                         "plain": plain, "cached": {"grad_cache_chunk_size": args.grad_cache_chunk_size, **cached}},
        "elapsed_s": time.monotonic() - started,
    }


def _num(value, spec):
    return "-" if value is None else format(value, spec)


def _gib(value):
    return _num(None if value is None else value / 2**30, ".2f")


def _search_line(name, result):
    text = f"{name} {result['fits']}" if result["fails"] is not None else f"{name} >= {result['fits']}"
    if result["fails"] is not None:
        text += f" ({result['fails']} did not fit)"
    return text + (f" (stopped by {result['stopped_by']})" if result["stopped_by"] else "")


def report(result, out):
    m, bt, env = result["model"], result["batches"], result["environment"]
    rows = [[f"{layout} ({r['attn_implementation']})", f"{r['seconds_per_step']:.3f}", f"{r['real_tokens_per_s']:,.0f}",
             f"{r['computed_tokens_per_step']:,.0f}", f"{r['achieved_tflops']:.2f}", _num(r["mfu"], ".3f"),
             _num(r["mfu_real"], ".3f"), _gib(r["peak_memory_bytes"])]
            for layout, r in result["layouts"].items()]
    search, agree = result["batch_search"], result["embedding_agreement"]
    lines = [
        f"GPU check on {env['device']}: {m['shape']} ({m['params'] / 1e6:.1f}M params, "
        f"{m['non_embedding_params'] / 1e6:.1f}M without embeddings), {m['dtype']}, gradient checkpointing, "
        f"{env['distributed_type']} / {env['mixed_precision']}; bs {bt['bs']} x (2 + {bt['num_neg']}), max len "
        f"{bt['max_len']}, {bt['warmup_steps']} warm-up + {bt['measured_steps']} measured steps, "
        f"{result['layouts']['packed']['real_tokens_per_step']:,.0f} real tokens/step; peak "
        f"{_num(result['peak_tflops'], '.0f')} TFLOP/s ({result['peak_tflops_source'] or 'unknown: no MFU'})",
        benchutil.table(["layout", "s/step", "real tokens/s", "computed tokens/step", "TFLOP/s", "MFU", "MFU real",
                         "peak GiB"], rows),
        f"packed vs padded: {result['speedup_packed_vs_padded']:.2f}x; first-batch embeddings ({agree['dtype']}): "
        f"max abs diff {agree['max_abs_diff']:.2e} (values up to {agree['max_abs_value']:.2f}), min cosine "
        f"{agree['min_cosine']:.6f}",
        f"largest batch ({search['layout']}, queries with {bt['num_neg']} negatives): "
        + _search_line("plain", search["plain"]) + "; "
        + _search_line(f"cached (chunks of {search['cached']['grad_cache_chunk_size']})", search["cached"]),
        f"{out} written ({result['elapsed_s']:.0f} s; memory: {result['memory_kind']})"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3 and small sizes: the same code on the CPU")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    p.add_argument("--peak_tflops", type=float, help="the chip's dense bf16 peak (default: from the device name)")
    p.add_argument("--time_budget_s", type=float, default=400.0,
                   help="no batch-search try starts that would end later than this after start-up")
    for key in DEFAULTS["gpu"]:
        p.add_argument(f"--{key}", type=float if key == "length_scale" else int,
                       help=f"default {DEFAULTS['gpu'][key]}, with --tiny {DEFAULTS['tiny'][key]}")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(report(result, args.out), flush=True)
    return result


if __name__ == "__main__":
    main()
