"""Train an F2LLM embedding model.

    accelerate launch --config_file configs/accelerate_config.yaml run.py --config configs/config.json

One step: embed a homogeneous batch (queries, positives, hard negatives) with last-token pooling,
take the hard-negative loss (plus the in-batch loss on retrieval data), and step AdamW with a
warmup + cosine schedule clamped at min_lr. `--prepare_only` builds the train/validation split
cache in one process and exits (the recommended warm-up before a many-process launch).
"""
import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import signal
import sys
import time
from collections import defaultdict
from functools import partial
from itertools import islice

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import checkpoint
import tokenize_data_qwen
from config import load_config, load_dataset_types
from data import MultiDatasetLoader, check_datasets, holds_raw_files, load_splits, make_loader
from distributed import any_process, close, make_accelerator, warn
from errors import UserError, exit_on_user_error
from grad_cache import cached_backward
from metrics import retrieval_metrics, retrieval_set
from loss import f2llm_losses, matryoshka_dims
from lora import add_lora
from model import Embedder, check_library_support, check_model_folder, flatten, load_backbone, load_tokenizer


GRAD_NORM = ("", "grad_norm")  # LossTracker's key of the gradient norm, beside (dataset, loss term)


PUBLISHED_KINDS = {"inbatch": "in_batch"}  # our loss term names that the published keys spell otherwise
PUBLISHED_SPLITS = {"train": "training", "valid": "valid"}


class LossTracker:
    """Sums of each dataset's losses since the last report; reported as means over all processes.
    `kinds`: the loss terms a step can have ("inbatch", "hard", and with F2LLM-v2 options
    "mrl_inbatch", "mrl_hard", "kd"); every process must pass the same ones, as report() reduces
    them in one tensor. `keys`: the metric names report() gives (see metric_names)."""

    def __init__(self, names, task_of, kinds=("inbatch", "hard"), keys="grouped"):
        self.names = sorted(names)
        self.task_of = task_of
        self.kinds = (*kinds, "total")
        self.keys = keys
        self.sums = {}
        self.counts = defaultdict(int)

    def add(self, name, losses, grad_norm=None):
        """Accumulates on the device: no host sync per step. The gradient norm (a float, the same on
        every process) is averaged over all datasets' steps."""
        for kind, value in {**losses, "total": sum(losses.values())}.items():
            self.sums[name, kind] = self.sums.get((name, kind), 0) + value.detach().double()
            self.counts[name, kind] += 1
        if grad_norm is not None:
            self.sums[GRAD_NORM] = self.sums.get(GRAD_NORM, 0) + grad_norm
            self.counts[GRAD_NORM] += 1

    def report(self, accelerator, prefix):
        """Each dataset's mean of each loss term, each task type's mean of its datasets' means (named
        by metric_names), {prefix/loss: mean total loss per step} and {prefix/grad_norm: mean per step};
        resets."""
        keys = [(n, k) for n in self.names for k in self.kinds] + [GRAD_NORM]
        zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        totals = torch.stack([torch.stack([zero + self.sums.get(key, 0), zero + self.counts[key]]) for key in keys])
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        self.sums.clear()
        self.counts.clear()
        means = {key: total / count for key, (total, count) in zip(keys, totals) if count}
        out = {f"{prefix}/grad_norm": means.pop(GRAD_NORM)} if GRAD_NORM in means else {}
        by_task = defaultdict(list)
        for (name, kind), mean in means.items():
            by_task[self.task_of[name], kind].append(mean)
        out.update(self.metric_names(prefix, means))
        out.update(self.metric_names(prefix, {key: sum(v) / len(v) for key, v in sorted(by_task.items())}, tasks=True))
        totals = [(total, count) for (_, kind), (total, count) in zip(keys, totals) if kind == "total"]
        if sum(count for _, count in totals):
            out[f"{prefix}/loss"] = sum(total for total, _ in totals) / sum(count for _, count in totals)
        return out

    def metric_names(self, prefix, means, tasks=False):
        """{metric name: mean} of {(dataset, or task type with `tasks`, kind): mean}. `grouped`:
        prefix/dataset/kind and prefix/task_type/kind, each term apart. `published`: the published
        TensorBoard names, dataset/training_loss_hard (valid_loss_... for validation) and
        Avg/task_type/training_loss_in_batch; in training the Matryoshka terms are added to the loss
        they cut, as the published code logs them (its validation has none: ours are kept apart)."""
        if self.keys == "grouped":
            return {f"{prefix}/{name}/{kind}": mean for (name, kind), mean in means.items()}
        out = defaultdict(float)
        for (name, kind), mean in means.items():
            kind = kind.removeprefix("mrl_") if prefix == "train" else kind
            kind = PUBLISHED_KINDS.get(kind, kind)
            out[f"{'Avg/' if tasks else ''}{name}/{PUBLISHED_SPLITS[prefix]}_loss_{kind}"] += mean
        return dict(out)

    def state_dict(self, accelerator):
        """The pending sums, reduced over processes (collective), for a checkpoint."""
        keys = sorted(self.counts)
        values = torch.tensor([[float(self.sums[key]), self.counts[key]] for key in keys] or [[0.0, 0]],
                              dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, reduction="sum").tolist()
        return {f"{name}/{kind}": value for (name, kind), value in zip(keys, values)}

    def load_state_dict(self, state, accelerator):
        """Pending sums from a checkpoint; kept by the main process only, as report() sums processes."""
        if accelerator.is_main_process:
            for key, (total, count) in state.items():
                name, kind = key.rsplit("/", 1)
                self.sums[name, kind] = torch.tensor(total, dtype=torch.float64, device=accelerator.device)
                self.counts[name, kind] = int(count)


class Throughput:
    """Real (unpadded) tokens and steps per second of training, summed over processes; the time
    spent validating and checkpointing (inside `paused()`) does not count."""

    def __init__(self):
        self.tokens, self.steps, self.seconds, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, tokens):
        self.tokens += tokens
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        self.seconds += time.perf_counter() - self.start
        yield
        self.start = time.perf_counter()

    def report(self, accelerator):
        """{train/tokens_per_s, train/steps_per_s} since the last report (collective); resets."""
        with self.paused():
            tokens = accelerator.reduce(torch.tensor(float(self.tokens), device=accelerator.device), "sum").item()
            seconds = max(self.seconds, 1e-9)
            out = {"train/tokens_per_s": tokens / seconds, "train/steps_per_s": self.steps / seconds}
            self.tokens, self.steps, self.seconds = 0, 0, 0.0
        return out


def batch_losses(embeddings, batch, task, cfg):
    """The losses of one batch (loss.f2llm_losses): {"hard": ..., "inbatch": ...(retrieval only)}, or
    with contrastive_loss joint {"joint": ...} on retrieval batches; plus "mrl_*" with use_mrl and
    "kd" when the batch carries its teacher embeddings."""
    mrl_dims = matryoshka_dims(embeddings.shape[-1], cfg.mrl_dims) if cfg.use_mrl else ()
    return f2llm_losses(embeddings, batch["num_queries"], batch["num_neg"], task, cfg.temperature,
                        cfg.inbatch_gradient, mrl_dims, batch.get("teacher"), cfg.kd_weight, cfg.contrastive_loss,
                        cfg.false_negative_margin, batch.get("doc_keys"))


def loss_kinds(cfg, distill=False):
    """The loss terms a step logs: the contrastive ones, plus the F2LLM-v2 ones the config turns on."""
    kinds = ("joint", "hard") if cfg.contrastive_loss == "joint" else ("inbatch", "hard")
    return kinds + tuple(f"mrl_{kind}" for kind in kinds if cfg.use_mrl) + (("kd",) if distill else ())


def embed(model, batch):
    return model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])


def all_finite(losses, accelerator):
    """True when every process's losses are finite; one all-reduce, so all processes agree."""
    bad = torch.stack([~torch.isfinite(value.detach()) for value in losses.values()]).any()
    return not any_process(accelerator, bad)


def forward_backward(model, batch, task, cfg, accelerator):
    """The batch's losses, with their gradient accumulated into the parameters; None, with no
    backward pass, when a loss is not finite on any process (all processes skip together)."""
    proceed = partial(all_finite, accelerator=accelerator)
    if cfg.grad_cache_chunk_size:
        return cached_backward(model, batch, partial(batch_losses, batch=batch, task=task, cfg=cfg),
                               cfg.grad_cache_chunk_size, accelerator, proceed)
    losses = batch_losses(embed(model, batch), batch, task, cfg)
    if not proceed(losses):
        return None
    accelerator.backward(sum(losses.values()))
    return losses


def weights_finite(model, accelerator):
    """Whether every weight is finite on every process: one norm per tensor (a non-finite weight
    makes its norm non-finite; weights beyond about 1e19 overflow it too, and no trained model has
    them), one host sync and one all-reduce."""
    norms = torch.stack([p.detach().norm().float() for p in model.parameters()])
    return not any_process(accelerator, not torch.isfinite(norms).all().item())


def train_step(model, batch, task, cfg, accelerator, optimizer, scheduler, teacher=None):
    """One optimizer step on one batch: (its losses, the gradient norm before clipping), the losses
    None if the step was skipped because a loss or the gradient norm was not finite, the norm None
    when unknown. The lr schedule advances either way. With a teacher (knowledge distillation), its
    embeddings of the batch join the loss."""
    if teacher is not None:
        with torch.no_grad():
            batch = {**batch, "teacher": embed(teacher, batch)}
    losses = forward_backward(model, batch, task, cfg, accelerator)
    norm = None
    if losses is not None:
        applied, norm = optimizer_step(model, cfg, accelerator, optimizer)
        if not applied:
            losses = None
        elif not weights_finite(model, accelerator):  # a finite gradient times a huge learning rate
            raise UserError(f"an optimizer step (lr {optimizer.param_groups[0]['lr']:.3g}, gradient norm {norm:.3g}) "
                            "made the weights non-finite (or too large for a finite norm); nothing was saved from it. "
                            'Lower learning_rate, then resume_from "latest" (or start again)')
    optimizer.zero_grad()
    scheduler.step()
    clamp_lr(scheduler.optimizer, cfg.min_lr)
    return losses, norm


def optimizer_step(model, cfg, accelerator, optimizer):
    """Clip the gradient and step, unless its norm is not finite: (stepped, norm before clipping).

    DeepSpeed has already clipped and stepped inside accelerator.backward, skipping a step whose
    gradient is not finite itself; this reads what it did (its norm is None when it computes none).
    A DeepSpeed that applied a non-finite step has turned the weights to garbage: stop there."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine = accelerator.deepspeed_engine_wrapped.engine
        norm, applied = engine.get_global_grad_norm(), engine.was_step_applied()
        norm = None if norm is None else float(norm)
        if applied and norm is not None and not math.isfinite(norm):
            raise UserError(f"DeepSpeed {importlib.metadata.version('deepspeed')} applied an optimizer step whose "
                            f"gradient norm is {norm}, so the weights are no longer finite; upgrade deepspeed "
                            '(0.19.8 skips such steps) and resume from the last checkpoint ("resume_from": "latest")')
        return applied, norm
    norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    if not math.isfinite(norm):
        return False, norm
    optimizer.step()
    return True, norm


@torch.no_grad()
def validate(model, valid_loaders, eval_sets, task_of, cfg, accelerator):
    """The validation losses of every dataset, and the retrieval metrics of the eval_sets."""
    model.eval()
    tracker = LossTracker(valid_loaders, task_of, loss_kinds(cfg), cfg.log_keys)
    for name in sorted(valid_loaders):
        for batch in valid_loaders[name]:
            batch = to_device(batch, accelerator.device)
            tracker.add(name, batch_losses(embed(model, batch), batch, task_of[name], cfg))
    model.train()
    return {**tracker.report(accelerator, "valid"), **retrieval_eval(model, eval_sets, cfg, accelerator)}


@torch.no_grad()
def embed_shared(model, sequences, chunk, accelerator):
    """Normalised embeddings [n, d] of token lists, on every process; each process embeds every
    world-th sequence, in chunks of `chunk` sequences, and the shares are gathered."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = sequences[rank::world]
    parts = [F.normalize(model(*(t.to(accelerator.device) for t in flatten(mine[i : i + chunk]))).float(), dim=-1)
             for i in range(0, len(mine), chunk)]
    local = torch.cat(parts) if parts else torch.empty(0, model.backbone.config.hidden_size,
                                                        device=accelerator.device)
    if world == 1:
        return local
    gathered = accelerator.gather(accelerator.pad_across_processes(local[None], dim=1))  # [world, m, d]
    # process r's i-th row is sequence r + i * world: interleave the shares back into order
    return gathered.transpose(0, 1).reshape(-1, local.shape[-1])[: len(sequences)]


@torch.no_grad()
def retrieval_eval(model, eval_sets, cfg, accelerator):
    """nDCG@10, MRR@10 and recall@10 of each retrieval dataset's validation queries, ranked against
    the positives and negatives of those rows, and their means under valid/retrieval/."""
    module = accelerator.unwrap_model(model)  # a plain forward: processes may run different chunk counts
    module.eval()
    out, chunk = {}, cfg.train_batch_size * (2 + cfg.num_hard_neg)
    for name, (queries, docs, relevant) in eval_sets.items():
        scores = embed_shared(module, queries, chunk, accelerator) @ embed_shared(module, docs, chunk, accelerator).T
        out.update({f"valid/{name}/{key}": value for key, value in retrieval_metrics(scores, relevant).items()})
    for key in ("ndcg@10", "mrr@10", "recall@10"):
        values = [out[f"valid/{name}/{key}"] for name in eval_sets]
        if values:
            out[f"valid/retrieval/{key}"] = sum(values) / len(values)
    module.train()
    return out


def to_device(batch, device):
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def make_optimizer(params, cfg):
    """AdamW. `fused` computes the same update as torch's default (foreach on a GPU, a loop over the
    tensors on the CPU) in one kernel per step; the CPU loop spent 12 of 19 s per 100 steps of a
    tiny model with Qwen3's 9.7M-row embedding (bench_peers). sentence-transformers' Trainer uses it
    too (adamw_torch_fused)."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                             fused=True if cfg.adamw_implementation == "fused" else None)


def make_scheduler(optimizer, cfg, total_steps, num_processes=1, unsharded_steps=None):
    """The lr schedule: linear warmup, then cosine decay or (v2) constant.

    `lr_schedule_steps` "optimizer": warmup over warmup_steps optimizer steps, cosine over the run's
    total_steps. "published_v1" / "published_v2": what the published code's schedule did, which
    accelerate steps num_processes times per optimizer step, over `unsharded_steps` (one process's
    step count of the unsharded data, or train_steps): v1's warmup lasts warmup_steps /
    num_processes optimizer steps; v2 multiplies warmup_steps by num_processes to undo that."""
    cosine = cfg.scheduler_type == "cosine"
    if cfg.lr_schedule_steps == "optimizer":
        factor = partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, cosine=cosine)
    else:
        warmup = cfg.warmup_steps * (num_processes if cfg.lr_schedule_steps == "published_v2" else 1)
        factor = partial(stepped_lr_factor, per_step=num_processes, warmup=warmup, total=unsharded_steps,
                         cosine=cosine)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stepped_lr_factor(step, per_step, **kw):
    """lr_factor of a schedule advanced per_step times per optimizer step."""
    return lr_factor(step * per_step, **kw)


def lr_factor(step, warmup, total, cosine):
    """The lr multiplier after `step` steps: transformers' get_cosine_schedule_with_warmup (one half
    cosine) or get_constant_schedule_with_warmup, which the published code calls, written here
    because importing transformers.optimization costs each process seconds."""
    if step < warmup:
        return step / max(1, warmup)
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def clamp_lr(optimizer, min_lr):
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"], min_lr)


def checkpoint_due(step, total_steps, cfg):
    """Whether `step` saves a step_N checkpoint: every checkpointing_steps; with merge_checkpoints
    also F2LLM-v2's checkpoints for merging, step 5 and (when checkpointing_steps is on) every 500th
    step of the last 2,500, as the published code's condition."""
    if cfg.merge_checkpoints and (step == 5 or (cfg.checkpointing_steps and step % 500 == 0
                                                and step > total_steps - 2500)):
        return True
    return bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Remembers SIGTERM or SIGUSR1 (preemption notices): the loop finishes its step, saves a
    checkpoint and exits with status 0, instead of dying mid-step. Once the stop is agreed, further
    notices are ignored (a scheduler often repeats them), so that none cuts the stop path short."""

    def __init__(self):
        self.received = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, accelerator):
        """The signal if any process received one (all processes stop at the same step)."""
        if not any_process(accelerator, self.received is not None):
            return False
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return True


class SurvivingStream:
    """A text stream whose writes never raise: once its reader is gone (a closed pipe: `| tee log`
    killed with the job's process group) or its file cannot take more, the descriptor is pointed at
    /dev/null and the text dropped, so that a preempted run still saves and exits 0 (see note)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # BrokenPipeError, ENOSPC, EIO; ValueError: the stream was closed
            self.drop()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.drop()

    def drop(self):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO): the write was dropped anyway
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def survive_closed_output():
    """Route stdout and stderr (prints, tqdm, logging) through SurvivingStream."""
    if not isinstance(sys.stdout, SurvivingStream):
        sys.stdout = SurvivingStream(sys.stdout)
    if not isinstance(sys.stderr, SurvivingStream):
        sys.stderr = SurvivingStream(sys.stderr)


def note(accelerator, cfg, line):
    """Print a line that matters after the output may be gone (a stop, the final checkpoint), and
    append it to run_dir/run.log, which outlives a closed pipe."""
    accelerator.print(line)
    if accelerator.is_main_process:
        try:
            with open(os.path.join(cfg.run_dir, "run.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON config (see configs/config.json and the README)")
    p.add_argument("--prepare_only", action="store_true", help="build the dataset split cache, then exit")
    p.add_argument("--break_lock", action="store_true",
                   help="take over the run folder's lock even if its holder may still run (see the README)")
    return p.parse_args(argv)


def raw_data_cache(cfg):
    """None if train_data_path holds tokenized files; if it holds raw texts, the folder under
    cache_dir that tokenize_if_raw tokenizes them into."""
    if not holds_raw_files(cfg.train_data_path):
        return None
    source = os.path.abspath(cfg.train_data_path)
    return os.path.join(cfg.cache_dir, "tokenized",
                        f"{os.path.basename(source)}-{hashlib.sha256(source.encode()).hexdigest()[:8]}")


def tokenize_if_raw(cfg, accelerator=None):
    """The folder training reads: train_data_path, or, when it holds raw texts, raw_data_cache(cfg),
    which the main process fills with tokenize_data_qwen.py --layout v2 at the config's max_seq_length
    while the others wait (and stop with it if it fails). In this process rather than a run of the
    script: that saves a second start of torch and transformers, about 5 s, most of a small dataset's
    tokenization. A file is tokenized again only when it, the tokenizer or max_seq_length changed
    (the script's records)."""
    out = raw_data_cache(cfg)
    if out is None:
        return cfg.train_data_path
    problem = None
    if accelerator is None or accelerator.is_main_process:
        try:
            tokenize_data_qwen.main.__wrapped__(["--model_path", cfg.model_path, "--input_dir", cfg.train_data_path,
                                                 "--output_dir", out, "--max_seq_length", str(cfg.max_seq_length),
                                                 "--layout", "v2"])
        except UserError as err:
            problem = str(err)
    if accelerator is None and problem:
        raise UserError(problem)
    if accelerator is not None and any_process(accelerator, problem is not None):
        if problem:
            raise UserError(problem)
        raise SystemExit(2)
    return out


def prepare(cfg, checked):
    """{name: (task type, train split, validation split)}, built (or read from cache) for the
    datasets that check_datasets returned."""
    return {name: (task, *load_splits(path, columns, cfg)) for name, path, task, columns in checked}


def configure_deepspeed(accelerator, cfg):
    """The DeepSpeed config accelerate built from its yaml, completed before prepare(): the micro
    batch, and a warning when it clips at another norm than the config's."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    clip = ds_config.get("gradient_clipping")
    if isinstance(clip, (int, float)) and clip != cfg.max_grad_norm:
        warn(accelerator, f"DeepSpeed clips gradients at {clip} (gradient_clipping of the accelerate config), "
                          f"not at max_grad_norm {cfg.max_grad_norm}")


def build_model(cfg, tokenizer, accelerator):
    # DeepSpeed's bf16 mode keeps float32 master weights (and casts the model to bf16 itself). Anywhere
    # else bf16 weights would lose small AdamW updates: keep float32, and let accelerate's mixed
    # precision run the matmuls in bf16.
    ds_bf16 = accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "bf16"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if ds_bf16 else "float32")
    backbone = load_backbone(cfg.model_path, cfg.attn_implementation, dtype, cfg.gradient_checkpointing,
                             packed=cfg.batch_layout == "packed")
    hidden = backbone.config.hidden_size
    if cfg.use_mrl and any(dim >= hidden for dim in matryoshka_dims(hidden, cfg.mrl_dims)):
        raise UserError(f"mrl_dims {cfg.mrl_dims} must all be below the model's hidden size {hidden}")
    if cfg.lora:
        backbone = add_lora(backbone, cfg.lora)
    mask_pad = tokenizer.pad_token_id if cfg.attention_mask_from == "pad_token_id" else None
    return Embedder(backbone, cfg.batch_layout, tokenizer.pad_token_id, mask_pad)


def build_teacher(cfg, tokenizer, hidden_size, device):
    """The frozen teacher Embedder for knowledge distillation, or None without teacher_model_path.
    It must share the student's tokenizer (it embeds the same token ids) and be at least as wide."""
    if not cfg.teacher_model_path:
        return None
    if load_tokenizer(cfg.teacher_model_path, "teacher_model_path").get_vocab() != tokenizer.get_vocab():
        raise UserError(f"teacher_model_path {cfg.teacher_model_path}: its tokenizer differs from model_path's; "
                        "the teacher embeds the student's token ids, so both need the same tokenizer")
    backbone = load_backbone(cfg.teacher_model_path, cfg.attn_implementation, cfg.dtype,
                             packed=cfg.batch_layout == "packed", setting="teacher_model_path")
    if backbone.config.hidden_size < hidden_size:
        raise UserError(f"teacher_model_path {cfg.teacher_model_path}: hidden size {backbone.config.hidden_size} "
                        f"is below the student's {hidden_size}; its embeddings are cut to the student's size")
    backbone.requires_grad_(False)
    mask_pad = tokenizer.pad_token_id if cfg.attention_mask_from == "pad_token_id" else None  # as the student's
    return Embedder(backbone, cfg.batch_layout, tokenizer.pad_token_id, mask_pad).to(device).eval()


def build_loaders(splits, cfg, tokenizer, vocab_size, accelerator):
    """This process's train batches (one MultiDatasetLoader) and validation batches {name: batches}."""
    def loader(name, split, task, **kw):
        return make_loader(split, task, cfg, tokenizer.eos_token_id, rank=accelerator.process_index,
                           world=accelerator.num_processes, vocab_size=vocab_size,
                           name=os.path.join(cfg.train_data_path, f"{name}.parquet"), **kw)

    train = {name: loader(name, split, task, train=True, stream=i)
             for i, (name, (task, split, _)) in enumerate(splits.items())}
    valid = {name: loader(name, split, task, train=False) for name, (task, _, split) in splits.items()}
    return MultiDatasetLoader(train, seed=cfg.seed, published_draw=cfg.dataset_draw == "published"), valid


def open_writer(cfg, accelerator):
    """args.json and the TensorBoard writer, on the main process only (None elsewhere)."""
    if not accelerator.is_main_process:
        return None
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    return SummaryWriter(os.path.join(cfg.tb_dir, cfg.experiment_id))


def log(writer, metrics, step):
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()


def check_resumable(state, cfg, accelerator, train_loader):
    """A checkpoint continues exactly only with the same data and batch size (checkpoint.restore
    checks the number of processes); other changes (a new learning rate, say) get a warning."""
    batches = {name: len(loader) for name, loader in train_loader.loaders.items()}
    if state["batches_per_epoch"] != batches:
        raise UserError("resume_from: the training data or train_batch_size changed since the checkpoint "
                        f"(batches per dataset then {state['batches_per_epoch']}, now {batches}); "
                        "resume with the same data, or start afresh")
    now = dataclasses.asdict(cfg)
    where = ("resume_from", "output_dir", "tb_dir", "experiment_id", "cache_dir", "checkpointing_steps",
             "save_total_limit", "log_interval", "validation_steps")  # do not change the training itself
    changed = [f"{k} ({v!r} -> {now[k]!r})" for k, v in state["config"].items()
               if k not in where and k in now and now[k] != v]
    if changed:
        warn(accelerator, "config changed since the checkpoint: " + ", ".join(changed))


@exit_on_user_error
def main(argv=None):
    survive_closed_output()
    args = parse_args(argv)
    cfg = load_config(args.config)
    dataset_types = load_dataset_types(cfg)
    if args.prepare_only:
        checked = check_datasets(cfg, dataset_types, tokenize_if_raw(cfg))
        for name, (task, train, valid) in prepare(cfg, checked).items():
            print(f"{name:32s} {task:15s} train {len(train):9d}  validation {len(valid):7d}")
        return

    accelerator = make_accelerator()
    fit(cfg, args, dataset_types, accelerator)
    close(accelerator)


def fit(cfg, args, dataset_types, accelerator):
    """The run, from the checks of its inputs to the final checkpoint, on every process."""
    tokenizer = load_tokenizer(cfg.model_path)
    check_model_folder(cfg.model_path)  # a wrong folder is one line before the data is prepared
    check_library_support(cfg.attn_implementation, cfg.batch_layout == "packed")  # so is a wrong-results stack
    if cfg.teacher_model_path:
        check_model_folder(cfg.teacher_model_path, "teacher_model_path")
    checked = check_datasets(cfg, dataset_types, tokenize_if_raw(cfg, accelerator))  # all fail at once on bad input
    checkpoint.RunLock(accelerator, cfg.run_dir, args.break_lock)  # before any write; checks it is writable
    set_seed(cfg.seed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    with accelerator.main_process_first():  # one process builds the split cache, the others read it
        splits = dict(sorted(prepare(cfg, checked).items()))
    task_of = {name: task for name, (task, _, _) in splits.items()}
    eval_sets = {name: retrieval_set(valid, cfg.eval_queries) for name, (task, _, valid) in splits.items()
                 if task == "retrieval" and cfg.eval_queries}

    model = build_model(cfg, tokenizer, accelerator)
    teacher = build_teacher(cfg, tokenizer, model.backbone.config.hidden_size, accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    adamw = make_optimizer(trainable, cfg)
    train_loader, valid_loaders = build_loaders(splits, cfg, tokenizer, model.backbone.config.vocab_size, accelerator)
    model, optimizer = accelerator.prepare(model, adamw)
    per_epoch = len(train_loader)
    total_steps = cfg.train_steps if cfg.train_steps > 0 else per_epoch * cfg.train_epochs
    unsharded = sum(-(-len(train) // cfg.train_batch_size) for _, train, _ in splits.values()) * cfg.train_epochs
    # Stepped once per optimizer step here, not by accelerate (which steps it once per process).
    # It and the min_lr clamp act on AdamW's param groups, which DDP and DeepSpeed ZeRO step with.
    scheduler = make_scheduler(adamw, cfg, total_steps, accelerator.num_processes,
                               cfg.train_steps if cfg.train_steps > 0 else unsharded)
    accelerator.register_for_checkpointing(scheduler)

    tracker = LossTracker(splits, task_of, loss_kinds(cfg, distill=teacher is not None), cfg.log_keys)
    step, bad_in_a_row, skipped = 0, 0, 0
    state = checkpoint.restore(accelerator, cfg.resume_from, cfg.run_dir)
    if state is not None:
        check_resumable(state, cfg, accelerator, train_loader)
        step, bad_in_a_row, skipped = state["step"], state["bad_steps_in_a_row"], state["skipped_steps"]
        tracker.load_state_dict(state["tracker"], accelerator)
        if step >= total_steps:
            accelerator.print(f"the run had already finished ({step} of {total_steps} steps); nothing to do")
            return

    def save(name):
        trainer_state = {"step": step, "epoch": step // per_epoch, "position": step % per_epoch,
                         "world_size": accelerator.num_processes,
                         "batches_per_epoch": {n: len(b) for n, b in train_loader.loaders.items()},
                         "bad_steps_in_a_row": bad_in_a_row, "skipped_steps": skipped,
                         "tracker": tracker.state_dict(accelerator), "config": dataclasses.asdict(cfg)}
        return checkpoint.save(accelerator, model, tokenizer, os.path.join(cfg.run_dir, name), trainer_state,
                               cfg.save_total_limit, cfg.max_seq_length, cfg.prompts)

    writer = open_writer(cfg, accelerator)
    accelerator.print(f"{len(splits)} datasets, {per_epoch} batches per epoch per process, "
                      f"{total_steps} steps, {accelerator.num_processes} process(es)")
    stop, throughput = StopSignal(), Throughput()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    try:  # the bar ends its line before any error line
        saved, stopped = None, False
        model.train()
        for epoch in range(step // per_epoch, cfg.train_epochs):
            train_loader.set_epoch(epoch, start=step - epoch * per_epoch)
            for name, batch in islice(train_loader, max(total_steps - step, 0)):
                throughput.add(len(batch["input_ids"]))
                batch = to_device(batch, accelerator.device)
                losses, grad_norm = train_step(model, batch, task_of[name], cfg, accelerator, optimizer, scheduler,
                                               teacher)
                step += 1

                bar.update(1)
                if losses is not None:
                    tracker.add(name, losses, grad_norm)
                    bad_in_a_row = 0
                else:
                    bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                    warn(accelerator, f"step {step}: non-finite loss or gradient on {name}; step skipped "
                                      f"({bad_in_a_row} in a row, {skipped} in all)")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        path = save(f"step_{step}")
                        raise UserError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                        f"(max_bad_steps {cfg.max_bad_steps}); stopped at step {step}, checkpoint "
                                        f"{path} holds the weights of the last applied step (finite, checked). Lower "
                                        "learning_rate or check the data, then resume_from it")
                if step % cfg.log_interval == 0:
                    metrics = {"lr": adamw.param_groups[0]["lr"], "train/skipped_steps": skipped,
                               **tracker.report(accelerator, "train"), **throughput.report(accelerator)}
                    log(writer, metrics, step)
                    bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}", lr=f"{metrics['lr']:.2e}",
                                    tokens_per_s=f"{metrics['train/tokens_per_s']:.0f}")
                with throughput.paused():
                    if cfg.validation_steps and step % cfg.validation_steps == 0:
                        log(writer, validate(model, valid_loaders, eval_sets, task_of, cfg, accelerator), step)
                    if checkpoint_due(step, total_steps, cfg):
                        saved = save(f"step_{step}")
                if stop.agreed(accelerator):
                    path = saved if saved == os.path.join(cfg.run_dir, f"step_{step}") else save(f"step_{step}")
                    note(accelerator, cfg, f"stopped by {stop.received or 'a signal to another process'} at step "
                                           f'{step}: checkpoint {path}; continue with "resume_from": "latest"')
                    stopped = True
                    break
            if stopped:
                break
            # An epoch end, or train_steps reached inside an epoch: validate (unless this step just was)
            # and save either way.
            with throughput.paused():
                if not (cfg.validation_steps and step % cfg.validation_steps == 0):
                    log(writer, validate(model, valid_loaders, eval_sets, task_of, cfg, accelerator), step)
                just_saved = saved == os.path.join(cfg.run_dir, f"step_{step}")
                if step == (epoch + 1) * per_epoch and just_saved:
                    saved = checkpoint.save_copy(accelerator, saved, os.path.join(cfg.run_dir, f"epoch_{epoch + 1}"),
                                            cfg.save_total_limit)
                elif step == (epoch + 1) * per_epoch:
                    saved = save(f"epoch_{epoch + 1}")
                elif not just_saved:
                    saved = save(f"step_{step}")
            if step >= total_steps:
                break
    finally:
        bar.close()
    if writer is not None:
        writer.close()
    if not stopped:
        note(accelerator, cfg, f"final checkpoint: {saved}")


if __name__ == "__main__":
    main()
