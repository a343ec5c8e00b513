"""Shared fixtures: tiny Qwen3 backbones, tokenizers and F2LLM-format data, all built offline."""
import contextlib
import io
import json
import os
import subprocess
import sys
import traceback

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import demo  # noqa: E402


def _build(root, base):
    texts = demo.write_sample_data(os.path.join(root, "raw"), os.path.join(root, "eval"),
                                   people_per_dataset=60, num_negatives=10)
    tokenizer = demo.build_tokenizer(os.path.join(root, "backbone"), texts, vocab_size=400, base=base)
    demo.build_backbone(os.path.join(root, "backbone"), len(tokenizer), hidden_size=32, num_layers=2)
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folder with backbone/ (post-trained style: eos <|im_end|>, pad <|endoftext|>), raw/ (msmarco and
    natural_questions: retrieval, banking77: clustering, imdb: classification; 10 negatives), eval/."""
    return _build(str(tmp_path_factory.mktemp("tiny")), base=False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Like `tiny`, but the tokenizer is Base style: eos == pad == <|endoftext|>."""
    return _build(str(tmp_path_factory.mktemp("tiny_base")), base=True)


@pytest.fixture(scope="session")
def tokenized(tiny, tmp_path_factory):
    """The `tiny` raw data tokenized by the real CLI (max_seq_length 64)."""
    out = str(tmp_path_factory.mktemp("tokenized"))
    run_cli("tokenize_data_qwen.py", "--model_path", f"{tiny}/backbone", "--input_dir", f"{tiny}/raw",
            "--output_dir", out, "--max_seq_length", "64", "--num_proc", "1", check=True)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is as fast and does not stall when the other core is busy.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(script, *args, check=False, env=None, prefix=(), timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    cmd = [*prefix] if prefix else [sys.executable]
    cmd += [script, *args]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def call_main(main, argv):
    """main(argv) in this process, as the CLI would run it: a CompletedProcess with its exit status,
    stdout and stderr; an exception that escapes main() prints its traceback and gives status 1."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:  # noqa: BLE001 - reported like the interpreter would
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def write_config(path, **values):
    with open(path, "w") as f:
        json.dump(values, f)
    return str(path)


def assert_user_error(proc, *fragments):
    """One clear line on stderr starting with 'error:', a non-zero exit, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
