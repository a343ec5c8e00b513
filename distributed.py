"""The Accelerator of a launch, the refusal of launches that would train at the wrong world size, and
the helpers by which processes agree (any_process) or the main one speaks (warn); Processes, a
launch seen by a script that needs no Accelerator (mine_negatives.py).

Without CUDA, accelerate finds no process-group backend for a `accelerate launch` that starts
several processes: every process then believes it is alone (world size 1, rank 0), trains on
the same data and writes the same checkpoints. We give it gloo: through DeepSpeed's own
initialisation under DeepSpeed (`cpu=True` would make accelerate drop DeepSpeed), through
accelerate's multi-CPU path otherwise. Launches that still disagree with accelerate (a launcher
that started fewer processes than were asked for) stop with one line.
"""
import datetime
import gc
import os
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

from errors import UserError

# The world size each launcher puts in its workers' environment (torchrun and DeepSpeed's
# launcher: WORLD_SIZE; MPI launchers: the others).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

WORKING_LAUNCH = ("accelerate launch --config_file configs/accelerate_config.yaml (DeepSpeed ZeRO-2) or "
                  "configs/accelerate_ddp.yaml (DDP) --num_processes N run.py --config ..., which also runs on CPUs")


def _flag(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched_world_size():
    """The number of processes the launcher says it started, or None when no launcher says."""
    for name in WORLD_SIZE_VARS:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def make_accelerator():
    """The Accelerator for this launch, with every process's true rank and world size (or a UserError)."""
    check_launcher()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if torch.cuda.is_available() or not launched:
        accelerator = Accelerator()
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = Accelerator(cpu=True)
    check_world_size(accelerator.num_processes)
    return accelerator


def check_launcher():
    """Launches known to start processes that cannot form the world that was asked for."""
    cpu_launch = _flag("ACCELERATE_USE_CPU") and launched_world_size() is None
    if cpu_launch and os.environ.get("MASTER_ADDR"):
        # accelerate's simple launcher sets MASTER_ADDR only when asked for more than one process or
        # machine, and with --cpu / use_cpu it then starts one process all the same.
        raise UserError("accelerate launch --cpu (or use_cpu: true) starts a single process whatever --num_processes "
                        "or --num_machines say, and it would train alone; for several processes use " + WORKING_LAUNCH +
                        ", without --cpu (for one process, unset MASTER_ADDR)")
    if _flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("CROSS_SIZE") == "1":
        # DeepSpeed's own launcher, which accelerate runs for --num_machines > 1 unless told
        # `deepspeed_multinode_launcher: standard`; with no hostfile it starts this node's processes only.
        raise UserError("accelerate launch --num_machines N ran DeepSpeed's pdsh launcher, which found no hostfile "
                        f"and started this node's {os.environ.get('WORLD_SIZE', '?')} process(es) as a job of their "
                        "own: every node would train alone. Set `deepspeed_multinode_launcher: standard` under "
                        "deepspeed_config in the accelerate config (configs/accelerate_config.yaml has it), or pass "
                        "--deepspeed_multinode_launcher standard")


def check_world_size(num_processes):
    """The launcher and accelerate must agree on the number of processes."""
    launched = launched_world_size()
    if launched is not None and launched != num_processes:
        raise UserError(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate sees {num_processes}, "
                        "so each would train alone on the same data; use " + WORKING_LAUNCH)


def close(accelerator):
    """End a run that went well on every process together, with the process group, and the model and
    optimizer that hold it, freed while the interpreter is whole: gloo's worker threads left to the
    interpreter's exit can abort a process (SIGABRT) after the last checkpoint is written."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()  # free_memory collects before it drops its own references
    accelerator.end_training()


def any_process(accelerator, flag):
    """True if `flag` is true on any process (one all-reduce): all processes take the same branch."""
    flag = torch.tensor(float(flag), device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def warn(accelerator, message):
    """A warning line on stderr, once (the main process)."""
    if accelerator.is_main_process:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Processes:
    """This process's place in a launch (accelerate launch, torchrun; none: one process alone): index,
    count, barrier, broadcast from the main process, and its share of a list of work."""

    def __init__(self, device):
        launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1 or (launched_world_size() or 1) > 1
        self.state = None
        self.index, self.count, self.device = 0, 1, torch.device(device)
        if launched:
            check_launcher()
            # the other processes wait at a barrier while the main one writes a file: give it hours
            self.state = PartialState(cpu=device == "cpu", timeout=datetime.timedelta(hours=12))
            check_world_size(self.state.num_processes)
            self.index, self.count = self.state.process_index, self.state.num_processes
            self.device = self.state.device if device == "cuda" else torch.device("cpu")

    @property
    def main(self):
        return self.index == 0

    def barrier(self):
        if self.count > 1:
            self.state.wait_for_everyone()

    def broadcast(self, value):
        if self.count == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, items):
        return items[self.index :: self.count]
