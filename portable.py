"""A checkpoint's trainable state read as plain tensors per parameter, whatever launch wrote it, and
put into the prepared model and optimizer of a launch of the other kind.

accelerate saves a one-process or DDP launch's state as the model's state dict and torch AdamW's
state dict (`model.safetensors`, `optimizer.bin`), and a DeepSpeed launch's as its engine's files
(`pytorch_model/`: the module, and per process one flat partition of the float32 master weights
and of AdamW's moments, with each parameter's place in it). Neither loads the other (DeepSpeed
asserts on the missing files). Both hold the same numbers: the float32 weights, AdamW's two moments
and its step count; so a resume under the other kind of launch reads them parameter by parameter
(memory-mapped, so no process holds a whole optimizer state) and writes them where that launch
keeps them. The lr schedule, the RNG states and the TrainState are saved alike by both kinds.
"""
import glob
import os
import re

import torch
from accelerate.utils import DistributedType
from safetensors import safe_open

DEEPSPEED_DIR = "pytorch_model"  # accelerate's tag for the engine's checkpoint
SHARD = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def written_by(state_dir):
    """"deepspeed" or "plain" (one process or DDP): the kind of launch that saved state_dir."""
    return "deepspeed" if os.path.isdir(os.path.join(state_dir, DEEPSPEED_DIR)) else "plain"


def launch_kind(accelerator):
    return "deepspeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else "plain"


def describe(kind, world_size):
    """The launch in words, for the lines that name it."""
    if kind == "deepspeed":
        return f"DeepSpeed launch of {world_size} process(es)"
    return "one-process launch" if world_size == 1 else f"DDP launch of {world_size} processes"


def trainable(model):
    """[(name, parameter)] the optimizer steps, in the order it was given them (run.set_up)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def read(state_dir, names):
    """(step, iterator of (name, weight, exp_avg, exp_avg_sq)) for the parameters `names` (the
    trainable ones, in optimizer order), from a checkpoint of either kind; each tensor float32 and
    of its parameter's shape. Raises ValueError when the checkpoint's parameters are not these."""
    if written_by(state_dir) == "deepspeed":
        return _read_deepspeed(os.path.join(state_dir, DEEPSPEED_DIR), names)
    return _read_plain(state_dir, names)


def _read_plain(state_dir, names):
    optimizer = torch.load(os.path.join(state_dir, "optimizer.bin"), map_location="cpu", mmap=True,
                           weights_only=False)
    state = optimizer["state"]
    if len(state) != len(names):
        raise ValueError(f"its optimizer holds {len(state)} parameters, this model trains {len(names)}")
    step = float(next(iter(state.values()))["step"]) if state else 0.0

    def tensors():
        with safe_open(os.path.join(state_dir, "model.safetensors"), "pt") as weights:
            for i, name in enumerate(names):
                if name not in weights.keys():
                    raise ValueError(f"it has no weight {name}")
                moments = state[i]
                yield name, weights.get_tensor(name).float(), moments["exp_avg"].float(), moments["exp_avg_sq"].float()
    return step, tensors()


def _read_deepspeed(folder, names):
    matches = [(SHARD.fullmatch(os.path.basename(f)), f) for f in glob.glob(os.path.join(folder, "*optim_states.pt"))]
    shards = sorted((int(match.group(1)), f) for match, f in matches if match)
    if not shards:
        raise ValueError(f"no ZeRO optimizer shards in {folder}")
    parts = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
             for _, f in shards]
    model = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", mmap=True,
                       weights_only=False)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    if set(shapes) != set(names):
        raise ValueError(f"its {len(shapes)} trained parameters are not this model's {len(names)}")
    # Each process's partition holds consecutive slices of the flattened parameters, in process order.
    where = {name: [] for name in names}
    for part in parts:
        for group, mapping in enumerate(part["param_slice_mappings"]):
            for name, fragment in mapping.items():
                where[name].append((part, group, slice(fragment.start, fragment.start + fragment.numel)))
    step = float(parts[0]["base_optimizer_state"]["state"][0]["step"])

    def tensors():
        for name in names:
            def joined(pick):
                return torch.cat([pick(part, group)[piece] for part, group, piece in where[name]]).view(shapes[name])
            yield (name, joined(lambda part, g: part["single_partition_of_fp32_groups"][g]).float(),
                   joined(lambda part, g: part["base_optimizer_state"]["state"][g]["exp_avg"]).float(),
                   joined(lambda part, g: part["base_optimizer_state"]["state"][g]["exp_avg_sq"]).float())
    return step, tensors()


@torch.no_grad()
def load(state_dir, accelerator, model, optimizer, scheduler):
    """Put checkpoint state_dir, written by the other kind of launch, into this launch's prepared
    model, optimizer and lr schedule (collective-free: each process writes its own copy or shard)."""
    module = accelerator.unwrap_model(model)
    params = trainable(module)
    step, tensors = read(state_dir, [name for name, _ in params])
    by_name = dict(params)
    if launch_kind(accelerator) == "deepspeed":
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        engine = accelerator.deepspeed_engine_wrapped.engine
        zero = engine.optimizer
        # AdamW creates its moments at its first step, and ZeRO links each parameter to its slice of
        # them after that step: create them (the step count restored) and have ZeRO link them now.
        for flat in (p for group in zero.optimizer.param_groups for p in group["params"]):
            zero.optimizer.state[flat] = {"step": torch.tensor(step, dtype=torch.float32, device=flat.device),
                                          "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        zero._lazy_init_hp_params_optimizer_state()
        for name, weight, exp_avg, exp_avg_sq in tensors:
            p = by_name[name]
            p.copy_(weight.to(p.dtype))  # the working copy (bf16 under bf16), besides the float32 master
            safe_set_full_fp32_param(p, weight)
            safe_set_full_optimizer_state(p, exp_avg, "exp_avg")
            safe_set_full_optimizer_state(p, exp_avg_sq, "exp_avg_sq")
        engine.global_steps = int(step)
    else:
        inner = optimizer.optimizer  # accelerate's wrapper around torch's AdamW
        device = next(module.parameters()).device
        moments = {}
        for i, (name, weight, exp_avg, exp_avg_sq) in enumerate(tensors):
            by_name[name].copy_(weight)
            moments[i] = {"step": torch.tensor(step), "exp_avg": exp_avg.to(device),
                          "exp_avg_sq": exp_avg_sq.to(device)}
        state = inner.state_dict()
        inner.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(torch.load(os.path.join(state_dir, "custom_checkpoint_0.pkl"), weights_only=False))
