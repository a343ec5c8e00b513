"""The lr schedule: linear warmup, then cosine decay (published) or constant (F2LLM-v2), clamped at min_lr."""
import math
from functools import partial

import pytest
import torch

from config import Config, load_config
from conftest import write_config
from errors import UserError
from run import clamp_lr, make_scheduler


def lrs(scheduler_type, steps=20, warmup=4, lr=1e-3, min_lr=1e-5):
    cfg = Config(model_path="m", train_data_path="t", learning_rate=lr, min_lr=min_lr, warmup_steps=warmup,
                 scheduler_type=scheduler_type)
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(adamw, cfg, steps)
    out = []
    for _ in range(steps):
        adamw.step()
        scheduler.step()
        clamp_lr(adamw, min_lr)
        out.append(adamw.param_groups[0]["lr"])
    return out


def test_cosine_warms_up_then_decays_to_the_clamp():
    got = lrs("cosine")
    assert got[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert got[9] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 16)))
    assert all(a >= b for a, b in zip(got[3:], got[4:])) and got[-1] == 1e-5


def test_constant_with_warmup_stays_at_the_peak():
    got = lrs("constant_with_warmup")
    assert got[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert got[3:] == pytest.approx([1e-3] * 17)


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 7), (4, 20), (5, 5), (10, 3), (500, 23440)])
def test_schedules_are_transformers_schedules(warmup, total):
    """The published code's schedules, transformers' get_cosine_schedule_with_warmup and
    get_constant_schedule_with_warmup, step for step (ours avoids their import cost)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    for scheduler_type, theirs in (("cosine", partial(get_cosine_schedule_with_warmup, num_training_steps=total)),
                                   ("constant_with_warmup", get_constant_schedule_with_warmup)):
        cfg = Config(model_path="m", train_data_path="t", warmup_steps=warmup, scheduler_type=scheduler_type)
        ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
        ours, reference = make_scheduler(ours_opt, cfg, total), theirs(theirs_opt, num_warmup_steps=warmup)
        for _ in range(min(total + 3, 600)):
            assert ours_opt.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]
            ours.step()
            reference.step()


@pytest.mark.parametrize("version", ["published_v1", "published_v2"])
@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("scheduler_type", ["cosine", "constant_with_warmup"])
def test_published_schedules_advance_once_per_process(version, processes, scheduler_type):
    """The published schedule went through accelerator.prepare, whose AcceleratedScheduler steps it
    num_processes times per optimizer step, over the unsharded step count; v2 first multiplies
    warmup_steps by num_processes. Emulated here with transformers' schedule and that loop."""
    from transformers import get_scheduler

    warmup, unsharded, steps = 20, 200, 200 // processes
    cfg = Config(model_path="m", train_data_path="t", warmup_steps=warmup, scheduler_type=scheduler_type,
                 lr_schedule_steps=version, min_lr=0)
    ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
    ours = make_scheduler(ours_opt, cfg, steps, processes, unsharded)
    theirs = get_scheduler(scheduler_type, optimizer=theirs_opt, num_training_steps=unsharded,
                           num_warmup_steps=warmup * (processes if version == "published_v2" else 1))
    lrs = []
    for _ in range(steps):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"], rel=1e-12, abs=0)
        lrs.append(ours_opt.param_groups[0]["lr"])
        ours.step()
        for _ in range(processes):
            theirs.step()
    # v1's warmup lasts warmup_steps / processes optimizer steps; v2's warmup_steps.
    peak = lrs.index(max(lrs))
    assert peak == (warmup // processes if version == "published_v1" else warmup)


def test_unknown_scheduler_type_is_a_clear_error(tmp_path):
    path = write_config(tmp_path / "c.json", model_path="m", train_data_path="t", scheduler_type="linear")
    with pytest.raises(UserError, match="scheduler_type.*'cosine' or 'constant_with_warmup'"):
        load_config(path)
