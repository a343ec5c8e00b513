"""The Accelerator of a launch, the refusal of launches that would train at the wrong world size, and
the helpers by which processes agree (any_process), stop together with one line (stop_together) or
the main one speaks (warn); Processes, a launch seen by a script that needs no Accelerator
(mine_negatives.py).

Without CUDA, accelerate finds no process-group backend for a `accelerate launch` that starts
several processes: every process then believes it is alone (world size 1, rank 0), trains on
the same data and writes the same checkpoints. We give it gloo: through DeepSpeed's own
initialisation under DeepSpeed (`cpu=True` would make accelerate drop DeepSpeed), through
accelerate's multi-CPU path otherwise. Launches that still disagree with accelerate (a launcher
that started fewer processes than were asked for) stop with one line; a launch of more processes on
a node than it has GPUs (or, without CUDA, CPU cores) gets one warning.
"""
import ctypes
import ctypes.util
import datetime
import gc
import os
import signal
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

from errors import UserError

# This process's parent when it started (as near to its start as this module is imported): a launcher
# that dies before die_with_launcher asks for its signal shows as a changed parent.
STARTING_PARENT = os.getppid()

PR_SET_PDEATHSIG = 1  # linux/prctl.h

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
    check_process_count()
    die_with_launcher()
    join_restarted_launch()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if torch.cuda.is_available() or not launched:
        accelerator = Accelerator()
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = Accelerator(cpu=True)
    check_world_size(accelerator.num_processes)
    return accelerator


def cpu_cores():
    """The CPU cores this process may run on (its affinity, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def process_count_warning(processes, gpus, cores):
    """The warning for `processes` processes on one node that has `gpus` CUDA devices (0: none, the
    processes run on its `cores` CPU cores), or None when each has a device or a core of its own."""
    if gpus:
        if processes <= gpus:
            return None
        have, fix = f"{gpus} GPU(s)", gpus
    else:
        if processes <= cores:
            return None
        have, fix = f"no GPU and {cores} CPU core(s)", cores
    return (f"this launch starts {processes} processes on this node, which has {have}: "
            + ("processes share a GPU, which NCCL refuses or runs slowly"
               if gpus else "the processes share the cores and each step runs several times slower")
            + f"; pass --num_processes {fix} (or fewer) to accelerate launch (configs/accelerate_config.yaml and "
              "accelerate_ddp.yaml say 8)")


def check_process_count():
    """Warn once when a launch starts more processes on this node (LOCAL_WORLD_SIZE, which torchrun and
    accelerate launch set) than it has GPUs, or, without CUDA, CPU cores."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if not local.isdigit():
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = process_count_warning(int(local), gpus, cpu_cores())
    if message and os.environ.get("LOCAL_RANK", "0") == "0":  # once per node
        print(f"warning: {message}", file=sys.stderr, flush=True)


def die_with_launcher():
    """A worker of a launcher (torchrun / accelerate launch: LOCAL_RANK or TORCHELASTIC_RUN_ID set)
    gets SIGTERM from Linux when its launcher dies, and so stops as on a preemption notice (a
    checkpoint once training, see run.StopSignal). torch elastic starts each worker in a session of
    its own, so a SIGKILL to the launcher or its process group reaches no worker, and orphaned
    workers would train on to the end, unseen. Not for a plain `python run.py`: its parent is a
    shell, which may exit under nohup while the run should go on."""
    if not sys.platform.startswith("linux") or not ({"LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & set(os.environ)):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    # The kernel signals when the thread that started us exits; torch elastic starts workers from
    # its main thread, whose end is the launcher's.
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        warn_once(f"cannot ask to be stopped with the launcher (prctl: {os.strerror(ctypes.get_errno())})")
        return
    if os.getppid() != STARTING_PARENT:  # the launcher died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def join_restarted_launch():
    """The process group of workers that torch elastic restarted (`--max_restarts N`), formed here,
    before accelerate would form it. Its static rendezvous (accelerate's and torchrun's default)
    keeps one store for every attempt, and the process group's keys in it carry no attempt: each
    new worker read the dead workers' addresses and failed to connect (Gloo connectFullMesh,
    "Connection refused"), so no restart ever trained. Keys under this attempt's number are fresh."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or attempt == 0:
        return
    timeout = torch.distributed.constants.default_pg_timeout
    world = int(os.environ["WORLD_SIZE"])
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=False, timeout=timeout)
    # The backend accelerate picks, and make_accelerator gives a launch without CUDA.
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout,
                                         store=torch.distributed.PrefixStore(f"attempt_{attempt}/", store),
                                         rank=int(os.environ["RANK"]), world_size=world)


def warn_once(message):
    """A warning line on stderr from the first process only, before an Accelerator exists."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


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


def stop_together(accelerator, problem, elsewhere="failed on another process (see its log)", cleanup=None):
    """If any process has a problem (one all-reduce): every process stops at this point, the main one
    with one line (its problem, or `elsewhere`; after `cleanup()`), the others quietly with status 2."""
    if not any_process(accelerator, problem is not None):
        return
    if accelerator.is_main_process and cleanup is not None:
        cleanup()
    stop_all(accelerator, problem or elsewhere)


def stop_all(accelerator, line):
    """Every process stops (all reached this point together): the main one with `line`, the others
    quietly with status 2 (one line for the user, not one per process)."""
    if accelerator.is_main_process:
        raise UserError(line)
    raise SystemExit(2)


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
