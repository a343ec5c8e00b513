"""The launches users type, through the real launcher: `accelerate launch` with the shipped yaml files.

DeepSpeed ZeRO-2 (configs/accelerate_config.yaml, bf16 as published) with 1 and 2 processes, the
same global batch on 1 and 2 processes, the cached step under ZeRO-2, exact resume after a SIGKILL
mid-checkpoint and a SIGTERM, a non-finite gradient, two "nodes" on one machine (ZeRO-2 and DDP),
and the launches that would train at the wrong world size, refused. All on the CPU: DeepSpeed picks
its CPU accelerator, and run.py gives the processes a gloo process group.
"""
import glob
import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

import model
from conftest import (BIN, REPO_DIR, assert_same_curves, assert_same_weights, assert_user_error, children, curves,
                      free_port, launch_env, make_config, run_cli, run_dir, weights, write_config)
from test_resume import KILLER

ZERO2 = os.path.join(REPO_DIR, "configs/accelerate_config.yaml")
DDP = os.path.join(REPO_DIR, "configs/accelerate_ddp.yaml")
K = 10  # checkpointing_steps of the published runs: step_10 lies inside the first epoch
# One dataset's rows per 2 processes x B, or 1 process x 2B: with every negative taken (the tiny
# data has 10 per retrieval and clustering row, 1 per classification row) the two see the same
# global batches, and every dataset has as many batches per process, so the same dataset draw.
B = 8
SAME_BATCHES = dict(num_hard_neg=10, log_interval=1)
PUBLISHED_RUN = dict(train_epochs=1, checkpointing_steps=K, save_total_limit=0, **SAME_BATCHES)


def launch_cmd(config, processes, yaml=ZERO2, flags=(), script=os.path.join(REPO_DIR, "run.py"), port=None):
    return [os.path.join(BIN, "accelerate"), "launch", "--config_file", yaml, "--num_processes", str(processes),
            "--main_process_port", port or free_port(), *flags, script, "--config", config]


def accelerate(config, processes, yaml=ZERO2, flags=(), script=os.path.join(REPO_DIR, "run.py"), cwd=REPO_DIR):
    return subprocess.run(launch_cmd(config, processes, yaml, flags, script), cwd=cwd, env=launch_env(),
                          capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def node_flags(rank):
    return "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"


def two_nodes(config, yaml, flags=(), cwd=REPO_DIR):
    """The per-node command of docs/reproducing.md on two localhost "nodes" of one process each."""
    port = free_port()
    procs = [subprocess.Popen(launch_cmd(config, 2, yaml, (*node_flags(rank), *flags), port=port), cwd=cwd,
                              env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            proc.kill()
    return out


def assert_launch_error(proc, *fragments):
    """One line from run.py starting with 'error:' and a non-zero exit. The launcher (accelerate,
    torchrun) adds its own report of the failed process; no traceback comes from the project's code."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not re.search(rf'File "{re.escape(REPO_DIR)}/[^/"]+\.py"', proc.stderr), proc.stderr
    lines = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert len(lines) == 1, proc.stderr  # the same line from every process
    line = lines.pop()
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def published(tiny, tokenized, tmp_path_factory, deepspeed_op):
    """The published launch (ZeRO-2, bf16) with 1 process x 2B and 2 processes x B, one epoch, a
    full-state checkpoint every K steps: {processes: (config path, values, CompletedProcess)}."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for processes in (1, 2):
        config, values = make_config(root, tiny, tokenized, f"p{processes}", train_batch_size=2 * B // processes,
                                     **PUBLISHED_RUN)
        proc = ok(accelerate(config, processes))
        values["steps"] = int(re.search(r"(\d+) steps,", proc.stdout).group(1))
        out[processes] = config, values, proc
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_published_launch_trains(published, tiny, processes):
    """Losses fall, the checkpoints hold trained weights that AutoModel and sentence-transformers load,
    and only the main process writes the shared files (one TensorBoard writer)."""
    _, values, proc = published[processes]
    assert f"{processes} process(es)" in proc.stdout
    assert f"final checkpoint: {run_dir(values)}/epoch_1" in proc.stdout
    losses = [v for _, v in sorted(curves(values)["train/loss"].items())]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert len(glob.glob(os.path.join(values["tb_dir"], "run", "events*"))) == 1
    state = os.path.join(run_dir(values), "epoch_1", "training_state")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(state, "rng_*.pt"))) == [
        f"rng_{rank}.pt" for rank in range(processes)]

    final = os.path.join(run_dir(values), "epoch_1")
    trained = AutoModel.from_pretrained(final).state_dict()
    initial = AutoModel.from_pretrained(f"{tiny}/backbone").state_dict()
    assert max((trained[k].float() - initial[k].float()).abs().max().item() for k in initial) > 1e-3
    assert all(torch.isfinite(t).all() for t in trained.values())
    texts = ["what is the capital of france", "paris is the capital of france", "a"]
    ours = torch.as_tensor(model.load_encoder(final, device="cpu").encode(texts))
    theirs = SentenceTransformer(final, device="cpu", model_kwargs={"dtype": torch.float32}).encode(texts)
    assert ((ours * torch.as_tensor(theirs)).sum(dim=1) >= 0.9999).all()


def first_steps(values, steps):
    logged = curves(values)
    return {tag: [logged[tag][s] for s in range(1, steps + 1)] for tag in ("train/loss", "train/grad_norm")}


def test_same_global_batch_same_update_bf16(published):
    """ZeRO-2 with bf16 (published): 2 processes x B and 1 process x 2B take the same steps, up to
    and including the first retrieval step (in-batch loss across processes), within 5%: bf16
    weights round every update to 8 bits of mantissa (0.4%), and the differences grow step by step."""
    first_retrieval = min(curves(published[1][1])["train/retrieval/inbatch"])
    one, two = first_steps(published[1][1], first_retrieval), first_steps(published[2][1], first_retrieval)
    for tag in one:
        assert two[tag] == pytest.approx(one[tag], rel=5e-2), tag


@pytest.fixture(scope="module")
def exact(tiny, tokenized, tmp_path_factory, deepspeed_op):
    """ZeRO-2 in float32 (--mixed_precision no), 3 steps on the retrieval datasets (in-batch loss
    across processes on every step): (processes, grad_cache_chunk_size) -> config values, each
    launched on first use."""
    root = tmp_path_factory.mktemp("exact")
    data = root / "retrieval"
    data.mkdir()
    for name in ("msmarco", "natural_questions"):
        os.symlink(os.path.join(tokenized, f"{name}.parquet"), data / f"{name}.parquet")
    runs = {}

    def get(processes, chunk):
        if (processes, chunk) not in runs:
            config, values = make_config(root, tiny, str(data), f"p{processes}c{chunk}", train_steps=3,
                                         train_batch_size=2 * B // processes, grad_cache_chunk_size=chunk,
                                         **SAME_BATCHES)
            ok(accelerate(config, processes, flags=("--mixed_precision", "no")))
            runs[processes, chunk] = values
        return runs[processes, chunk]

    return get


# The cached step is also checked against the plain one in-process (test_grad_cache.py)
@pytest.mark.parametrize("processes,chunk", [(2, 0), pytest.param(1, 7, marks=pytest.mark.breadth),
                                             pytest.param(2, 7, marks=pytest.mark.breadth)])
def test_same_update_float32(exact, processes, chunk):
    """Against 1 process x 2B, plain step: 2 processes x B, and the cached step (chunks of 7
    sequences) with 1 and 2 processes, give the same losses, gradient norms and weights."""
    reference, other = exact(1, 0), exact(processes, chunk)
    for tag, values in first_steps(reference, 3).items():
        assert first_steps(other, 3)[tag] == pytest.approx(values, rel=1e-5), tag
    a, b = weights(os.path.join(run_dir(reference), "step_3")), weights(os.path.join(run_dir(other), "step_3"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)


ZERO2_KILLER = KILLER.replace('str(f).endswith("optimizer.bin")',
                              'str(f).endswith("optim_states.pt") and os.environ["RANK"] == "1"')


def test_sigkill_mid_checkpoint_then_sigterm_then_resume_under_zero2(published, tiny, tokenized, tmp_path):
    """One job, restarted as a scheduler would with the same command and "resume_from": "latest":
    killed (SIGKILL) while one process writes its optimizer shard of the second checkpoint, then
    stopped by SIGTERM to one process, then run to the end. Its loss curve and final weights are
    those of the uninterrupted run."""
    _, ref, _ = published[2]
    killer = tmp_path / "killer.py"
    killer.write_text(ZERO2_KILLER.format(repo=REPO_DIR))
    config, values = make_config(tmp_path, tiny, tokenized, "job", resume_from="latest", train_batch_size=B,
                                 **PUBLISHED_RUN)
    proc = accelerate(config, 2, script=str(killer))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    left = sorted(os.listdir(run_dir(values)))
    assert left == [f".step_{2 * K}.partial", "args.json", f"step_{K}"], left

    # Relaunch; once it has resumed, SIGTERM to one of its two workers.
    job = subprocess.Popen(launch_cmd(config, 2), cwd=REPO_DIR, env=launch_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in job.stdout:
            lines.append(line)
            if line.startswith("resuming from"):
                break
        time.sleep(1.0)
        os.kill(max(children(job.pid)), signal.SIGTERM)
        out, err = job.communicate(timeout=300)
    finally:
        job.kill()
    out = "".join(lines) + out
    assert job.returncode == 0, out + err
    assert f"resuming from {run_dir(values)}/step_{K} (step {K})" in out
    stopped = [s for s in out.splitlines() if s.startswith("stopped by")]
    assert len(stopped) == 1, out
    step = int(re.search(r" at step (\d+):", stopped[0]).group(1))
    assert K < step < ref["steps"], out
    assert not os.path.exists(os.path.join(run_dir(values), "epoch_1"))

    proc = ok(accelerate(config, 2))
    assert f"(step {step})" in proc.stdout
    assert_same_curves(curves(ref), curves(values))  # TensorBoard drops what a restart redid
    assert_same_weights(os.path.join(run_dir(ref), "epoch_1"), os.path.join(run_dir(values), "epoch_1"))
    assert not glob.glob(os.path.join(run_dir(values), ".*")), "the partial folder was replaced"


NAN_GRADIENT = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import run

real_embed, steps = run.embed, [0]


def embed(model, batch):
    # Training steps 3 and 4 get a NaN gradient on process 0 only; their losses stay finite.
    out = real_embed(model, batch)
    if out.requires_grad:
        steps[0] += 1
        if steps[0] in (3, 4) and os.environ["RANK"] == "0":
            out.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return out


run.embed = embed
run.main(sys.argv[1:])
"""


def test_non_finite_gradient_under_zero2(tiny, tokenized, tmp_path, deepspeed_op):
    """DeepSpeed skips a step whose gradient is not finite inside its backward; run.py reports
    exactly those steps as skipped, and the weights did not move during them."""
    script = tmp_path / "nan_gradient.py"
    script.write_text(NAN_GRADIENT.format(repo=REPO_DIR))
    config, values = make_config(tmp_path, tiny, tokenized, "nan", train_steps=6, checkpointing_steps=2,
                                 save_total_limit=0)
    proc = ok(accelerate(config, 2, script=str(script)))
    skipped = [line for line in proc.stderr.splitlines() if "non-finite loss or gradient" in line]
    assert [int(re.search(r"step (\d+):", line).group(1)) for line in skipped] == [3, 4], proc.stderr
    assert curves(values)["train/skipped_steps"] == {s: (0 if s < 3 else 1 if s == 3 else 2) for s in range(1, 7)}
    assert_same_weights(os.path.join(run_dir(values), "step_2"), os.path.join(run_dir(values), "step_4"))
    before, after = weights(os.path.join(run_dir(values), "step_4")), weights(os.path.join(run_dir(values), "step_6"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "training went on after the skipped steps"
    assert all(torch.isfinite(t).all() for t in after.values())


def same_run_elsewhere(values, root):
    """A config of the same run as `values` with its outputs under root: (its path, its values)."""
    values = {key: value for key, value in values.items() if key not in ("steps", "config")}
    values.update(output_dir=str(root / "out"), tb_dir=str(root / "tb"))
    return write_config(root / "config.json", **values), values


def test_two_nodes_zero2_match_one_node(published, tmp_path):
    """docs/reproducing.md's per-node command with the shipped ZeRO-2 yaml, on two localhost "nodes": one job
    of world size 2 whose losses and weights are the single-node 2-process run's."""
    _, ref, _ = published[2]
    config, values = same_run_elsewhere(ref, tmp_path)
    for proc in two_nodes(config, ZERO2):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 process(es)" in proc.stdout
    assert len(glob.glob(os.path.join(values["tb_dir"], "run", "events*"))) == 1  # one writer
    assert_same_curves(curves(ref), curves(values))
    assert_same_weights(os.path.join(run_dir(ref), "epoch_1"), os.path.join(run_dir(values), "epoch_1"))


@pytest.mark.breadth  # DDP: the same launch path as ZeRO-2, tested just above
def test_two_nodes_ddp_match_one_node(reference, tmp_path):
    """The same with the DDP yaml (in float32, as the reference) against the reference 2-process
    DDP run."""
    ref = reference[2]
    config, values = same_run_elsewhere(ref, tmp_path)
    for proc in two_nodes(config, DDP, flags=("--mixed_precision", "no")):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 process(es)" in proc.stdout
    assert len(glob.glob(os.path.join(values["tb_dir"], "run", "events*"))) == 1
    assert_same_curves(curves(ref), curves(values))
    assert_same_weights(os.path.join(run_dir(ref), "epoch_2"), os.path.join(run_dir(values), "epoch_2"))


def test_cpu_flag_with_two_processes_is_refused(tiny, tokenized, tmp_path):
    """accelerate's --cpu launcher starts one process whatever --num_processes says."""
    config, values = make_config(tmp_path, tiny, tokenized, "cpu", train_steps=2)
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--cpu", "--num_processes", "2", "run.py", "--config", config]
    proc = subprocess.run(cmd, cwd=REPO_DIR, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert_launch_error(proc, "--cpu", "starts a single process", "configs/accelerate_config.yaml")
    assert not os.path.exists(run_dir(values))


def test_published_yaml_without_standard_launcher_is_refused(tiny, tokenized, tmp_path, deepspeed_op):
    """The published yaml, which lacks `deepspeed_multinode_launcher: standard`, with the per-node
    command: DeepSpeed's pdsh launcher finds no hostfile and would train each node alone."""
    published_yaml = tmp_path / "published.yaml"
    published_yaml.write_text(open(ZERO2).read().replace("  deepspeed_multinode_launcher: standard\n", ""))
    config, values = make_config(tmp_path, tiny, tokenized, "pdsh", train_steps=2)
    # Node 0 alone: with pdsh, no process waits for the other node. pdsh writes .deepspeed_env in the cwd.
    proc = accelerate(config, 2, str(published_yaml), node_flags(0), cwd=tmp_path)
    assert_launch_error(proc, "pdsh", "deepspeed_multinode_launcher: standard")
    assert not os.path.exists(run_dir(values))


def test_world_size_mismatch_is_refused(tiny, tokenized, tmp_path):
    """A WORLD_SIZE that the process group does not have (here: exported, then run.py run directly)."""
    config, values = make_config(tmp_path, tiny, tokenized, "world", train_steps=2)
    proc = run_cli("run.py", "--config", config, env={"WORLD_SIZE": "2"})
    assert_user_error(proc, "started 2 processes (WORLD_SIZE) but accelerate sees 1")
    assert not os.path.exists(run_dir(values))


class FakeEngine:
    def __init__(self, applied, norm):
        self.applied, self.norm = applied, norm

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize("applied,norm,expected", [(True, torch.tensor(2.5), (True, 2.5)), (True, None, (True, None)),
                                                   (False, float("inf"), (False, float("inf"))),
                                                   (True, float("nan"), "applied an optimizer step")])
def test_optimizer_step_reports_what_deepspeed_did(applied, norm, expected):
    """DeepSpeed has stepped (or skipped) inside backward: run.optimizer_step only reads the engine,
    and stops when the engine applied a step whose gradient norm is not finite."""
    import run
    from accelerate.utils import DistributedType
    from config import Config
    from errors import UserError

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  deepspeed_engine_wrapped=SimpleNamespace(engine=FakeEngine(applied, norm)))
    cfg = Config(model_path="m", train_data_path="d")
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            run.optimizer_step(None, cfg, accelerator, None)
    else:
        assert run.optimizer_step(None, cfg, accelerator, None) == expected
