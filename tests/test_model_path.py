"""model_path checks: a path that is not a complete folder of a supported backbone stops training
with one line before any step, where transformers would take it for a hub id or fill the missing
weights at random; the backbones this project builds, trains and merges still load."""
import os
import shutil

import pytest
import torch
from conftest import assert_user_error, call_main, make_config, run_cli
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, T5Config, T5Model

import demo
import lora
import model
import run
from config import LORA_DEFAULTS
from errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = ("model.safetensors", "config.json", "generation_config.json")


def tokenizer_copy(tiny, path):
    """A folder holding only the tiny backbone's tokenizer files."""
    os.makedirs(path)
    backbone = f"{tiny}/backbone"
    for name in os.listdir(backbone):
        if name not in WEIGHTS:
            shutil.copy(os.path.join(backbone, name), path)
    return str(path)


@pytest.fixture(scope="module")
def bad(tiny, tmp_path_factory):
    """{case: model_path} of folders (and a file) that must not train."""
    root = tmp_path_factory.mktemp("bad_model_paths")
    t5 = tokenizer_copy(tiny, root / "t5")
    T5Model(T5Config(vocab_size=400, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(t5)
    no_weights = tokenizer_copy(tiny, root / "no_weights")
    shutil.copy(f"{tiny}/backbone/config.json", no_weights)
    partial = tokenizer_copy(tiny, root / "partial")
    shutil.copy(f"{tiny}/backbone/config.json", partial)
    state = load_file(f"{tiny}/backbone/model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, f"{partial}/model.safetensors",
              metadata={"format": "pt"})
    nan = tokenizer_copy(tiny, root / "nan")
    shutil.copy(f"{tiny}/backbone/config.json", nan)
    state["embed_tokens.weight" if "embed_tokens.weight" in state else next(k for k in state if "embed" in k)][7] = \
        float("nan")
    save_file(state, f"{nan}/model.safetensors", metadata={"format": "pt"})
    (root / "a_file").write_text("not a model")
    return {"missing": str(root / "nope"), "file": str(root / "a_file"), "t5": t5, "no_weights": no_weights,
            "partial": partial, "nan": nan}


def assert_no_training(values):
    """Nothing written but the run folder's lock: no args.json, no checkpoint, no TensorBoard log."""
    run_dir = os.path.join(values["output_dir"], values["experiment_id"])
    assert not os.path.isdir(run_dir) or all(name.startswith(".") for name in os.listdir(run_dir))
    assert not os.path.exists(values["tb_dir"])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")  # one split cache for every run


CASES = {
    "missing": ["not found", "local folder"],
    "file": ["is a file, not a folder"],
    "t5": ["model_type 't5'", "an encoder-decoder", "qwen3", "llama", "bert", "modernbert"],
    "no_weights": ["holds no weights", "model.safetensors"],
    "partial": ["11 of 24 backbone weights are missing", "layers.1.", "random init"],
    "nan": ["holds non-finite weights", "1 tensor(s)", "embed_tokens.weight"],
}


@pytest.mark.parametrize("case", CASES)
def test_bad_model_path_stops_training_with_one_line(case, bad, root, tiny, tokenized):
    config, values = make_config(root, tiny, tokenized, case, model_path=bad[case])
    proc = call_main(run.main, ["--config", config])
    line = assert_user_error(proc, f"model_path {bad[case]}", *CASES[case])
    assert "Repo id" not in line
    assert_no_training(values)


def test_missing_model_path_through_the_cli(bad, root, tiny, tokenized):
    config, values = make_config(root, tiny, tokenized, "cli_missing", model_path=bad["missing"])
    proc = run_cli("run.py", "--config", config)
    assert_user_error(proc, f"model_path {bad['missing']} not found")
    assert "Repo id" not in proc.stderr
    assert_no_training(values)


def test_missing_teacher_is_named(bad, root, tiny, tokenized):
    config, values = make_config(root, tiny, tokenized, "teacher", teacher_model_path=bad["missing"])
    assert_user_error(call_main(run.main, ["--config", config]), bad["missing"], "not found")
    assert_no_training(values)


def test_load_encoder_names_the_checkpoint(bad):
    with pytest.raises(UserError, match="checkpoint .* not found"):
        model.load_encoder(bad["missing"], device="cpu")
    with pytest.raises(UserError, match="model_type 't5'"):
        model.load_encoder(bad["t5"], device="cpu")


# ---- what must still load ------------------------------------------------------------------------

def test_tiny_and_demo_backbones_load(tiny, tmp_path):
    assert model.load_backbone(f"{tiny}/backbone").config.model_type == "qwen3"
    demo.build_backbone(str(tmp_path), 400, hidden_size=16, num_layers=1)
    assert model.load_backbone(str(tmp_path), packed=True).config.hidden_size == 16


def test_sharded_and_bin_weights_load(tiny, tmp_path):
    source = model.load_backbone(f"{tiny}/backbone")
    source.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    bin_folder = tmp_path / "bin"
    os.makedirs(bin_folder)
    shutil.copy(f"{tiny}/backbone/config.json", bin_folder)
    torch.save(source.state_dict(), bin_folder / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        loaded = model.load_backbone(str(tmp_path / folder)).state_dict()
        for key, value in source.state_dict().items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_checkpoints_and_lora_merged_checkpoints_load(tiny, tmp_path):
    source = f"{tiny}/backbone"
    tokenizer, backbone = model.load_tokenizer(source), model.load_backbone(source)
    model.save_inference_model(backbone, tokenizer, str(tmp_path / "plain"))
    adapted = lora.add_lora(model.load_backbone(source), {**LORA_DEFAULTS, "r": 4})
    model.save_inference_model(adapted.get_base_model(), tokenizer, str(tmp_path / "lora"),
                               state_dict=lora.merged_state_dict(adapted))
    for name in ("plain", "lora"):
        assert model.load_encoder(str(tmp_path / name), device="cpu").encode(["a text"]).shape == (1, 32)


def test_qwen2_loads_and_embeds_alike_packed_and_padded(tiny, tmp_path):
    path = tokenizer_copy(tiny, tmp_path / "qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(path)
    texts = ["who is kalo", "a short one", "tell me about the baker of north harbor"]
    padded = model.load_encoder(path, device="cpu", dtype="float32").encode(texts, convert_to_tensor=True)
    packed = model.load_encoder(path, device="cpu", dtype="float32", layout="packed").encode(texts,
                                                                                            convert_to_tensor=True)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
