"""run.py's command line: `--KEY VALUE` overrides of every config key (checked as the file's keys),
"did you mean" for an unknown key, a `--help` that prints before torch loads, configs/own_data.json,
the schedule warnings (a warmup or a checkpointing_steps beyond the run) and the warning for more
processes on a node than GPUs or CPU cores.

Errors are checked in this process through call_main (they stop before any model or data is read);
one 2-process DDP launch trains configs/own_data.json with its paths given on the command line.
"""
import json
import os
import subprocess
import sys
import time
import types

import pytest

import distributed
import run
from config import Config, cli_help, config_keys, first_sentence, load_config, parse_run_args
from conftest import REPO_DIR, assert_user_error, call_main, ddp_launch, make_config, run_cli, write_config

OWN_DATA = os.path.join(REPO_DIR, "configs", "own_data.json")
HEAVY = ("torch", "transformers", "accelerate", "datasets")


@pytest.fixture
def config(tmp_path):
    """A config file with the required keys (paths that need not exist: the errors come first)."""
    return write_config(tmp_path / "c.json", model_path="m", train_data_path="d", learning_rate=1e-3)


# ---- 1. overrides ------------------------------------------------------------------------------

def test_overrides_are_read_by_the_keys_types(config):
    args, overrides = parse_run_args(["--config", config, "--learning_rate", "1e-4", "--train_batch_size", "8",
                                      "--adam_betas", "[0.9, 0.95]", "--lora", '{"r": 8}', "--use_mrl", "true",
                                      "--gradient_checkpointing", "false", "--experiment_id", "x",
                                      "--teacher_model_path", "none", "--negative_columns", "null",
                                      "--warmup_steps", "-1", "--merge_checkpoints", "--prepare_only"])
    assert (args.config, args.prepare_only, args.break_lock) == (config, True, False)
    assert overrides == {"learning_rate": 1e-4, "train_batch_size": 8, "adam_betas": [0.9, 0.95],
                         "lora": {"r": 8}, "use_mrl": True, "gradient_checkpointing": False, "experiment_id": "x",
                         "teacher_model_path": None, "negative_columns": None, "warmup_steps": -1,
                         "merge_checkpoints": True}
    assert type(overrides["learning_rate"]) is float and type(overrides["train_batch_size"]) is int


def test_command_line_wins_over_the_file(config):
    cfg = load_config(config, {"learning_rate": 1e-4, "model_path": "other", "lora": {"r": 8}})
    assert (cfg.learning_rate, cfg.model_path, cfg.train_data_path) == (1e-4, "other", "d")
    assert cfg.lora["r"] == 8 and cfg.lora["alpha"] == 32  # merged with the defaults, as a file's
    # a required key may come from the command line alone
    bare = write_config(os.path.join(os.path.dirname(config), "bare.json"), learning_rate=1e-3)
    assert load_config(bare, {"model_path": "m", "train_data_path": "d"}).model_path == "m"


@pytest.mark.parametrize("argv, fragments", [
    (["--train_batch_size", "abc"], ["command line: --train_batch_size", "integer", "'abc'"]),
    (["--train_batch_size", "16.5"], ["command line: --train_batch_size", "type int", "16.5"]),
    (["--learning_rate", "fast"], ["--learning_rate", "a number"]),
    (["--learning_rate", "-1e-4"], ["command line: --learning_rate", "must be positive"]),
    (["--learning_rate=-1e-4"], ["command line: --learning_rate", "must be positive"]),
    (["--learning_rate", "1e-8"], ["key 'min_lr'", "above learning_rate"]),  # checked against the file's min_lr
    (["--temperature", "nan"], ["command line: --temperature", "NaN"]),
    (["--temperature", "1e400"], ["command line: --temperature", "beyond the range of a float"]),
    (["--dataset_draw", "shuffled"], ["command line: --dataset_draw", "'seeded' or 'published'"]),
    (["--adam_betas", "[0.9, 1.5]"], ["command line: --adam_betas", "two numbers in [0, 1)"]),
    (["--adam_betas", "0.9"], ["command line: --adam_betas", "type list"]),
    (["--lora", "{r: 8}"], ["command line: --lora", "JSON object"]),
    (["--lora", '{"r": 0}'], ["command line: --lora", "r >= 1"]),
    (["--use_mrl", "maybe"], ["command line: --use_mrl", "true or false"]),
    (["--seed", "null"], ["command line: --seed", "type int", "null"]),
    (["--learning_rate"], ["--learning_rate", "expected one argument"]),
    (["--learning_rate", "1e-4", "5"], ["unexpected value '5'"]),
    (["--num_processes", "2"], ["--num_processes", "accelerate launch --num_processes N run.py"]),
])
def test_a_bad_override_is_one_line_naming_the_option(config, argv, fragments):
    assert_user_error(call_main(run.main, ["--config", config, *argv]), *fragments)


# ---- 2. did you mean -----------------------------------------------------------------------------

def test_unknown_key_in_the_file_says_the_nearest(tmp_path):
    path = write_config(tmp_path / "typo.json", model_path="m", train_data_path="d", learnig_rate=1e-4)
    line = assert_user_error(call_main(run.main, ["--config", path]), path,
                             "unknown key 'learnig_rate'; did you mean 'learning_rate'?")
    assert "valid keys" not in line


def test_unknown_key_on_the_command_line_says_the_nearest(config):
    line = assert_user_error(call_main(run.main, ["--config", config, "--learnig_rate", "1e-4"]),
                             "command line", "unknown key 'learnig_rate'; did you mean 'learning_rate'?")
    assert "valid keys" not in line
    assert_user_error(call_main(run.main, ["--config", config, "--batch_size", "8"]),
                      "did you mean 'train_batch_size'?")
    assert_user_error(call_main(run.main, ["--config", config, "--prepare-only"]), "did you mean 'prepare_only'?")


def test_unknown_key_near_none_lists_them_all(tmp_path, config):
    path = write_config(tmp_path / "far.json", model_path="m", train_data_path="d", zzz=1)
    for proc in (call_main(run.main, ["--config", path]), call_main(run.main, ["--config", config, "--zzz", "1"])):
        line = assert_user_error(proc, "unknown key 'zzz'; valid keys:", "docs/config.md")
        assert "did you mean" not in line
        assert all(key in line for key in config_keys())


# ---- 3. --help -----------------------------------------------------------------------------------

def test_help_lists_every_key_before_torch_loads():
    """`run.py --help` as the interpreter runs it (run_name __main__), then which heavy modules loaded."""
    probe = ("import runpy, sys\nsys.argv = ['run.py', '--help']\ntry:\n    runpy.run_path('run.py', "
             "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
             f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    took = time.time() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("LOADED []"), proc.stdout[-500:]
    assert took < 10, took  # about 0.1 s; torch alone takes seconds
    text = proc.stdout
    for option in ("--config FILE", "--prepare_only", "--break_lock"):
        assert option in text
    flat = "".join(text.split())  # the words of each help, wherever argparse wraps them (at hyphens too)
    for field in Config.__dataclass_fields__.values():
        assert f"--{field.name} " in text, field.name
        assert "".join(first_sentence(field.metadata["help"]).split()) in flat, field.name
    assert text == cli_help(run.__doc__.split("\n\n")[0]) + "LOADED []\n"


def test_help_through_the_real_cli():
    proc = run_cli("run.py", "--config", "whatever.json", "-h", timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: run.py") and "--learning_rate FLOAT" in proc.stdout


def test_first_sentence_skips_abbreviations_and_parentheses():
    assert first_sentence("If set (e.g. 0.1), drop them. null: off.") == "If set (e.g. 0.1), drop them."
    assert first_sentence("`auto`: a (b. c) d. More.") == "auto: a (b. c) d."


# ---- 5. schedule warnings ------------------------------------------------------------------------

def fake_accelerator(processes=1):
    return types.SimpleNamespace(is_main_process=True, num_processes=processes)


def test_schedule_warnings(capsys):
    cfg = Config(model_path="m", train_data_path="d", warmup_steps=500, checkpointing_steps=5000)
    run.warn_schedule(cfg, 30, fake_accelerator())
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: warmup_steps 500 >= the run's 30 steps: the learning rate never reaches learning_rate; lower "
        "warmup_steps, e.g. to 10% of the run (3)",
        "warning: checkpointing_steps 5000 > the run's 30 steps: no step_N checkpoint falls inside the run, only "
        "the epoch-end ones (epoch_N) and the last step's are written; lower checkpointing_steps to save more often"]
    for fine in (dict(warmup_steps=29, checkpointing_steps=30), dict(warmup_steps=0, checkpointing_steps=0)):
        run.warn_schedule(Config(model_path="m", train_data_path="d", **fine), 30, fake_accelerator())
        assert capsys.readouterr().err == ""
    # published_v1 warms up over warmup_steps / processes optimizer steps
    v1 = Config(model_path="m", train_data_path="d", warmup_steps=60, checkpointing_steps=0,
                lr_schedule_steps="published_v1")
    run.warn_schedule(v1, 30, fake_accelerator(2))
    assert "warmup_steps 60 (30 optimizer steps with lr_schedule_steps published_v1 and 2 processes)" in \
        capsys.readouterr().err
    run.warn_schedule(v1, 30, fake_accelerator(4))
    assert capsys.readouterr().err == ""


# ---- 6. processes per node -----------------------------------------------------------------------

def test_process_count_warning_numbers():
    assert distributed.process_count_warning(2, 0, 2) is None
    assert distributed.process_count_warning(8, 8, 2) is None
    gpu = distributed.process_count_warning(8, 4, 64)
    assert "8 processes" in gpu and "4 GPU(s)" in gpu and "--num_processes 4" in gpu


def test_more_processes_than_cores_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    for rank in ("0", "1", "2"):  # only the node's first process speaks
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        monkeypatch.setenv("LOCAL_RANK", rank)
        distributed.check_process_count()
    err = capsys.readouterr().err
    assert err == ("warning: this launch starts 3 processes on this node, which has no GPU and 2 CPU core(s): the "
                   "processes share the cores and each step runs several times slower; pass --num_processes 2 (or "
                   "fewer) to accelerate launch (configs/accelerate_config.yaml and accelerate_ddp.yaml say 8)\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.check_process_count()
    assert capsys.readouterr().err == ""


# ---- 4. configs/own_data.json, trained with its paths on the command line --------------------------

def test_own_data_config_is_valid():
    cfg = load_config(OWN_DATA)
    assert cfg.resume_from == "latest" and cfg.num_hard_neg == 3 and cfg.train_batch_size == 16
    assert 2e-5 <= cfg.learning_rate <= 1e-4 and cfg.warmup_steps <= 50 and 2 <= cfg.train_epochs <= 3


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a 2-process launch on 2 cores")
def test_own_data_trains_with_paths_on_the_command_line(tmp_path, tiny, tokenized):
    """A 2-process DDP launch on 2 cores (no process-count warning), the overrides after run.py: they
    reach every process and args.json; the config's warmup and checkpointing_steps outlast the 4 steps."""
    out = tmp_path / "out"
    paths = ["--model_path", f"{tiny}/backbone", "--train_data_path", tokenized, "--output_dir", str(out),
             "--tb_dir", str(tmp_path / "tb"), "--cache_dir", str(tmp_path / "cache")]
    proc = run_cli("run.py", "--config", OWN_DATA, *paths, "--train_steps", "4", "--max_seq_length", "64",
                   "--gradient_checkpointing", "false", "--eval_queries", "0", env={"OMP_NUM_THREADS": "1"},
                   prefix=ddp_launch(2), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 steps, 2 process(es)" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert "warning: warmup_steps 20 >= the run's 4 steps" in proc.stderr, warnings
    assert "warning: checkpointing_steps 50 > the run's 4 steps" in proc.stderr, warnings
    assert not any("processes on this node" in line for line in warnings), warnings
    run_dir = out / "own_data"
    assert (run_dir / "step_4").is_dir(), sorted(os.listdir(run_dir))
    recorded = json.loads((run_dir / "args.json").read_text())
    assert recorded["model_path"] == f"{tiny}/backbone" and recorded["train_data_path"] == tokenized
    assert (recorded["train_steps"], recorded["max_seq_length"], recorded["gradient_checkpointing"]) == (4, 64, False)
    assert (recorded["learning_rate"], recorded["num_hard_neg"]) == (1e-4, 3)  # the file's


def test_ray_train_without_ray_or_with_a_typo_is_one_line(tiny, tokenized, tmp_path, monkeypatch):
    """ray_train.py's first hour without Ray installed (its tests run in make test-extras), and a typo in
    one of its own options."""
    import ray_train

    config, _ = make_config(tmp_path, tiny, tokenized, "ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert_user_error(call_main(ray_train.main, ["--config", config]), "needs Ray Train",
                      "pip install -r requirements-ray.txt")
    assert_user_error(call_main(ray_train.main, ["--config", config, "--num_worker", "2"]),
                      "did you mean 'num_workers'")
