"""Full-state checkpoints: written atomically, found again after a crash, pruned.

A checkpoint `run_dir/step_N` (or `epoch_N`) holds the inference model at its top (weights and
tokenizer by `save_pretrained`, so AutoModel loads it, plus the sentence-transformers files, so
`SentenceTransformer(path)` does; LoRA adapters merged in) and, in `training_state/`, what a run needs
to continue exactly: model, optimizer, lr scheduler and every process's RNG states
(`accelerator.save_state`), `trainer_state.json` (the TrainState: step, skip counters, logging sums,
and what a resume must match) and, written last, a manifest of every file's size and blake2b hash,
verified before a resume. The folder is written as `.step_N.partial` and renamed when complete, so
that a process killed mid-write never leaves a folder that looks complete. A checkpoint of a
one-process or DDP launch resumes under DeepSpeed and the other way round (portable.py).

The run folder is taken by one launch at a time (RunLock), and a storage error while saving is
one line that leaves the newest complete checkpoint as it was.
"""
import atexit
import dataclasses
import errno
import glob
import json
import os
import random
import re
import shutil
import socket
import time

import numpy as np
import torch
from safetensors import SafetensorError

import portable
from config import resume_rule
from distributed import any_process, stop_all, stop_together, warn
from errors import UserError
from files import file_digests, pid_alive
from lora import is_lora, merged_state_dict
from model import save_inference_model

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
LOCK = ".lock"


@dataclasses.dataclass
class TrainState:
    """Where a run stands, beside the model, optimizer, lr schedule and RNG states that accelerate
    saves: the step, the skipped-step counters, the loss sums not yet reported (`tracker`, a
    metrics.LossTracker), and what a resumed run must match: the number of processes, each dataset's
    batches per epoch per process, the data files' fingerprints (`data`, {dataset: digest}; None in
    checkpoints of versions before it), the config. `tracker_runs`: {tracker: the run it logs into} (MLflow's
    and W&B's run id, TensorBoard's folder; tracking.start), which a resume continues; empty in checkpoints
    of versions before it. trainer_state.json is to_json() and from_json() reads it; no other code knows
    its keys. `saved_step` / `saved_path`: the newest checkpoint written or restored, so that a stop or an
    epoch end at that very step does not write it twice."""

    world_size: int
    batches_per_epoch: dict
    config: dict
    tracker: object = None
    step: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    data: dict = None
    tracker_runs: dict = dataclasses.field(default_factory=dict)
    saved_step: int = None
    saved_path: str = None

    @property
    def steps_per_epoch(self):
        return sum(self.batches_per_epoch.values())

    @property
    def epoch(self):
        """The epoch the next step belongs to."""
        return self.step // self.steps_per_epoch

    def just_saved(self):
        """Whether a checkpoint holds this very step."""
        return self.saved_step == self.step

    def to_json(self, accelerator):
        """trainer_state.json's content; collective, as the tracker's sums are reduced over processes."""
        return {"step": self.step, "epoch": self.epoch, "position": self.step % self.steps_per_epoch,
                "world_size": self.world_size, "batches_per_epoch": self.batches_per_epoch,
                "bad_steps_in_a_row": self.bad_steps_in_a_row, "skipped_steps": self.skipped_steps,
                "tracker": self.tracker.state_dict(accelerator) if self.tracker is not None else {},
                "data": self.data, "tracker_runs": self.tracker_runs, "config": self.config}

    @classmethod
    def from_json(cls, data, tracker=None, accelerator=None):
        """The state trainer_state.json holds; its logging sums go into `tracker` when one is given.
        ("epoch" and "position" are written for readers; the step implies both.)"""
        state = cls(world_size=int(data["world_size"]), batches_per_epoch=dict(data["batches_per_epoch"]),
                    config=dict(data["config"]), tracker=tracker, step=int(data["step"]),
                    bad_steps_in_a_row=int(data["bad_steps_in_a_row"]), skipped_steps=int(data["skipped_steps"]),
                    data=data.get("data"), tracker_runs=dict(data.get("tracker_runs", {})))
        if tracker is not None:
            tracker.load_state_dict(data["tracker"], accelerator)
        return state

    def check_resumable(self, saved, path, accelerator):
        """Refuse a checkpoint's state `saved` that this run (self, at step 0) cannot continue: its data
        position and optimizer shards belong to its number of processes, its position to its batches
        per epoch and to its data files, and a config key whose change cannot take effect on resume
        (config.resume_rule "fixed": the weights, the data split and order) must not have changed.
        Keys that do take effect ("follows": the lr schedule, the loss, ...) are listed, with the step
        from which they apply; where outputs go and how often to log or save ("free") are not."""
        if saved.world_size != self.world_size:
            launch = portable.describe(portable.written_by(os.path.join(path, STATE_DIR)), saved.world_size)
            raise UserError(f"resume_from: checkpoint {path} was written by a {launch}, this launch has "
                            f"{self.world_size} process(es): each process's data position and random state belong to "
                            f"the launch that saved them; launch with {saved.world_size} process(es) to continue it")
        changed = {k: (v, self.config[k]) for k, v in saved.config.items() if k in self.config and self.config[k] != v}
        fixed = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items() if resume_rule(k) == "fixed"]
        if fixed:
            raise UserError(f"resume_from: {', '.join(fixed)} changed since checkpoint {path}, and a resumed run "
                            "cannot take that change (it decides the weights restored, the data split or its order); "
                            "set it back, or start afresh (resume_from none, or a new experiment_id)")
        if saved.batches_per_epoch != self.batches_per_epoch:
            older = "min_eval_queries" not in saved.config and self.config.get("min_eval_queries")
            raise UserError("resume_from: the training data or train_batch_size changed since the checkpoint "
                            f"(batches per dataset then {saved.batches_per_epoch}, now {self.batches_per_epoch}); "
                            + ('the checkpoint predates min_eval_queries, which holds out more rows of small retrieval '
                               'datasets: set "min_eval_queries": 0 to resume it' if older else
                               "resume with the same data, or start afresh"))
        if saved.data is not None and self.data is not None and saved.data != self.data:
            changed_data = sorted(name for name in set(saved.data) | set(self.data)
                                  if saved.data.get(name) != self.data.get(name))
            raise UserError(f"resume_from: the training data changed since checkpoint {path} (dataset(s) "
                            f"{', '.join(changed_data)}: another file content with the same number of batches); "
                            "resume with the data it was trained on, or start afresh (resume_from none, or a new "
                            "experiment_id)")
        follows = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items() if resume_rule(k) == "follows"]
        if follows:
            warn(accelerator, f"resuming at step {saved.step} with changed settings, in effect from step "
                              f"{saved.step + 1}: " + ", ".join(follows))


def _write_manifest(root):
    """The manifest: {relative path: {"size", "blake2b"}} of every file under root, each flushed to
    disk first (its hash read back from the page cache, by a few threads), then the manifest itself."""
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p))
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    digests = file_digests(files)
    entries = {os.path.relpath(p, root): {"size": os.path.getsize(p), "blake2b": digests[p]} for p in files}
    manifest = os.path.join(root, STATE_DIR, MANIFEST)
    with open(manifest, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path):
    """{relative path: {"size"[, "blake2b"]}} of checkpoint `path` (earlier versions wrote sizes only)."""
    with open(os.path.join(path, STATE_DIR, MANIFEST)) as f:
        data = json.load(f)
    if "files" in data:
        return data["files"]
    return {rel: {"size": size} for rel, size in data.items()}


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


def save(accelerator, model, tokenizer, path, state, keep, max_seq_length=1024, prompts=None):
    """Write checkpoint `path` of TrainState `state` atomically (collective: every process calls it),
    then keep the training state of only the newest `keep` checkpoints (0: all); `state` then names
    it as saved. max_seq_length and prompts go into the inference model's sentence-transformers
    configuration. Refuses (UserError) to start when the folder has less free space than the last
    checkpoint took, and turns a storage error while writing into one line; either way the partial
    folder is removed and the checkpoints already written stay as they were."""
    run_dir = os.path.dirname(path)
    tmp = os.path.join(run_dir, f".{os.path.basename(path)}.partial")
    problem = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        problem = _space_problem(run_dir, path)
    _agree(accelerator, problem, tmp)
    state_dir = os.path.join(tmp, STATE_DIR)
    trainer_state = state.to_json(accelerator)
    try:
        accelerator.save_state(state_dir)  # every process writes its RNG states (and its ZeRO shard)
        torch.save(rng_state(), _rng_file(state_dir, accelerator.process_index))
    except WRITE_ERRORS as err:
        problem = _storage_problem(run_dir, err, path)
    _agree(accelerator, problem, tmp)
    if accelerator.is_main_process:
        try:
            embedder = accelerator.unwrap_model(model)
            backbone, weights = embedder.backbone, None
            if is_lora(backbone):  # the adapters merged in, so that the weights load without peft
                backbone, weights = backbone.get_base_model(), merged_state_dict(backbone)
            save_inference_model(backbone, tokenizer, tmp, max_seq_length, prompts, save_function=accelerator.save,
                                 state_dict=weights, pooling=embedder.pooling)
            with open(os.path.join(state_dir, TRAINER_STATE), "w") as f:
                json.dump(trainer_state, f, indent=1)
            _write_manifest(tmp)
            _replace_dir(tmp, path)
            if keep:
                prune(run_dir, keep)
        except WRITE_ERRORS as err:
            problem = _storage_problem(run_dir, err, path)
    _agree(accelerator, problem, tmp)
    state.saved_step, state.saved_path = state.step, path
    accelerator.print(f"checkpoint saved: {path}")
    return path


def save_copy(accelerator, state, path, keep):
    """Checkpoint `path` as a copy of the checkpoint that holds `state`'s step (state.just_saved();
    collective): an epoch end whose step_N was just saved. Its files are hard links (a copy where the
    file system has none), so the second name costs no writing: the model, optimizer and RNG states
    are the same."""
    src = state.saved_path
    run_dir = os.path.dirname(path)
    tmp = os.path.join(run_dir, f".{os.path.basename(path)}.partial")
    problem = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            try:
                shutil.copytree(src, tmp, copy_function=os.link)
            except OSError:  # no hard links here (or across mounts): copy the bytes
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
            _replace_dir(tmp, path)
            if keep:
                prune(run_dir, keep)
        except OSError as err:
            problem = _storage_problem(run_dir, err, path)
    _agree(accelerator, problem, tmp)
    state.saved_path = path
    accelerator.print(f"checkpoint saved: {path} (the same state as {os.path.basename(src)})")
    return path


# What writing a checkpoint raises when storage fails: torch.save's zip writer reports a full disk
# as a RuntimeError, safetensors as a SafetensorError ("IoError(... StorageFull ...)").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _agree(accelerator, problem, tmp):
    """A barrier at which every process learns whether one of them failed; then all stop together,
    the partial folder removed."""
    stop_together(accelerator, problem, "saving a checkpoint failed on another process (see its log); the "
                                        "checkpoints already written are intact",
                  cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))


def checkpoint_bytes(path):
    """A complete checkpoint's size on disk, from its manifest (0 if it has none)."""
    try:
        return sum(entry["size"] for entry in read_manifest(path).values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _space_problem(run_dir, path):
    """Why the next checkpoint would not fit: the newest one's size is the best estimate of it."""
    needed = sum(checkpoint_bytes(p) for _, p in candidates(run_dir)[:1])  # the newest one's manifest only
    free = shutil.disk_usage(run_dir).free
    if needed and free < needed:
        return (f"no space for checkpoint {path}: {run_dir} has {_size(free)} free, the last checkpoint took "
                f"{_size(needed)}; free some space (or lower save_total_limit) and resume_from latest")
    return None


LOW_SPACE = 64 * 2**20  # below this, a failed write is taken for a full disk


def _storage_problem(run_dir, err, path):
    """One line for an error while writing a checkpoint. torch.save reports a full disk as a
    RuntimeError of its zip writer: one is taken for a storage error only when little space is left
    or it says it failed writing, else it is raised as the bug it is."""
    free = shutil.disk_usage(run_dir).free if os.path.isdir(run_dir) else 0
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not isinstance(err, OSError) and free >= LOW_SPACE and not re.search(r"writ|iostream|IoError", message, re.I):
        raise err
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < LOW_SPACE:
        return (f"no space left writing checkpoint {path} ({_size(free)} free in {run_dir}); free some space and "
                "resume_from latest: the checkpoints already written are intact")
    return (f"cannot write checkpoint {path}: {getattr(err, 'strerror', None) or message} ({run_dir}); fix the "
            "folder and resume_from latest: the checkpoints already written are intact")


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def problem_with(path, verify=False):
    """Why checkpoint `path` cannot be resumed from, or None if its training state is complete: every
    file of its manifest there with its size, and with `verify` its hash too (reads every byte)."""
    if not os.path.isdir(path):
        return "not a folder"
    if not os.path.isfile(os.path.join(path, STATE_DIR, MANIFEST)):
        return f"no {STATE_DIR}/{MANIFEST} (incomplete, or its training state was pruned)"
    try:
        entries = read_manifest(path)
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    for rel, entry in entries.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != entry["size"]:
            return f"{rel} has {os.path.getsize(file)} bytes, the manifest says {entry['size']}"
    if verify:
        hashed = {rel: entry["blake2b"] for rel, entry in entries.items() if "blake2b" in entry}
        digests = file_digests([os.path.join(path, rel) for rel in hashed])
        for rel, digest in hashed.items():
            if digests[os.path.join(path, rel)] != digest:
                return f"{rel} is damaged (its bytes differ from those written: blake2b mismatch)"
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
        return TrainState.from_json(read_trainer_state(path)).step
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


def restore(accelerator, resume_from, run_dir, fresh, prepared):
    """The TrainState to continue from: the checkpoint's that `resume_from` names, its model,
    optimizer, lr schedule and RNG states loaded into `prepared` (model, optimizer, scheduler as
    accelerate prepared them; converted when the checkpoint comes from the other kind of launch,
    see portable.py) and its logging sums into fresh.tracker; or `fresh` (this run's state at step
    0) to start afresh.

    `latest` takes run_dir's newest checkpoint whose files are all there and match their hashes,
    skipping damaged or incomplete ones with a warning; an explicit path must be intact. A run never
    starts afresh over checkpoints unless told to (resume_from `none`); an intact checkpoint that
    fails to load, one this run cannot continue (TrainState.check_resumable), or a run folder whose
    checkpoints are all damaged stop the run with one line."""
    if resume_from in ("", "none"):
        check_fresh_start(resume_from, run_dir)
        return fresh
    latest = resume_from == "latest"
    if latest:
        paths = [path for _, path in candidates(run_dir)]
        if not paths:
            accelerator.print(f"resume_from latest: no checkpoint in {run_dir} yet; starting afresh")
            return fresh
    else:
        path = resume_from.rstrip("/")
        paths = [os.path.dirname(path) if os.path.basename(path) == STATE_DIR else path]
    skipped = []
    for path in paths:
        problem = problem_with(path, verify=True) if accelerator.is_main_process else None
        if any_process(accelerator, problem is not None):
            if not latest:
                stop_all(accelerator, f"resume_from {resume_from}: cannot resume from it: {problem}")
            warn(accelerator, f"skipping checkpoint {path}: {problem}")
            skipped.append(f"{os.path.basename(path)}: {problem}")
            continue
        return _load(accelerator, path, fresh, prepared)
    stop_all(accelerator, f"resume_from latest: no checkpoint in {run_dir} is intact ({'; '.join(skipped)}); "
                          "restore them from a copy, or start afresh (resume_from none, or a new experiment_id)")


def check_fresh_start(resume_from, run_dir):
    """A UserError when resume_from is empty and run_dir already holds checkpoints: a run never starts
    afresh over them unless told to ("none")."""
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "step_*"))
                   + glob.glob(os.path.join(run_dir, "epoch_*")))
    if resume_from == "" and found:
        raise UserError(f"{run_dir} already holds checkpoints ({', '.join(found[:4])}{', ...' * (len(found) > 4)}) "
                        'and resume_from is empty: set "resume_from": "latest" to continue that run, "none" to '
                        "train afresh over it, or choose a new experiment_id")


def _load(accelerator, path, fresh, prepared):
    """Checkpoint `path` (intact: its hashes checked) loaded into the prepared objects: its TrainState."""
    state_dir = os.path.join(path, STATE_DIR)
    written, here = portable.written_by(state_dir), portable.launch_kind(accelerator)
    problem = None
    try:
        saved = TrainState.from_json(read_trainer_state(path))
    except Exception as err:  # noqa: BLE001 - any unreadable trainer state, reported as such
        problem = _unreadable(err)
    if problem is None:
        fresh.check_resumable(saved, path, accelerator)  # the same file on every process: all stop together
        try:
            if written == here:
                accelerator.load_state(state_dir)
            else:
                portable.load(state_dir, accelerator, *prepared)
            set_rng_state(torch.load(_rng_file(state_dir, accelerator.process_index), weights_only=False))
            state = TrainState.from_json(read_trainer_state(path), fresh.tracker, accelerator)
        except Exception as err:  # noqa: BLE001 - a file can fail to load in almost any way while unpickling
            problem = _unreadable(err)
    if any_process(accelerator, problem is not None):
        stop_all(accelerator, f"cannot resume from checkpoint {path}: {problem or 'failed on another process'}; its "
                              "files are as they were written (hashes checked), so this is no damage: resume from "
                              "another checkpoint (resume_from PATH) or start afresh (resume_from none)")
    if written != here:
        accelerator.print(f"{path} was written by a {portable.describe(written, saved.world_size)}: its weights and "
                          f"optimizer state converted for this {portable.describe(here, accelerator.num_processes)}")
    state.saved_step, state.saved_path = state.step, path
    accelerator.print(f"resuming from {path} (step {state.step})")
    return state


def _unreadable(err):
    return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


class RunLock:
    """The run folder taken by one launch: `run_dir/.lock` holds the main process's pid, host and
    start time, created exclusively before anything is written there and removed at exit. A second
    launch into the folder stops with one line while the holder lives. A lock whose holder is gone
    (same host, pid not running, or our own pid: a container restarted) is stale and taken over;
    on another host liveness cannot be checked, and `break_lock` takes it over anyway. Taking the
    lock is also the start-up check that the folder is writable."""

    def __init__(self, accelerator, run_dir, break_lock=False):
        self.path = os.path.join(run_dir, LOCK)
        self.mine = None
        problem = None
        if accelerator.is_main_process:
            try:
                problem = self._take(run_dir, break_lock)
            except OSError as err:
                problem = (f"cannot write into the run folder {run_dir} ({err.strerror or err}); set output_dir "
                           "to a writable folder")
        stop_together(accelerator, problem)
        if accelerator.is_main_process:
            clean_leftovers(run_dir)

    def _take(self, run_dir, break_lock):
        os.makedirs(run_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                holder = _read_lock(self.path)
                if not (break_lock or stale_lock(holder)):
                    return (f"run folder {run_dir} is in use by pid {holder['pid']} on {holder['host']} (since "
                            f"{holder['since']}): another launch trains into it. Wait for it or stop it; if no job "
                            "uses the folder any more, relaunch with --break_lock")
                print(f"taking over the run folder lock {self.path} of {holder or 'an unreadable lock'} "
                      f"({'--break_lock' if break_lock else 'its process is gone'})", flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        self.mine = me
        atexit.register(self.release)
        return None

    def release(self):
        """Remove the lock if it is still ours."""
        if self.mine is not None and _read_lock(self.path) == self.mine:
            try:
                os.remove(self.path)
            except OSError:
                pass
        self.mine = None


def _read_lock(path):
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if {"pid", "host", "since"} <= set(holder) else None
    except (OSError, ValueError, TypeError):
        return None


def stale_lock(holder):
    """True when the lock's process is known to be gone: an unreadable lock (its writer died), or on
    this host a pid that is not running or is our own (a restarted container reuses pids)."""
    if holder is None:
        return True
    if holder["host"] != socket.gethostname():
        return False
    return holder["pid"] == os.getpid() or not pid_alive(int(holder["pid"]))


def clean_leftovers(run_dir):
    """What a killed save leaves: `.NAME.partial` (incomplete: removed) and `.NAME.old` (the previous
    NAME, moved aside while its replacement was renamed in: removed if NAME exists, else put back)."""
    for partial in glob.glob(os.path.join(run_dir, ".*.partial")):
        shutil.rmtree(partial, ignore_errors=True)
        print(f"removed {partial}: left by a save that did not finish", flush=True)
    for old in glob.glob(os.path.join(run_dir, ".*.old")):
        name = os.path.join(run_dir, os.path.basename(old)[1: -len(".old")])
        if os.path.exists(name):
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed {old}: the previous {os.path.basename(name)}, already replaced", flush=True)
        else:
            os.rename(old, name)
            print(f"restored {name} from {old}: its replacement was never renamed in", flush=True)
