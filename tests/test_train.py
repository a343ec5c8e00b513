"""End to end through the real commands: tokenize (fixture), then run.py with 1 and 2 CPU processes."""
import glob
import json
import os

import pytest
import torch
from conftest import BIN, call_main, ddp_launch, run_cli, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModel, AutoTokenizer

import evaluate



def train_config(tmp_path, tiny, tokenized, **overrides):
    values = dict(model_path=f"{tiny}/backbone", train_data_path=tokenized, experiment_id="e2e",
                  output_dir=str(tmp_path / "out"), tb_dir=str(tmp_path / "tb"), cache_dir=str(tmp_path / "cache"),
                  train_batch_size=8, max_seq_length=64, num_hard_neg=3, learning_rate=2e-3, min_lr=1e-5,
                  warmup_steps=5, train_epochs=2, log_interval=5, checkpointing_steps=40, validation_steps=40,
                  min_eval_queries=0)  # the 1% split, whose batch counts the checks below assume
    values.update(overrides)
    return write_config(tmp_path / "config.json", **values), values


def scalars(tb_dir, tag):
    events = EventAccumulator(glob.glob(os.path.join(tb_dir, "e2e"))[0])
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def check_run(tmp_path, values, proc, steps_per_epoch):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = os.path.join(values["output_dir"], "e2e")
    total = 2 * steps_per_epoch
    expected = {f"step_{s}" for s in range(40, total + 1, 40)} | {"epoch_1", "epoch_2"}
    assert {d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))} == expected
    assert f"final checkpoint: {run_dir}/epoch_2" in proc.stdout

    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert args["train_batch_size"] == values["train_batch_size"] and args["temperature"] == 0.05

    # Loss goes down: training losses of the first and last log interval, and validation.
    train = scalars(values["tb_dir"], "train/retrieval/inbatch")
    assert train[-1][0] == total - total % 5
    assert train[-1][1] < 0.7 * train[0][1], train
    valid = scalars(values["tb_dir"], "valid/retrieval/hard")
    assert [s for s, _ in valid][-1] == total
    for tag in ("train/imdb/hard", "train/banking77/hard", "train/msmarco/inbatch", "valid/imdb/hard", "lr"):
        assert scalars(values["tb_dir"], tag)
    lr = dict(scalars(values["tb_dir"], "lr"))
    assert max(lr.values()) <= values["learning_rate"] * (1 + 1e-6)
    assert min(lr.values()) >= values["min_lr"] * (1 - 1e-6)

    # Checkpoints reload with the plain transformers API and hold trained weights.
    final = os.path.join(run_dir, "epoch_2")
    trained = AutoModel.from_pretrained(final)
    initial = AutoModel.from_pretrained(values["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.eos_token == "<|im_end|>"
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), initial.state_dict().values())]
    assert max(diffs) > 1e-3

    # Throughput is logged; the retrieval metrics of the last validation are evaluate.py's on the
    # final checkpoint (same held-out rows; with 2 processes, each embedded a share).
    assert all(v > 0 for _, v in scalars(values["tb_dir"], "train/tokens_per_s"))
    proc = call_main(evaluate.main, [final, values["train_data_path"], "--config", str(tmp_path / "config.json")])
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[-3:]}
    for name in ("msmarco", "natural_questions"):
        for column, key in enumerate(("ndcg@10", "mrr@10", "recall@10")):
            assert scalars(values["tb_dir"], f"valid/{name}/{key}")[-1] == (total, pytest.approx(
                float(table[name][column]), abs=1e-4))
    return valid


def steps_per_epoch(tokenized, batch_size, processes):
    import datasets

    total = 0
    for path in sorted(glob.glob(os.path.join(tokenized, "*.parquet"))):
        n = len(datasets.Dataset.from_parquet(path))
        train_rows = n - -(-n // 100)  # validation is ceil(1%) (min_eval_queries 0)
        batches = -(-train_rows // batch_size)
        total += -(-batches // processes)
    return total


def test_train_one_process(tmp_path, tiny, tokenized):
    config, values = train_config(tmp_path, tiny, tokenized, gradient_checkpointing=True)
    assert run_cli("run.py", "--config", config, "--prepare_only").returncode == 0
    proc = run_cli("run.py", "--config", config, prefix=[os.path.join(BIN, "accelerate"), "launch",
                                                         "--config_file", "configs/accelerate_cpu.yaml"])
    check_run(tmp_path, values, proc, steps_per_epoch(tokenized, 8, 1))


@pytest.mark.breadth  # two processes under the DDP launch: as in test_presets, test_resume
def test_train_two_processes(tmp_path, tiny, tokenized):
    config, values = train_config(tmp_path, tiny, tokenized)
    proc = run_cli("run.py", "--config", config, env={"OMP_NUM_THREADS": "1"}, prefix=ddp_launch(2))
    check_run(tmp_path, values, proc, steps_per_epoch(tokenized, 8, 2))
    assert "2 process(es)" in proc.stdout


def test_train_steps_stops_inside_an_epoch(tmp_path, tiny, tokenized):
    config, values = train_config(tmp_path, tiny, tokenized, train_steps=7, checkpointing_steps=0,
                                  validation_steps=0)
    proc = run_cli("run.py", "--config", config)
    assert proc.returncode == 0, proc.stderr
    run_dir = os.path.join(values["output_dir"], "e2e")
    assert sorted(os.listdir(run_dir)) == ["args.json", "run.log", "step_7"]
    assert f"final checkpoint: {run_dir}/step_7" in proc.stdout


class OneProcess:
    """What LossTracker asks of an Accelerator, for one process (a reduce is the identity)."""
    device = torch.device("cpu")

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def fill_tracker(keys):
    """A LossTracker after three steps (two on msmarco, a retrieval set, one on imdb, classification)
    with Matryoshka terms, and the values added, to compute the expected means by hand."""
    from metrics import LossTracker

    tracker = LossTracker(["msmarco", "imdb"], {"msmarco": "retrieval", "imdb": "classification"},
                          ("inbatch", "hard", "mrl_inbatch", "mrl_hard"), keys)
    steps = [("msmarco", {"inbatch": 2.0, "hard": 1.0, "mrl_inbatch": 0.5, "mrl_hard": 0.25}),
             ("msmarco", {"inbatch": 4.0, "hard": 3.0, "mrl_inbatch": 1.5, "mrl_hard": 0.75}),
             ("imdb", {"hard": 0.6, "mrl_hard": 0.2})]
    for name, losses in steps:
        tracker.add(name, {k: torch.tensor(v) for k, v in losses.items()}, grad_norm=1.0)
    return tracker


def test_published_log_keys_fold_the_matryoshka_terms_into_their_loss():
    out = fill_tracker("published").report(OneProcess, "train")
    assert out["msmarco/training_loss_in_batch"] == pytest.approx((2 + 0.5 + 4 + 1.5) / 2)
    assert out["msmarco/training_loss_hard"] == pytest.approx((1 + 0.25 + 3 + 0.75) / 2)
    assert out["imdb/training_loss_hard"] == pytest.approx(0.8)
    assert out["Avg/retrieval/training_loss_in_batch"] == pytest.approx(4.0)
    assert out["Avg/retrieval/training_loss_hard"] == pytest.approx(2.5)
    assert out["Avg/classification/training_loss_hard"] == pytest.approx(0.8)
    assert "imdb/training_loss_in_batch" not in out and "Avg/classification/training_loss_in_batch" not in out
    assert out["train/loss"] == pytest.approx((3.75 + 9.25 + 0.8) / 3) and out["train/grad_norm"] == 1.0
    # The published validation has no Matryoshka terms: ours stay apart under their own names.
    valid = fill_tracker("published").report(OneProcess, "valid")
    assert valid["msmarco/valid_loss_hard"] == pytest.approx(2.0)
    assert valid["msmarco/valid_loss_mrl_hard"] == pytest.approx(0.5)
    assert valid["Avg/retrieval/valid_loss_in_batch"] == pytest.approx(3.0)


def test_grouped_log_keys_keep_every_term_apart():
    out = fill_tracker("grouped").report(OneProcess, "train")
    assert out["train/msmarco/inbatch"] == pytest.approx(3.0)
    assert out["train/msmarco/mrl_inbatch"] == pytest.approx(1.0)
    assert out["train/retrieval/hard"] == pytest.approx(2.0)
    assert out["train/classification/mrl_hard"] == pytest.approx(0.2)
    assert not any(key.startswith("Avg/") or "_loss_" in key for key in out)


@pytest.mark.parametrize("implementation", ["fused", "torch_default"])
def test_adamw_implementations_compute_the_adamw_formula(implementation):
    """Both `adamw_implementation` values are AdamW (Loshchilov & Hutter, decoupled weight decay),
    checked against the formula in float64 over three steps; `fused` is torch's fused kernel."""
    from config import Config
    from run import make_optimizer

    cfg = Config(model_path="m", train_data_path="d", learning_rate=1e-2, weight_decay=0.1, adam_betas=[0.9, 0.98],
                 adamw_implementation=implementation)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 8)), torch.nn.Parameter(torch.randn(8))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    optimizer = make_optimizer(params, cfg)
    assert optimizer.defaults["fused"] is (True if implementation == "fused" else None)
    expected = [p.detach().double().clone() for p in params]
    moments = [(torch.zeros_like(e), torch.zeros_like(e)) for e in expected]
    (b1, b2), lr, eps = cfg.adam_betas, cfg.learning_rate, 1e-8
    for t, step_grads in enumerate(grads, 1):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        for e, (m, v), g in zip(expected, moments, step_grads):
            e.mul_(1 - lr * cfg.weight_decay)
            m.mul_(b1).add_((1 - b1) * g.double())
            v.mul_(b2).add_((1 - b2) * g.double() ** 2)
            e.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=1e-6)
