"""Train an F2LLM embedding model.

    accelerate launch --config_file configs/accelerate_config.yaml run.py --config configs/config.json

One step: embed a homogeneous batch (queries, positives, hard negatives) with last-token pooling,
take the hard-negative loss (plus the in-batch loss on retrieval data), and step AdamW with a
warmup + cosine schedule clamped at min_lr. `--prepare_only` builds the train/validation split
cache in one process and exits (the recommended warm-up before a many-process launch).
"""
import argparse
import dataclasses
import json
import os
from collections import defaultdict
from functools import partial
from itertools import islice

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from config import TASK_TYPES, load_config, load_dataset_types
from data import MultiDatasetLoader, check_datasets, load_splits, make_loader
from errors import UserError, exit_on_user_error
from grad_cache import cached_backward
from loss import f2llm_losses
from model import Embedder, load_backbone, load_tokenizer


class LossTracker:
    """Sums of each dataset's losses since the last report; reported as means over all processes."""

    def __init__(self, names, task_of):
        self.names = sorted(names)
        self.task_of = task_of
        self.sums = {}
        self.counts = defaultdict(int)

    def add(self, name, losses):
        """Accumulates on the device: no host sync per step."""
        for kind, value in losses.items():
            self.sums[name, kind] = self.sums.get((name, kind), 0) + value.detach().double()
            self.counts[name, kind] += 1

    def report(self, accelerator, prefix):
        """{prefix/dataset/kind: mean} and {prefix/task_type/kind: mean of its datasets}; resets."""
        keys = [(n, k) for n in self.names for k in ("inbatch", "hard")]
        zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        totals = torch.stack([torch.stack([self.sums.get(key, zero), zero + self.counts[key]]) for key in keys])
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        self.sums.clear()
        self.counts.clear()
        out, by_task = {}, defaultdict(list)
        for (name, kind), (total, count) in zip(keys, totals):
            if count:
                out[f"{prefix}/{name}/{kind}"] = total / count
                by_task[self.task_of[name], kind].append(total / count)
        for (task, kind), means in sorted(by_task.items()):
            out[f"{prefix}/{task}/{kind}"] = sum(means) / len(means)
        return out


def batch_losses(embeddings, batch, task, cfg):
    """The recipe's losses of one batch: {"hard": ..., "inbatch": ...(retrieval only)}."""
    return f2llm_losses(embeddings, batch["num_queries"], batch["num_neg"], task, cfg.temperature,
                        cfg.gather_with_grad)


def embed(model, batch):
    return model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])


def forward_backward(model, batch, task, cfg, accelerator):
    """Losses of one batch, with their gradient accumulated into the parameters."""
    if cfg.grad_cache_chunk_size:
        return cached_backward(model, batch, partial(batch_losses, batch=batch, task=task, cfg=cfg),
                               cfg.grad_cache_chunk_size, accelerator)
    losses = batch_losses(embed(model, batch), batch, task, cfg)
    accelerator.backward(sum(losses.values()))
    return losses


@torch.no_grad()
def validate(model, valid_loaders, task_of, cfg, accelerator):
    model.eval()
    tracker = LossTracker(valid_loaders, task_of)
    for name in sorted(valid_loaders):
        for batch in valid_loaders[name]:
            tracker.add(name, batch_losses(embed(model, batch), batch, task_of[name], cfg))
    model.train()
    return tracker.report(accelerator, "valid")


def save_checkpoint(accelerator, model, tokenizer, path):
    """Backbone weights and tokenizer (`save_pretrained`), loadable with AutoModel / AutoTokenizer."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).backbone.save_pretrained(path, save_function=accelerator.save)
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()
    accelerator.print(f"checkpoint saved: {path}")
    return path


def clamp_lr(optimizer, min_lr):
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"], min_lr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON config (see configs/config.json and the README)")
    p.add_argument("--prepare_only", action="store_true", help="build the dataset split cache, then exit")
    return p.parse_args(argv)


def prepare(cfg, checked):
    """{name: (task type, train split, validation split)}, built (or read from cache) for the
    datasets that check_datasets returned."""
    return {name: (task, *load_splits(path, columns, cfg)) for name, path, task, columns in checked}


def build_model(cfg, tokenizer, deepspeed):
    # Without DeepSpeed's fp32 master weights, bf16 weights would lose small AdamW updates:
    # keep float32 and let accelerate's mixed precision run the matmuls in bf16.
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if deepspeed else "float32")
    backbone = load_backbone(cfg.model_path, cfg.attn_implementation, dtype, cfg.gradient_checkpointing,
                             packed=cfg.batch_layout == "packed")
    mask_pad = tokenizer.pad_token_id if cfg.attention_mask_from == "pad_token_id" else None
    return Embedder(backbone, cfg.batch_layout, tokenizer.pad_token_id, mask_pad)


def build_loaders(splits, cfg, tokenizer, process_index):
    """Per-dataset train and validation DataLoaders, in name order."""
    seed = cfg.seed + process_index  # negatives differ across processes and repeat across runs
    eos = tokenizer.eos_token_id
    train = [make_loader(split, task, cfg, eos, seed + i, train=True)
             for i, (task, split, _) in enumerate(splits.values())]
    valid = [make_loader(split, task, cfg, eos, seed, train=False) for task, _, split in splits.values()]
    return train, valid


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


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config)
    dataset_types = load_dataset_types(cfg)
    if args.prepare_only:
        for name, (task, train, valid) in prepare(cfg, check_datasets(cfg, dataset_types)).items():
            print(f"{name:32s} {task:15s} train {len(train):9d}  validation {len(valid):7d}")
        return

    accelerator = Accelerator()
    set_seed(cfg.seed)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        if cfg.grad_cache_chunk_size:
            raise UserError("grad_cache_chunk_size is not supported under DeepSpeed (it steps on every backward): "
                            "launch with configs/accelerate_ddp.yaml, or set grad_cache_chunk_size to 0")
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    tokenizer = load_tokenizer(cfg.model_path)
    checked = check_datasets(cfg, dataset_types)  # every process fails at once on bad input
    with accelerator.main_process_first():  # one process builds the split cache, the others read it
        splits = dict(sorted(prepare(cfg, checked).items()))
    task_of = {name: task for name, (task, _, _) in splits.items()}

    model = build_model(cfg, tokenizer, deepspeed)
    adamw = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                              weight_decay=cfg.weight_decay)
    train_loaders, valid_loaders = build_loaders(splits, cfg, tokenizer, accelerator.process_index)
    model, optimizer, *loaders = accelerator.prepare(model, adamw, *train_loaders, *valid_loaders)
    train_loader = MultiDatasetLoader(zip(splits, loaders[: len(splits)]), seed=cfg.seed)
    valid_loaders = dict(zip(splits, loaders[len(splits):]))
    total_steps = cfg.train_steps if cfg.train_steps > 0 else len(train_loader) * cfg.train_epochs
    # Stepped once per optimizer step here, not by accelerate (which steps it once per process).
    # It and the min_lr clamp act on AdamW's param groups, which DDP and DeepSpeed ZeRO step with.
    scheduler = get_cosine_schedule_with_warmup(adamw, cfg.warmup_steps, total_steps)

    writer = open_writer(cfg, accelerator)
    accelerator.print(f"{len(splits)} datasets, {len(train_loader)} batches per epoch per process, "
                      f"{total_steps} steps, {accelerator.num_processes} process(es)")
    tracker = LossTracker(splits, task_of)
    bar = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="train")
    step, saved = 0, None
    model.train()
    for epoch in range(cfg.train_epochs):
        train_loader.set_epoch(epoch)
        for name, batch in islice(train_loader, total_steps - step):
            losses = forward_backward(model, batch, task_of[name], cfg, accelerator)
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            clamp_lr(adamw, cfg.min_lr)
            optimizer.zero_grad()
            step += 1

            tracker.add(name, losses)
            bar.update(1)
            if step % cfg.log_interval == 0:
                metrics = tracker.report(accelerator, "train")
                log(writer, {"lr": adamw.param_groups[0]["lr"], **metrics}, step)
                bar.set_postfix({k[len("train/"):]: f"{v:.3f}" for k, v in metrics.items()
                                 if k.split("/")[1] in TASK_TYPES})
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                log(writer, validate(model, valid_loaders, task_of, cfg, accelerator), step)
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
                saved = save_checkpoint(accelerator, model, tokenizer, os.path.join(cfg.run_dir, f"step_{step}"))
        # An epoch end, or train_steps reached inside an epoch: validate and save either way.
        log(writer, validate(model, valid_loaders, task_of, cfg, accelerator), step)
        if step == (epoch + 1) * len(train_loader):
            saved = save_checkpoint(accelerator, model, tokenizer, os.path.join(cfg.run_dir, f"epoch_{epoch + 1}"))
        elif saved != os.path.join(cfg.run_dir, f"step_{step}"):
            saved = save_checkpoint(accelerator, model, tokenizer, os.path.join(cfg.run_dir, f"step_{step}"))
        if step >= total_steps:
            break
    bar.close()
    if writer is not None:
        writer.close()
    accelerator.print(f"final checkpoint: {saved}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
