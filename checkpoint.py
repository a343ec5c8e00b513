"""Full-state checkpoints: written atomically, found again after a crash, pruned.

A checkpoint `run_dir/step_N` (or `epoch_N`) holds the inference model at its top (weights and
tokenizer by `save_pretrained`, so AutoModel loads it, plus the sentence-transformers files, so
`SentenceTransformer(path)` does; LoRA adapters merged in) and, in `training_state/`, what a run needs
to continue exactly: model, optimizer, lr scheduler and every process's RNG states
(`accelerator.save_state`), `trainer_state.json` (step, config, logging sums) and, written last,
a manifest of every file's size. The folder is written as `.step_N.partial` and renamed when
complete, so that a process killed mid-write never leaves a folder that looks complete.
"""
import glob
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from errors import UserError
from lora import is_lora, merged_state_dict
from model import save_inference_model

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


def warn(accelerator, message):
    if accelerator.is_main_process:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _write_manifest(root):
    """{relative path: size} of every file under root, flushed to disk, then the manifest itself."""
    sizes = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            sizes[os.path.relpath(path, root)] = os.path.getsize(path)
    manifest = os.path.join(root, STATE_DIR, MANIFEST)
    with open(manifest, "w") as f:
        json.dump(sizes, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(src, dst):
    """Rename src to dst; an existing dst (a checkpoint of the same name from an earlier attempt)
    is moved aside first and deleted after."""
    old = None
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old)


def _rng_file(state_dir, rank):
    return os.path.join(state_dir, f"rng_{rank}.pt")


def rng_state():
    """Every RNG this process draws from (accelerate saves them too, but ignores a failed load)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(accelerator, model, tokenizer, path, trainer_state, keep, max_seq_length=1024, prompts=None):
    """Write checkpoint `path` atomically (collective: every process calls it), then keep the
    training state of only the newest `keep` checkpoints (0: all). max_seq_length and prompts go
    into the inference model's sentence-transformers configuration."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
    accelerator.wait_for_everyone()
    state_dir = os.path.join(tmp, STATE_DIR)
    accelerator.save_state(state_dir)  # every process writes its RNG states (and its ZeRO shard)
    torch.save(rng_state(), _rng_file(state_dir, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(model).backbone
        if is_lora(backbone):  # the adapters merged in, so that the weights load without peft
            backbone, weights = backbone.get_base_model(), merged_state_dict(backbone)
        else:
            weights = None
        save_inference_model(backbone, tokenizer, tmp, max_seq_length, prompts, save_function=accelerator.save,
                             state_dict=weights)
        with open(os.path.join(state_dir, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)
        _write_manifest(tmp)
        _replace_dir(tmp, path)
        if keep:
            prune(os.path.dirname(path), keep)
    accelerator.wait_for_everyone()
    accelerator.print(f"checkpoint saved: {path}")
    return path


def problem_with(path):
    """Why checkpoint `path` cannot be resumed from, or None if its training state is complete."""
    manifest = os.path.join(path, STATE_DIR, MANIFEST)
    if not os.path.isdir(path):
        return "not a folder"
    if not os.path.isfile(manifest):
        return f"no {STATE_DIR}/{MANIFEST} (incomplete, or its training state was pruned)"
    try:
        with open(manifest) as f:
            sizes = json.load(f)
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    for rel, size in sizes.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != size:
            return f"{rel} has {os.path.getsize(file)} bytes, the manifest says {size}"
    return None


def read_trainer_state(path):
    with open(os.path.join(path, STATE_DIR, TRAINER_STATE)) as f:
        return json.load(f)


def _step_of(path):
    """The checkpoint's step: N of a `step_N` name, else from its trainer state; None if neither."""
    match = re.fullmatch(r"step_(\d+)", os.path.basename(path))
    if match:
        return int(match.group(1))
    try:
        return int(read_trainer_state(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def candidates(run_dir):
    """[(step, path)] of the `step_N` / `epoch_N` folders of run_dir with a training state (complete or
    not), newest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "step_*")) + glob.glob(os.path.join(run_dir, "epoch_*")):
        if os.path.isdir(os.path.join(path, STATE_DIR)):
            step = _step_of(path)
            found.append((-1 if step is None else step, path))
    return sorted(found, reverse=True)


def prune(run_dir, keep):
    """Delete the training state of all complete checkpoints but those of the newest `keep` steps;
    their weights stay."""
    complete = [(step, path) for step, path in candidates(run_dir) if problem_with(path) is None]
    kept = sorted({step for step, _ in complete}, reverse=True)[:keep]
    for step, path in complete:
        if step not in kept:
            state = os.path.join(path, STATE_DIR)
            os.remove(os.path.join(state, MANIFEST))  # first, so that a half-deleted state reads incomplete
            shutil.rmtree(state)


def any_process(accelerator, flag):
    """True if `flag` is true on any process (one all-reduce): all processes take the same branch."""
    flag = torch.tensor(float(flag), device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _check_world_size(path, num_processes):
    """A checkpoint's data position and optimizer shards belong to its number of processes."""
    try:
        written_by = read_trainer_state(path)["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable trainer state fails the load below, with a warning
    if written_by != num_processes:
        raise UserError(f"resume_from: checkpoint {path} was written by {written_by} process(es), this run has "
                        f"{num_processes}; launch with {written_by} to continue it")


def restore(accelerator, resume_from, run_dir):
    """Load the checkpoint that `resume_from` names into the prepared objects; returns its trainer
    state, or None to start afresh. `latest` tries run_dir's checkpoints newest first and skips
    incomplete or unreadable ones with a warning; an explicit path must be complete."""
    if not resume_from:
        return None
    latest = resume_from == "latest"
    if latest:
        paths = [path for _, path in candidates(run_dir)]
    else:
        path = resume_from.rstrip("/")
        paths = [os.path.dirname(path) if os.path.basename(path) == STATE_DIR else path]
    for path in paths:
        problem = problem_with(path)
        if problem is None:
            _check_world_size(path, accelerator.num_processes)
            try:
                state_dir = os.path.join(path, STATE_DIR)
                accelerator.load_state(state_dir)
                set_rng_state(torch.load(_rng_file(state_dir, accelerator.process_index), weights_only=False))
                state = read_trainer_state(path)
            except Exception as err:  # a corrupt file can raise almost anything while unpickling
                problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if not any_process(accelerator, problem is not None):
            accelerator.print(f"resuming from {path} (step {state['step']})")
            return state
        problem = problem or "failed to load on another process"
        if not latest:
            raise UserError(f"resume_from {resume_from}: cannot resume from it: {problem}")
        warn(accelerator, f"skipping checkpoint {path}: {problem}")
    accelerator.print(f"resume_from latest: no complete checkpoint in {run_dir}; starting afresh")
    return None
