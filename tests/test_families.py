"""demo.build_family: tiny random-init backbones of every family the project meets, each saved like a real
checkpoint of that family. Every folder must load with AutoTokenizer and AutoModel as a real one does:
the family's model_type and architectures, its special tokens and where its template puts them, the
config's token ids equal to the tokenizer's, no missing weights, finite hidden states for a padded batch
longer than the sliding windows; the family's notable settings (sliding windows, softcapping, layer
patterns, fused projections, position offsets) are what the config says; a build gives the same files
every time. The training code's handling of these families is tested elsewhere."""
import filecmp
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

import demo

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "bert": "BertForPreTraining", "xlm-roberta": "XLMRobertaModel", "distilbert": "DistilBertForMaskedLM",
    "electra": "ElectraForPreTraining", "deberta-v2": "DebertaV2ForMaskedLM", "modernbert": "ModernBertForMaskedLM",
    "t5": "T5ForConditionalGeneration", "clip": "CLIPModel",
}
BERT_ROLES = dict(bos_token=None, eos_token=None, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                  unk_token="[UNK]", mask_token="[MASK]")
GEMMA_ROLES = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
# the special tokens of each family's tokenizer (None: it has none in that role) and its ids where the
# real vocabulary puts them first
ROLES = {
    "qwen3": dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "llama": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token=None, unk_token=None),
    "mistral": dict(bos_token="<s>", eos_token="</s>", pad_token=None, unk_token="<unk>"),
    "gemma2": GEMMA_ROLES, "gemma3_text": GEMMA_ROLES,
    "phi3": dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
    "bert": BERT_ROLES, "distilbert": BERT_ROLES, "electra": BERT_ROLES,
    "xlm-roberta": dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", mask_token="<mask>"),
    "deberta-v2": dict(BERT_ROLES, bos_token="[CLS]", eos_token="[SEP]"),
    "modernbert": BERT_ROLES,
    "t5": dict(bos_token=None, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
    "clip": dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
}
AFTER = "after"  # an id after the trained vocabulary's (build_family's default vocab_size: 400)
IDS = {
    "mistral": dict(unk_token=0, bos_token=1, eos_token=2),
    "gemma2": dict(pad_token=0, eos_token=1, bos_token=2, unk_token=3),
    "gemma3_text": dict(pad_token=0, eos_token=1, bos_token=2, unk_token=3),
    "phi3": dict(unk_token=0, bos_token=1, eos_token=AFTER, pad_token=AFTER),
    "llama": dict(bos_token=AFTER, eos_token=AFTER),
    "bert": dict(pad_token=0), "distilbert": dict(pad_token=0), "electra": dict(pad_token=0),
    "xlm-roberta": dict(bos_token=0, pad_token=1, eos_token=2, unk_token=3),
    "deberta-v2": dict(pad_token=0, cls_token=1, sep_token=2, unk_token=3),
    "t5": dict(pad_token=0, eos_token=1, unk_token=2),
}
# what add_special_tokens=True puts around a text: (before, after)
AROUND = {
    "qwen3": ([], []), "llama": (["<|begin_of_text|>"], []), "mistral": (["<s>"], []), "gemma2": (["<bos>"], []),
    "gemma3_text": (["<bos>"], []), "phi3": ([], []),
    "bert": (["[CLS]"], ["[SEP]"]), "distilbert": (["[CLS]"], ["[SEP]"]), "electra": (["[CLS]"], ["[SEP]"]),
    "xlm-roberta": (["<s>"], ["</s>"]), "deberta-v2": (["[CLS]"], ["[SEP]"]), "modernbert": (["[CLS]"], ["[SEP]"]),
    "t5": ([], ["</s>"]), "clip": (["<|startoftext|>"], ["<|endoftext|>"]),
}
LONG = " ".join(["the sailor from north harbor loves chess and poetry"] * 4)  # past every sliding window


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_corpus")
    return demo.write_sample_data(str(root / "raw"), str(root / "eval"), people_per_dataset=60, num_negatives=2)


@pytest.fixture(scope="module")
def folders(corpus, tmp_path_factory):
    """{family: folder} with every family of demo.FAMILIES built once (defaults: hidden 32, 2 layers)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in demo.FAMILIES:
        out[family] = str(root / family)
        demo.build_family(out[family], family, corpus)
    return out


def config_of(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def test_families_and_kinds():
    assert set(demo.FAMILIES) == set(ARCHITECTURES)
    assert set(demo.FAMILIES.values()) == {"decoder", "encoder", "refused"}
    assert {f for f, kind in demo.FAMILIES.items() if kind == "refused"} == {"t5", "clip"}


def test_an_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        demo.build_family(str(tmp_path), "gpt2", ["hello"])


@pytest.mark.parametrize("family", list(demo.FAMILIES))
def test_config_is_the_family(folders, family):
    config = config_of(folders[family])
    assert config["model_type"] == family
    assert config["architectures"] == [ARCHITECTURES[family]]
    files = set(os.listdir(folders[family]))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


@pytest.mark.parametrize("family", list(demo.FAMILIES))
def test_tokenizer_has_the_family_special_tokens(folders, family):
    tok = AutoTokenizer.from_pretrained(folders[family])
    for role, token in ROLES[family].items():
        assert getattr(tok, role) == token, role
    for role, expected in IDS.get(family, {}).items():
        token_id = getattr(tok, f"{role}_id")
        assert token_id >= 400 if expected == AFTER else token_id == expected, role
    before, after = AROUND[family]
    plain = tok("hello world", add_special_tokens=False).input_ids
    full = tok("hello world").input_ids
    assert tok.convert_ids_to_tokens(full) == before + tok.convert_ids_to_tokens(plain) + after
    assert not set(plain) & set(tok.all_special_ids)
    assert tok.decode(plain).strip().lower() == "hello world"
    if family != "qwen3":  # build_tokenizer (unchanged) sets none
        assert tok.model_max_length <= 131072


@pytest.mark.parametrize("family", [f for f in demo.FAMILIES if f != "qwen3"])  # build_backbone names no ids
def test_config_token_ids_match_the_tokenizer(folders, family):
    tok = AutoTokenizer.from_pretrained(folders[family])
    config = config_of(folders[family])
    text = config.get("text_config", config)
    # ModernBERT's config names [CLS] and [SEP] its bos and eos; its tokenizer has neither
    roles = {"bos": "cls", "eos": "sep", "pad": "pad", "cls": "cls", "sep": "sep"} if family == "modernbert" else {
        "bos": "bos", "eos": "eos", "pad": "pad"}
    for key, role in roles.items():
        assert text.get(f"{key}_token_id") == getattr(tok, f"{role}_token_id"), key
    assert len(tok) <= text["vocab_size"] < len(tok) + 64
    if family == "modernbert":  # its embedding is padded to a multiple of 64 rows, as ModernBERT's
        assert text["vocab_size"] % 64 == 0
    else:
        assert text["vocab_size"] == len(tok)


def hidden_states(model, family, batch):
    if family == "t5":
        return model.encoder(**batch).last_hidden_state
    if family == "clip":
        image = model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32))
        image = getattr(image, "pooler_output", image)
        assert torch.isfinite(image).all()
        return model.text_model(**batch).last_hidden_state
    return model(**batch).last_hidden_state


@pytest.mark.parametrize("family", list(demo.FAMILIES))
def test_model_loads_whole_and_gives_finite_states(folders, family):
    tok = AutoTokenizer.from_pretrained(folders[family])
    if tok.pad_token is None:  # Llama 3, Mistral: the project pads with eos
        tok.pad_token = tok.eos_token
    model, info = AutoModel.from_pretrained(folders[family], output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info.get("mismatched_keys"), info
    model.eval()
    encoded = tok(["hello world", LONG], padding=True, truncation=True, return_tensors="pt")  # CLIP: 77
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    assert batch["input_ids"].shape[1] > demo.SLIDING_WINDOW
    with torch.no_grad():
        states = hidden_states(model, family, batch)
    assert states.shape[:2] == batch["input_ids"].shape
    assert states.shape[2] == 32
    assert torch.isfinite(states).all()


def test_decoders_settings(folders):
    mistral, gemma2, gemma3 = (config_of(folders[f]) for f in ("mistral", "gemma2", "gemma3_text"))
    assert mistral["sliding_window"] == demo.SLIDING_WINDOW
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (50.0, 30.0)
    for config in (gemma2, gemma3):
        assert config["sliding_window"] == demo.SLIDING_WINDOW
        assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
        assert config["query_pre_attn_scalar"] == config["head_dim"] == 8
    llama = config_of(folders["llama"])
    assert llama["pad_token_id"] is None and llama["bos_token_id"] != llama["eos_token_id"]


def test_phi3_has_fused_projections(folders):
    with safe_open(os.path.join(folders["phi3"], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in keys)


def test_encoders_settings(folders):
    tok = AutoTokenizer.from_pretrained(folders["xlm-roberta"])
    xlmr = config_of(folders["xlm-roberta"])
    # RoBERTa's positions start at padding_idx + 1: a text of model_max_length tokens must still fit
    assert xlmr["max_position_embeddings"] == tok.model_max_length + xlmr["pad_token_id"] + 1
    modernbert = config_of(folders["modernbert"])
    assert modernbert["local_attention"] == demo.MODERNBERT_LOCAL_ATTENTION
    assert set(modernbert["layer_types"]) == {"sliding_attention", "full_attention"}
    electra = config_of(folders["electra"])
    assert electra["embedding_size"] < electra["hidden_size"]
    deberta = config_of(folders["deberta-v2"])
    assert deberta["relative_attention"] and not deberta["position_biased_input"]
    bert = AutoTokenizer.from_pretrained(folders["bert"])
    pair = bert("Hello there", "General Kenobi")
    assert bert.convert_ids_to_tokens(pair.input_ids)[0] == "[CLS]"
    assert bert.convert_ids_to_tokens(pair.input_ids).count("[SEP]") == 2
    assert bert.decode(bert("Hello WORLD", add_special_tokens=False).input_ids) == "hello world"  # uncased


@pytest.mark.parametrize("family", ["llama", "bert", "xlm-roberta"])  # one per tokenizer kind
def test_a_build_gives_the_same_files(folders, corpus, tmp_path, family):
    demo.build_family(str(tmp_path), family, corpus)
    names = sorted(os.listdir(folders[family]))
    assert sorted(os.listdir(tmp_path)) == names
    match, mismatch, errors = filecmp.cmpfiles(folders[family], str(tmp_path), names, shallow=False)
    assert mismatch == errors == []


def test_sizes_follow_the_arguments(corpus, tmp_path):
    tok = demo.build_family(str(tmp_path), "gemma3_text", corpus, hidden_size=48, num_layers=4, vocab_size=300)
    config = config_of(str(tmp_path))
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (48, 4, 12)
    assert config["vocab_size"] == len(tok) <= 300
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
