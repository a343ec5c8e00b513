"""Train an F2LLM embedding model.

    accelerate launch --config_file configs/accelerate_config.yaml run.py --config configs/config.json

One step: embed a homogeneous batch (queries, positives, hard negatives), pooled as the backbone's
family does (a decoder's last token, an encoder's mean), take the hard-negative loss (plus the
in-batch loss on retrieval data), and step AdamW with a warmup + cosine schedule clamped at min_lr.
`--prepare_only` builds the train/validation split cache in one process and exits (the recommended
warm-up before a many-process launch).

Reading order: train() (the command), set_up() (everything a run needs, in one Run), fit() (the
loop), then the pieces the loop names: the step, validation, checkpoints, epoch ends and stops.
"""
# ruff: noqa: E402 - the imports follow the --help block, which prints before torch and its kin load
import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # in a tenth of a second
    from config import cli_help

    print(cli_help(__doc__.split("\n\n")[0]), end="")
    sys.exit(0)

import contextlib
import dataclasses
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import re
import signal
import threading
import time
from functools import partial
from itertools import islice

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm

import checkpoint
import tokenize_data_qwen
import tracking
from checkpoint import TrainState
from config import Config, load_config, load_dataset_types, parse_run_args
from data import MultiDatasetLoader, check_datasets, corpus_path, holds_raw_files, load_splits, make_loader
from distributed import any_process, close, make_accelerator, stop_together, warn
from errors import INTERRUPTED, UserError, exit_on_user_error
from files import sampled_digest
from grad_cache import cached_backward
from loss import f2llm_losses, matryoshka_dims
from lora import add_lora
from metrics import METRICS, LossTracker, Throughput, retrieval_metrics, retrieval_set, task_loss_key
from model import (PACKING_AGREEMENT, Embedder, backbone_family, check_library_support, check_model_folder,
                   check_positions, end_token_id, flatten, load_backbone, load_tokenizer, pick_attn_implementation,
                   st_pooling, tokenizer_rule)


@exit_on_user_error(interrupted="interrupted before the first step: this launch saved nothing (the checkpoints "
                                 "already written are intact); run the same command again")
def main(argv=None):
    args = parse_args(argv)
    status = train(args.config, prepare_only=args.prepare_only, break_lock=args.break_lock, overrides=args.overrides)
    if status:  # a stop that Ctrl-C started, its checkpoint saved
        sys.exit(status)


def train(config_path, prepare_only=False, break_lock=False, overrides=None, hooks=None):
    """Train as the JSON config at config_path says, on every process of the launch; with prepare_only,
    build the split cache in this process and print the datasets instead. break_lock: take over the
    run folder's lock whatever its holder (see checkpoint.RunLock). overrides: {key: value} of the
    command line's --KEY VALUE, which win over the file's (config.load_config). hooks: a launcher's
    Hooks (ray_train.py's). Returns the exit status: 0, or 130 (INTERRUPTED) when a Ctrl-C stopped
    the run, after its checkpoint."""
    survive_closed_output()
    cfg = load_config(config_path, overrides)
    dataset_types = load_dataset_types(cfg)
    if prepare_only:
        rule = tokenizer_rule(cfg.model_path)
        with raw_names(cfg):
            checked = check_datasets(cfg, dataset_types, tokenize_if_raw(cfg), special_tokens=rule)
            splits = prepare(cfg, checked)
        for name, (task, train_split, valid_split) in splits.items():
            print(f"{name:32s} {task:15s} train {len(train_split):9d}  validation {len(valid_split):7d}")
        return
    accelerator = make_accelerator()
    status = fit(cfg, dataset_types, accelerator, break_lock, hooks)
    close(accelerator)
    return status


@dataclasses.dataclass
class Hooks:
    """What a launcher that is not `accelerate launch` (ray_train.py) adds to a run: saved(path, step),
    called on every process once a checkpoint is complete; stop_requested(), polled at each step, the
    name of a stop asked for from outside the process (as a signal would ask), or None."""

    saved: object = None
    stop_requested: object = None


@dataclasses.dataclass
class Run:
    """What the loop works with, built once by set_up(): the model and optimizer as accelerate
    prepared them, the lr schedule, the teacher (None without distillation), this process's training
    and validation batches, the retrieval sets validation ranks, each dataset's task type, the number
    of steps, the TrainState a checkpoint saves and restores, the experiment trackers of report_to
    (tracking.Tracker, started by fit on the main process; none elsewhere), and the launcher's Hooks."""

    cfg: Config
    accelerator: object
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher: torch.nn.Module
    train_loader: MultiDatasetLoader
    valid_loaders: dict
    eval_sets: dict
    task_of: dict
    total_steps: int
    state: TrainState
    trackers: list = dataclasses.field(default_factory=list)
    mrr: dict = dataclasses.field(default_factory=dict)  # {step: validation MRR@10} of this launch
    saved: dict = dataclasses.field(default_factory=dict)  # {step: checkpoint path} of this launch
    hooks: Hooks = dataclasses.field(default_factory=Hooks)


def set_up(cfg, dataset_types, accelerator, break_lock=False):
    """Check every input, take the run folder, build data, model, optimizer and lr schedule, and
    restore the checkpoint that resume_from names (or start at step 0): the Run."""
    family = check_model_folder(cfg.model_path, model_type=cfg.model_type)  # one line before the data is prepared
    family.pooling(cfg.pooling)  # so is a pooling the family cannot take
    check_positions(cfg.model_path, family, cfg.max_seq_length)  # so is a length its positions cannot hold
    tokenizer = load_tokenizer(cfg.model_path, special_tokens=family.special_tokens)
    packed = cfg.batch_layout == "packed" and family.packable
    check_library_support(cfg.attn_implementation, packed, family.model_type)  # so is a wrong-results stack
    if cfg.teacher_model_path:
        teacher_family = check_model_folder(cfg.teacher_model_path, "teacher_model_path")
        check_positions(cfg.teacher_model_path, teacher_family, cfg.max_seq_length, "teacher_model_path")
    with raw_names(cfg):  # all fail at once on bad input, naming the user's files
        checked = check_datasets(cfg, dataset_types, tokenize_if_raw(cfg, accelerator),
                                 special_tokens=family.special_tokens)
    checkpoint.RunLock(accelerator, cfg.run_dir, break_lock)  # before any write; checks it is writable
    check_trackers(cfg, accelerator)
    set_seed(cfg.seed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    with accelerator.main_process_first(), raw_names(cfg):  # one process builds the split cache, the others read it
        splits = prepare(cfg, checked)  # in file-name order, which orders the draw as the published code's
    task_of = {name: task for name, (task, _, _) in splits.items()}
    eval_sets = {name: retrieval_set(valid, cfg.eval_queries) for name, (task, _, valid) in splits.items()
                 if task == "retrieval" and cfg.eval_queries}
    warn_small_eval_sets(accelerator, cfg, eval_sets, splits)

    model = build_model(cfg, tokenizer, accelerator)
    teacher = build_teacher(cfg, tokenizer, model.backbone.config.hidden_size, accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    adamw = make_optimizer(trainable, cfg)
    train_loader, valid_loaders = build_loaders(splits, cfg, tokenizer, model.backbone.config.vocab_size, accelerator,
                                                family.special_tokens)
    model, optimizer = accelerator.prepare(model, adamw)
    total_steps = cfg.train_steps if cfg.train_steps > 0 else len(train_loader) * cfg.train_epochs
    warn_schedule(cfg, total_steps, accelerator)
    unsharded = sum(-(-len(train) // cfg.train_batch_size) for _, train, _ in splits.values()) * cfg.train_epochs
    # Stepped once per optimizer step here, not by accelerate (which steps it once per process).
    # It and the min_lr clamp act on AdamW's param groups, which DDP and DeepSpeed ZeRO step with.
    scheduler = make_scheduler(adamw, cfg, total_steps, accelerator.num_processes,
                               cfg.train_steps if cfg.train_steps > 0 else unsharded)
    accelerator.register_for_checkpointing(scheduler)

    tracker = LossTracker(splits, task_of, loss_kinds(cfg, distill=teacher is not None), cfg.log_keys)
    fresh = TrainState(world_size=accelerator.num_processes, config=dataclasses.asdict(cfg), tracker=tracker,
                       batches_per_epoch={name: len(b) for name, b in train_loader.loaders.items()},
                       data=data_digests(checked))
    state = checkpoint.restore(accelerator, cfg.resume_from, cfg.run_dir, fresh, (model, optimizer, scheduler))
    if state is not fresh:
        follow_config(scheduler, cfg)
    return Run(cfg, accelerator, tokenizer, model, optimizer, scheduler, teacher, train_loader, valid_loaders,
               eval_sets, task_of, total_steps, state)


def fit(cfg, dataset_types, accelerator, break_lock=False, hooks=None):
    """The run, from the checks of its inputs to the final checkpoint, on every process; returns the
    exit status (stop_early's after a stop, else 0)."""
    run = set_up(cfg, dataset_types, accelerator, break_lock)
    run.hooks = hooks or Hooks()
    state, total = run.state, run.total_steps
    if state.step >= total:
        accelerator.print(f"the run had already finished ({state.step} of {total} steps); nothing to do")
        return 0
    run.trackers = open_trackers(cfg, accelerator, state)
    accelerator.print(f"{len(run.task_of)} datasets, {state.steps_per_epoch} batches per epoch per process, "
                      f"{total} steps, {accelerator.num_processes} process(es)")
    stop, throughput = StopSignal(run.hooks.stop_requested), Throughput()
    bar = tqdm(total=total, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    try:  # the bar ends its line before any error line
        run.model.train()
        for epoch in range(state.epoch, cfg.train_epochs):
            run.train_loader.set_epoch(epoch, start=state.step - epoch * state.steps_per_epoch)
            for name, batch in islice(run.train_loader, total - state.step):
                throughput.add(len(batch["input_ids"]))
                losses, grad_norm = train_step(run.model, to_device(batch, accelerator.device), run.task_of[name],
                                               cfg, accelerator, run.optimizer, run.scheduler, run.teacher)
                state.step += 1
                bar.update(1)
                count_step(run, name, losses, grad_norm)
                if state.step % cfg.log_interval == 0:
                    bar.set_postfix(log_training(run, throughput))
                with throughput.paused():
                    if cfg.validation_steps and state.step % cfg.validation_steps == 0:
                        validation(run)
                    if checkpoint_due(state.step, total, cfg):
                        save(run, f"step_{state.step}")
                if stop.agreed(accelerator):
                    return stop_early(run, stop.received)
            with throughput.paused():
                end_epoch(run, epoch)
            if state.step >= total:
                break
    finally:
        bar.close()
        tracking.finish(run.trackers)
    note(accelerator, cfg, f"final checkpoint: {state.saved_path}")
    if best := best_checkpoint(run):
        note(accelerator, cfg, best)
    return 0


def count_step(run, name, losses, grad_norm):
    """A step's losses into the logging sums; a skipped step (losses None) into the skip counters,
    with a warning. max_bad_steps skipped in a row stop the run, with a checkpoint."""
    state = run.state
    if losses is not None:
        state.tracker.add(name, losses, grad_norm)
        state.bad_steps_in_a_row = 0
        return
    state.bad_steps_in_a_row += 1
    state.skipped_steps += 1
    warn(run.accelerator, f"step {state.step}: non-finite loss or gradient on {name}; step skipped "
                          f"({state.bad_steps_in_a_row} in a row, {state.skipped_steps} in all)")
    if state.bad_steps_in_a_row >= run.cfg.max_bad_steps:
        path = save(run, f"step_{state.step}")
        raise UserError(f"{state.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(max_bad_steps {run.cfg.max_bad_steps}); stopped at step {state.step}, checkpoint {path} "
                        "holds the weights of the last applied step (finite, checked). Lower learning_rate or "
                        "check the data, then resume_from it")


def log_training(run, throughput):
    """Log the lr, the skipped steps, the training losses and the throughput since the last report
    (collective); returns the progress bar's summary of them."""
    lr = run.scheduler.optimizer.param_groups[0]["lr"]  # AdamW's own groups, which the schedule sets
    metrics = {"lr": lr, "train/skipped_steps": run.state.skipped_steps,
               **run.state.tracker.report(run.accelerator, "train"), **throughput.report(run.accelerator)}
    log(run.trackers, metrics, run.state.step)
    return {"loss": f"{metrics.get('train/loss', float('nan')):.4f}", "lr": f"{lr:.2e}",
            "tokens_per_s": f"{metrics['train/tokens_per_s']:.0f}"}


def save(run, name):
    """Checkpoint run_dir/name of the run as it stands (collective); returns its path."""
    cfg = run.cfg
    path = checkpoint.save(run.accelerator, run.model, run.tokenizer, os.path.join(cfg.run_dir, name), run.state,
                           cfg.save_total_limit, cfg.max_seq_length, cfg.prompts)
    run.saved[run.state.step] = path
    if run.hooks.saved is not None:
        run.hooks.saved(path, run.state.step)
    return path


def end_epoch(run, epoch):
    """An epoch end, or train_steps reached inside an epoch: validate (unless this step just did) and
    save: epoch_N at an epoch end (hard links to step_N when that holds this step), else step_N."""
    cfg, state = run.cfg, run.state
    if not (cfg.validation_steps and state.step % cfg.validation_steps == 0):
        validation(run)
    if state.step == (epoch + 1) * state.steps_per_epoch and state.just_saved():
        checkpoint.save_copy(run.accelerator, state, os.path.join(cfg.run_dir, f"epoch_{epoch + 1}"),
                             cfg.save_total_limit)
        if run.hooks.saved is not None:
            run.hooks.saved(state.saved_path, state.step)
    elif state.step == (epoch + 1) * state.steps_per_epoch:
        save(run, f"epoch_{epoch + 1}")
    elif not state.just_saved():
        save(run, f"step_{state.step}")


def stop_early(run, received):
    """A stop every process agreed on (StopSignal): checkpoint this step, unless that is done, and
    say how to continue."""
    state = run.state
    if not state.just_saved():
        save(run, f"step_{state.step}")
    note(run.accelerator, run.cfg, f"stopped by {received or 'a signal to another process'} at step {state.step}: "
                                   f'checkpoint {state.saved_path}; continue with "resume_from": "latest"')
    return INTERRUPTED if received == "SIGINT" else 0  # the shell's status for a Ctrl-C


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


def embed(model, batch):
    return model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])


def loss_kinds(cfg, distill=False):
    """The loss terms a step logs: the contrastive ones, plus the F2LLM-v2 ones the config turns on."""
    kinds = ("joint", "hard") if cfg.contrastive_loss == "joint" else ("inbatch", "hard")
    return kinds + tuple(f"mrl_{kind}" for kind in kinds if cfg.use_mrl) + (("kd",) if distill else ())


def all_finite(losses, accelerator):
    """True when every process's losses are finite; one all-reduce, so all processes agree."""
    bad = torch.stack([~torch.isfinite(value.detach()) for value in losses.values()]).any()
    return not any_process(accelerator, bad)


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


def weights_finite(model, accelerator):
    """Whether every weight is finite on every process: one norm per tensor (a non-finite weight
    makes its norm non-finite; weights beyond about 1e19 overflow it too, and no trained model has
    them), one host sync and one all-reduce."""
    norms = torch.stack([p.detach().norm().float() for p in model.parameters()])
    return not any_process(accelerator, not torch.isfinite(norms).all().item())


def validation(run):
    """Validate (collective), log the metrics to the trackers, print their summary line and remember
    the retrieval MRR@10 of this step (best_checkpoint)."""
    metrics = validate(run)
    log(run.trackers, metrics, run.state.step)
    run.accelerator.print(validation_line(run.state.step, metrics, run.task_of, run.cfg.log_keys,
                                          sum(len(queries) for queries, _, _ in run.eval_sets.values())))
    if RETRIEVAL_MRR in metrics:
        run.mrr[run.state.step] = metrics[RETRIEVAL_MRR]
    return metrics


RETRIEVAL_MRR = "valid/retrieval/mrr@10"
TASK_ORDER = ("retrieval", "clustering", "classification")


def validation_line(step, metrics, task_of, keys, num_queries):
    """One line of a validation's metrics: per task type present, its mean loss, and for retrieval
    nDCG@10, MRR@10, recall@10 and the number of validation queries they rest on."""
    order = {task: i for i, task in enumerate(TASK_ORDER)}
    tasks = sorted(set(task_of.values()), key=lambda t: (order.get(t, len(order)), t))
    parts = []
    for task in tasks:
        loss = metrics.get(task_loss_key("valid", task, keys))
        part = f"{task} loss {loss:.3f}" if loss is not None else task
        if task == "retrieval" and RETRIEVAL_MRR in metrics:
            part += "".join(f" {title} {metrics[f'valid/retrieval/{key}']:.3f}" for key, title in METRICS.items())
            part += f" ({num_queries} queries)"
        parts.append(part)
    return f"step {step} validation: " + "; ".join(parts)


def best_checkpoint(run):
    """None, or "best checkpoint by validation MRR@10: PATH (step N, MRR@10 x)" among this launch's
    checkpoints saved at a step that validated with retrieval metrics (the earliest of equals). A
    line of its own: scripts read the path from the "final checkpoint: PATH" line."""
    scored = [(mrr, -step) for step, mrr in run.mrr.items() if step in run.saved]
    if not scored:
        return None
    mrr, step = max(scored)
    return f"best checkpoint by validation MRR@10: {run.saved[-step]} (step {-step}, MRR@10 {mrr:.3f})"


def warn_small_eval_sets(accelerator, cfg, eval_sets, splits):
    """A warning per retrieval dataset whose metrics rest on fewer than min_eval_queries queries."""
    for name, (queries, _, _) in eval_sets.items():
        if len(queries) >= cfg.min_eval_queries:
            continue
        _, train, valid = splits[name]
        why = (f"eval_queries {cfg.eval_queries} caps them: raise it" if cfg.eval_queries < cfg.min_eval_queries else
               f"the dataset has {len(train) + len(valid)} rows and the validation split takes at most half: add rows")
        warn(accelerator, f"valid/{name}: MRR@10 on {len(queries)} queries, below min_eval_queries "
                          f"{cfg.min_eval_queries}: the retrieval metrics of so few queries move by chance ({why}, "
                          "or judge by the validation loss)")


@contextlib.contextmanager
def raw_names(cfg):
    """Errors on the tokenized copy of raw data (tokenize_if_raw) name the user's raw file instead:
    cache_dir/tokenized/NAME-hash/NAME.parquet -> train_data_path/NAME.parquet, with the raw columns."""
    try:
        yield
    except UserError as err:
        cache = raw_data_cache(cfg)
        if cache is None or cache not in str(err):
            raise
        line = re.sub(re.escape(cache + os.sep) + r"([^\s:/]+\.parquet)",
                      lambda m: os.path.join(cfg.train_data_path, m.group(1)), str(err))
        line = re.sub(r"\b(negative_\d+|passage)_id\b", r"\1", line)  # the cache's column names, as the raw file's
        raise UserError(line) from None


@torch.no_grad()
def validate(run):
    """The validation losses of every dataset, and the retrieval metrics of the eval_sets."""
    model, cfg, accelerator = run.model, run.cfg, run.accelerator
    model.eval()
    tracker = LossTracker(run.valid_loaders, run.task_of, loss_kinds(cfg), cfg.log_keys)
    for name in sorted(run.valid_loaders):
        for batch in run.valid_loaders[name]:
            batch = to_device(batch, accelerator.device)
            tracker.add(name, batch_losses(embed(model, batch), batch, run.task_of[name], cfg))
    model.train()
    return {**tracker.report(accelerator, "valid"), **retrieval_eval(model, run.eval_sets, cfg, accelerator)}


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


def batch_losses(embeddings, batch, task, cfg):
    """The losses of one batch (loss.f2llm_losses): {"hard": ..., "inbatch": ...(retrieval only)}, or
    with contrastive_loss joint {"joint": ...} on retrieval batches; plus "mrl_*" with use_mrl and
    "kd" when the batch carries its teacher embeddings."""
    mrl_dims = matryoshka_dims(embeddings.shape[-1], cfg.mrl_dims) if cfg.use_mrl else ()
    return f2llm_losses(embeddings, batch["num_queries"], batch["num_neg"], task, temperature=cfg.temperature,
                        inbatch_gradient=cfg.inbatch_gradient, contrastive_loss=cfg.contrastive_loss,
                        false_negative_margin=cfg.false_negative_margin, mrl_dims=mrl_dims,
                        teacher=batch.get("teacher"), kd_weight=cfg.kd_weight, keys=batch.get("doc_keys"),
                        loss_dtype=cfg.loss_dtype)


def to_device(batch, device):
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def checkpoint_due(step, total_steps, cfg):
    """Whether `step` saves a step_N checkpoint: every checkpointing_steps; with merge_checkpoints
    also F2LLM-v2's checkpoints for merging, step 5 and (when checkpointing_steps is on) every 500th
    step of the last 2,500, as the published code's condition."""
    if cfg.merge_checkpoints and (step == 5 or (cfg.checkpointing_steps and step % 500 == 0
                                                and step > total_steps - 2500)):
        return True
    return bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0


def check_trackers(cfg, accelerator):
    """One line now, before the data and the model load, if the main process (the one that logs) lacks
    a tracker that report_to names, or could not write TensorBoard logs (unwritable_tb_dir); the
    other processes stop with it."""
    problem = None
    if accelerator.is_main_process:
        problem = tracking.missing(cfg.report_to) or (unwritable_tb_dir(cfg) if "tensorboard" in cfg.report_to
                                                      else None)
    stop_together(accelerator, problem)


def unwritable_tb_dir(cfg):
    """Why tb_dir/experiment_id or files in it could not be created, or None. Nothing is created: a run
    stopped by another check leaves no folder behind."""
    path = os.path.abspath(os.path.join(cfg.tb_dir, cfg.experiment_id))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        problem = errno.ENOTDIR
    elif os.statvfs(path).f_flag & os.ST_RDONLY:
        problem = errno.EROFS
    elif not os.access(path, os.W_OK | os.X_OK):
        problem = errno.EACCES
    else:
        return None
    return (f"cannot write TensorBoard logs into tb_dir {cfg.tb_dir}: {os.strerror(problem)} ({path}); set tb_dir "
            "to a writable folder")


def open_trackers(cfg, accelerator, state):
    """args.json, then the experiment trackers (tracking.start), on the main process ([] elsewhere).
    `state`: the TrainState this launch starts from (a resumed checkpoint's, or step 0's)."""
    if accelerator.is_main_process:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    return tracking.start(cfg, state, accelerator)


def log(trackers, metrics, step):
    for tracker in trackers:
        tracker.log(metrics, step)


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


def prepare(cfg, checked):
    """{name: (task type, train split, validation split)}, built (or read from cache) for the
    datasets that check_datasets returned."""
    return {name: (task, *load_splits(path, columns, cfg, cfg.min_eval_queries if task == "retrieval" else 0))
            for name, path, task, columns in checked}


def data_digests(checked):
    """{dataset: fingerprint of its files} (files.sampled_digest of the file, and of a v2 layout's
    corpus), which a resume must find unchanged."""
    out = {}
    for name, path, _, _ in checked:
        paths = [path] + [p for p in [corpus_path(path)] if os.path.isfile(p) and p != path]
        out[name] = "+".join(sampled_digest(p) for p in paths)
    return out


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
    which the main process fills with tokenize_data_qwen.tokenize_folder (layout v2) at max_seq_length
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
            tokenize_data_qwen.tokenize_folder(cfg.model_path, cfg.train_data_path, out,
                                               max_seq_length=cfg.max_seq_length, layout="v2")
        except UserError as err:
            problem = str(err)
    if accelerator is None and problem:
        raise UserError(problem)
    if accelerator is not None:
        stop_together(accelerator, problem)
    return out


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
    """The Embedder to train: the backbone (bf16 or float32, see below), LoRA when configured, the
    family's pooling, packed batches where the family can take them (else padded, with a warning)."""
    family = backbone_family(cfg.model_path, cfg.model_type)
    layout = cfg.batch_layout
    if layout == "packed" and not family.packable:
        warn(accelerator, f"{family.model_type}'s attention does not go through transformers' attention interface, "
                          "so packed sequences cannot be kept apart: training on padded batches")
        layout = "padded"
    # DeepSpeed's bf16 mode keeps float32 master weights (and casts the model to bf16 itself). Anywhere
    # else bf16 weights would lose small AdamW updates: keep float32, and let accelerate's mixed
    # precision run the matmuls in bf16.
    ds_bf16 = accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "bf16"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if ds_bf16 else "float32")
    backbone = load_backbone(cfg.model_path, cfg.attn_implementation, dtype, cfg.gradient_checkpointing,
                             packed=layout == "packed", model_type=cfg.model_type)
    hidden = backbone.config.hidden_size
    if cfg.use_mrl and any(dim >= hidden for dim in matryoshka_dims(hidden, cfg.mrl_dims)):
        raise UserError(f"mrl_dims {cfg.mrl_dims} must all be below the model's hidden size {hidden}")
    if cfg.lora:
        backbone = add_lora(backbone, cfg.lora)
    mask_pad = tokenizer.pad_token_id if cfg.attention_mask_from == "pad_token_id" else None
    embedder = Embedder(backbone, layout, tokenizer.pad_token_id, mask_pad, pooling=family.pooling(cfg.pooling))
    if layout == "packed" and not family.tested:
        check_packing(embedder, family, accelerator)
    return embedder


def check_packing(embedder, family, accelerator):
    """A family without tests here trains on packed batches only if they embed as its sequences alone
    do; else on padded ones (the padded attention load_backbone would pick), with a warning."""
    agreement = embedder.packing_agreement()
    if agreement >= PACKING_AGREEMENT:
        return
    warn(accelerator, f"{family.model_type}: packed batches embed unlike single sequences (cosine {agreement:.4f}), "
                      "so its attention does not keep them apart: training on padded batches")
    softcap = getattr(embedder.backbone.config, "attn_logit_softcapping", None) is not None
    embedder.backbone.set_attn_implementation(pick_attn_implementation(softcap=softcap))
    embedder.layout = "padded"


def build_teacher(cfg, tokenizer, hidden_size, device):
    """The frozen teacher Embedder for knowledge distillation, or None without teacher_model_path.
    It must share the student's tokenizer and tokenization rule (it embeds the same token ids) and be
    at least as wide; it pools as its own checkpoint says (else as its family does)."""
    if not cfg.teacher_model_path:
        return None
    family = backbone_family(cfg.teacher_model_path, setting="teacher_model_path")
    if family.special_tokens != backbone_family(cfg.model_path, cfg.model_type).special_tokens:
        raise UserError(f"teacher_model_path {cfg.teacher_model_path} is a{'n' * (family.kind == 'encoder')} "
                        f"{family.kind} and model_path is not: the teacher embeds the student's token ids, which a "
                        "decoder and an encoder tokenize differently")
    if load_tokenizer(cfg.teacher_model_path, "teacher_model_path",
                      special_tokens=family.special_tokens).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"teacher_model_path {cfg.teacher_model_path}: its tokenizer differs from model_path's; "
                        "the teacher embeds the student's token ids, so both need the same tokenizer")
    layout = cfg.batch_layout if family.packable and family.tested else "padded"
    backbone = load_backbone(cfg.teacher_model_path, cfg.attn_implementation, cfg.dtype,
                             packed=layout == "packed", setting="teacher_model_path")
    if backbone.config.hidden_size < hidden_size:
        raise UserError(f"teacher_model_path {cfg.teacher_model_path}: hidden size {backbone.config.hidden_size} "
                        f"is below the student's {hidden_size}; its embeddings are cut to the student's size")
    backbone.requires_grad_(False)
    mask_pad = tokenizer.pad_token_id if cfg.attention_mask_from == "pad_token_id" else None  # as the student's
    pooling = st_pooling(cfg.teacher_model_path) or family.pooling()
    return Embedder(backbone, layout, tokenizer.pad_token_id, mask_pad, pooling=pooling).to(device).eval()


def build_loaders(splits, cfg, tokenizer, vocab_size, accelerator, special_tokens=False):
    """This process's train batches (one MultiDatasetLoader) and validation batches {name: batches};
    every sequence ends in the backbone's end token (model.end_token_id)."""
    end_id = end_token_id(tokenizer, special_tokens)

    def loader(name, split, task, **kw):
        return make_loader(split, task, cfg, end_id, rank=accelerator.process_index,
                           world=accelerator.num_processes, vocab_size=vocab_size,
                           name=os.path.join(cfg.train_data_path, f"{name}.parquet"), **kw)

    train = {name: loader(name, split, task, train=True, stream=i)
             for i, (name, (task, split, _)) in enumerate(splits.items())}
    valid = {name: loader(name, split, task, train=False) for name, (task, _, split) in splits.items()}
    return MultiDatasetLoader(train, seed=cfg.seed, published_draw=cfg.dataset_draw == "published"), valid


def make_optimizer(params, cfg):
    """AdamW. `fused` computes the same update as torch's default (foreach on a GPU, a loop over the
    tensors on the CPU) in one kernel per step; the CPU loop spent 12 of 19 s per 100 steps of a
    tiny model with Qwen3's 9.7M-row embedding (bench_peers). sentence-transformers' Trainer uses it
    too (adamw_torch_fused)."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                             fused=True if cfg.adamw_implementation == "fused" else None)


def warn_schedule(cfg, total_steps, accelerator):
    """One warning line each for a warmup as long as the run (the lr never reaches learning_rate) and for
    a checkpointing_steps beyond it (no step_N checkpoint: only the epoch ends' and the last step's)."""
    warmup, how = cfg.warmup_steps, ""
    if cfg.lr_schedule_steps == "published_v1" and accelerator.num_processes > 1:  # see make_scheduler
        warmup = -(-cfg.warmup_steps // accelerator.num_processes)
        how = (f" ({warmup} optimizer steps with lr_schedule_steps published_v1 and {accelerator.num_processes} "
               "processes)")
    if warmup and warmup >= total_steps:
        warn(accelerator, f"warmup_steps {cfg.warmup_steps}{how} >= the run's {total_steps} steps: the learning rate "
                          f"never reaches learning_rate; lower warmup_steps, e.g. to 10% of the run "
                          f"({total_steps // 10})")
    if cfg.checkpointing_steps > total_steps:
        warn(accelerator, f"checkpointing_steps {cfg.checkpointing_steps} > the run's {total_steps} steps: no step_N "
                          "checkpoint falls inside the run, only the epoch-end ones (epoch_N) and the last step's "
                          "are written; lower checkpointing_steps to save more often")


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


def follow_config(scheduler, cfg):
    """After a resume, AdamW's settings from this run's config, not the checkpoint's (which
    load_state_dict brought back with the moments): learning_rate and the schedule recomputed at the
    resumed step (warmup, decay and the step count are this config's already: the schedule's
    function is built from it), min_lr, weight_decay, betas."""
    scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.optimizer.param_groups)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.learning_rate, lr=cfg.learning_rate * factor(scheduler.last_epoch),
                     weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
    clamp_lr(scheduler.optimizer, cfg.min_lr)


def clamp_lr(optimizer, min_lr):
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"], min_lr)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
NOTICES = (signal.SIGTERM, signal.SIGUSR1)  # preemption notices, which schedulers repeat
INTERRUPTED_AGAIN = ("interrupted again: exiting without finishing the checkpoint; the checkpoints already written "
                     "are intact")
class StopSignal:
    """Remembers SIGTERM or SIGUSR1 (preemption notices) or SIGINT (Ctrl-C): the loop finishes its
    step, saves a checkpoint and exits, with status 0 (130 after SIGINT, the shell's status for a
    Ctrl-C), instead of dying mid-step. Once the stop is agreed, further notices are ignored (a
    scheduler often repeats them), so that none cuts the stop path short. A second Ctrl-C does: the
    process exits at once with one line and status 130, without a traceback; a checkpoint it cuts
    short is left as `.step_N.partial` (checkpoint.save renames it only when complete), which the
    next launch removes.

    Only a process's main thread can take signals: a Ray Train worker runs the loop in another thread,
    and its driver asks for a stop through `requested` (Hooks.stop_requested) instead."""

    def __init__(self, requested=None):
        self.received, self.interrupts, self.requested = None, 0, requested
        self.signals = threading.current_thread() is threading.main_thread()
        for sig in STOP_SIGNALS if self.signals else ():
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                exit_at_once()
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, accelerator):
        """The signal if any process received one (all processes stop at the same step)."""
        if self.received is None and self.requested is not None:
            self.received = self.requested()
        if not any_process(accelerator, self.received is not None):
            return False
        for sig in NOTICES if self.signals else ():
            signal.signal(sig, signal.SIG_IGN)
        return True


def exit_at_once():
    """A second Ctrl-C: one line and status 130 now, whatever the process was doing (os._exit: no
    unwinding that could print a traceback or wait; the run folder's lock stays behind, and the next
    launch takes it over, as its process is gone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.write(2, f"\n{INTERRUPTED_AGAIN}\n".encode())
    except OSError:
        pass
    os._exit(INTERRUPTED)


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


def parse_args(argv=None):
    """--config FILE, --prepare_only, --break_lock, and --KEY VALUE for any config key: the namespace, its
    `overrides` the config keys given ({key: value}, config.parse_run_args)."""
    args, overrides = parse_run_args(argv, __doc__.split("\n\n")[0])
    args.overrides = overrides
    return args


if __name__ == "__main__":
    main()
