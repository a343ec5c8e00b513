"""Every family the project meets, built by demo.build_family as tiny random-init checkpoints, and the
training code on each.

The builds: every folder must load with AutoTokenizer and AutoModel as a real one does: the family's
model_type and architectures, its special tokens and where its template puts them, the config's token
ids equal to the tokenizer's, no missing weights (but RoBERTa's pooler, which its checkpoints lack),
finite hidden states for a padded batch longer than the sliding windows; the family's notable settings
(sliding windows, softcapping, layer patterns, fused or biased projections, tied embeddings, Gemma's
wide heads, position offsets) are what the config and the weight file say; a build gives the same
files every time.

The training code, through its real entry points (model.load_backbone, model.Embedder, lora, data,
tokenize_data_qwen.py, run.py, evaluate.py, sentence-transformers on a saved model): packed, padded and
grouped batches and each sequence alone give the same embeddings, losses and gradients for every
packable family, with LoRA too; each family's tokenization rule end to end; the sentence-transformers
export; the refusals, one line each; DeBERTa-v2's padded fallback; an untested family's packing check."""
import filecmp
import importlib.util
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from tokenizers import Tokenizer
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoTokenizer

import data
import demo
import evaluate
import lora
import model
import run
import tokenize_data_qwen
from config import LORA_DEFAULTS, Config
from conftest import assert_user_error, call_main, make_config
from errors import UserError
from loss import f2llm_losses

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "bert": "BertForPreTraining",
    "roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaModel", "distilbert": "DistilBertForMaskedLM",
    "electra": "ElectraForPreTraining", "deberta-v2": "DebertaV2ForMaskedLM", "modernbert": "ModernBertForMaskedLM",
    "t5": "T5ForConditionalGeneration", "clip": "CLIPModel",
}
BERT_ROLES = dict(bos_token=None, eos_token=None, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                  unk_token="[UNK]", mask_token="[MASK]")
GEMMA_ROLES = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
ROBERTA_ROLES = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                     unk_token="<unk>", mask_token="<mask>")
# the special tokens of each family's tokenizer (None: it has none in that role) and its ids where the
# real vocabulary puts them first
ROLES = {
    "qwen3": dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "qwen2": dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None),
    "llama": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token=None, unk_token=None),
    "mistral": dict(bos_token="<s>", eos_token="</s>", pad_token=None, unk_token="<unk>"),
    "gemma": GEMMA_ROLES, "gemma2": GEMMA_ROLES, "gemma3_text": GEMMA_ROLES,
    "phi3": dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
    "bert": BERT_ROLES, "distilbert": BERT_ROLES, "electra": BERT_ROLES,
    "roberta": ROBERTA_ROLES, "xlm-roberta": ROBERTA_ROLES,
    "deberta-v2": dict(BERT_ROLES, bos_token="[CLS]", eos_token="[SEP]"),
    "modernbert": BERT_ROLES,
    "t5": dict(bos_token=None, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
    "clip": dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
}
AFTER = "after"  # an id after the trained vocabulary's (build_family's default vocab_size: 400)
GEMMA_IDS = dict(pad_token=0, eos_token=1, bos_token=2, unk_token=3)
ROBERTA_IDS = dict(bos_token=0, pad_token=1, eos_token=2, unk_token=3, mask_token=AFTER)
IDS = {
    "qwen2": dict(pad_token=AFTER, eos_token=AFTER),
    "mistral": dict(unk_token=0, bos_token=1, eos_token=2),
    "gemma": GEMMA_IDS, "gemma2": GEMMA_IDS, "gemma3_text": GEMMA_IDS,
    "phi3": dict(unk_token=0, bos_token=1, eos_token=AFTER, pad_token=AFTER),
    "llama": dict(bos_token=AFTER, eos_token=AFTER),
    "bert": dict(pad_token=0), "distilbert": dict(pad_token=0), "electra": dict(pad_token=0),
    "roberta": ROBERTA_IDS, "xlm-roberta": ROBERTA_IDS,
    "deberta-v2": dict(pad_token=0, cls_token=1, sep_token=2, unk_token=3),
    "t5": dict(pad_token=0, eos_token=1, unk_token=2),
}
# what add_special_tokens=True puts around a text: (before, after)
AROUND = {
    "qwen3": ([], []), "qwen2": ([], []), "llama": (["<|begin_of_text|>"], []), "mistral": (["<s>"], []),
    "gemma": (["<bos>"], []), "gemma2": (["<bos>"], []), "gemma3_text": (["<bos>"], []), "phi3": ([], []),
    **dict.fromkeys(("bert", "distilbert", "electra", "deberta-v2", "modernbert"), (["[CLS]"], ["[SEP]"])),
    "roberta": (["<s>"], ["</s>"]), "xlm-roberta": (["<s>"], ["</s>"]),
    "t5": ([], ["</s>"]), "clip": (["<|startoftext|>"], ["<|endoftext|>"]),
}
# the weights AutoModel finds missing: RoBERTa's are RobertaForMaskedLM's, which has no pooler
MISSING = {"roberta": {"pooler.dense.weight", "pooler.dense.bias"}}
LONG = " ".join(["the sailor from north harbor loves chess and poetry"] * 4)  # past every sliding window


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(folder with the demo's raw F2LLM files in raw/, 2 negatives each, and eval/; their texts)."""
    root = tmp_path_factory.mktemp("family_corpus")
    return str(root), demo.write_sample_data(str(root / "raw"), str(root / "eval"), people_per_dataset=60,
                                             num_negatives=2)


@pytest.fixture(scope="module")
def corpus(sample):
    return sample[1]


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
    loaded, info = AutoModel.from_pretrained(folders[family], output_loading_info=True)
    assert set(info["missing_keys"]) == MISSING.get(family, set()), info
    assert all(key.split(".")[0] in model.UNUSED_MODULES for key in info["missing_keys"])
    assert not info.get("mismatched_keys"), info
    loaded.eval()
    encoded = tok(["hello world", LONG], padding=True, truncation=True, return_tensors="pt")  # CLIP: 77
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    assert batch["input_ids"].shape[1] > demo.SLIDING_WINDOW
    with torch.no_grad():
        states = hidden_states(loaded, family, batch)
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
    qwen2, gemma = config_of(folders["qwen2"]), config_of(folders["gemma"])
    assert qwen2["tie_word_embeddings"] and qwen2["rope_parameters"]["rope_theta"] == 1e6
    assert not qwen2["use_sliding_window"] and set(qwen2["layer_types"]) == {"full_attention"}
    tok = AutoTokenizer.from_pretrained(folders["qwen2"])
    # what transformers takes for model_type qwen2, with Qwen's own pipeline: the file's splits the same way
    assert type(tok).__name__ == "Qwen2Tokenizer"
    text = "Héllo, World! 12345 it's\n\n  日本語 ✓"
    assert tok(text).input_ids == Tokenizer.from_file(os.path.join(folders["qwen2"], "tokenizer.json")).encode(text).ids
    # after the vocabulary in Qwen's order: <|endoftext|>, <|im_start|>, <|im_end|>
    assert (tok.pad_token_id, tok.eos_token_id) == (len(tok) - 3, len(tok) - 1) == (qwen2["pad_token_id"],
                                                                                    qwen2["eos_token_id"])
    # Gemma 7B's heads are wider than hidden / heads: the attention projects to more than the hidden size
    assert gemma["head_dim"] == 2 * gemma["hidden_size"] // gemma["num_attention_heads"] == 16
    assert gemma["hidden_activation"] == "gelu_pytorch_tanh" and gemma["tie_word_embeddings"]
    assert "sliding_window" not in gemma and "attn_logit_softcapping" not in gemma


# in the weight file: (keys there, key endings not there)
SAVED = {
    "phi3": ({"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"},
             ("q_proj.weight", "gate_proj.weight")),  # fused projections
    "qwen2": ({f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"}, ("o_proj.bias", "lm_head.weight")),
    "roberta": ({"lm_head.dense.weight", "roberta.embeddings.word_embeddings.weight"}, ("pooler.dense.weight",)),
}


@pytest.mark.parametrize("family", list(SAVED))
def test_weight_file_holds_the_family_layers(folders, family):
    with safe_open(os.path.join(folders[family], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    there, not_there = SAVED[family]
    assert there <= keys
    assert not any(k.endswith(not_there) for k in keys)


def test_encoders_settings(folders):
    for family in ("roberta", "xlm-roberta"):
        tok = AutoTokenizer.from_pretrained(folders[family])
        config = config_of(folders[family])
        # RoBERTa's positions start at padding_idx + 1: a text of model_max_length tokens must still fit
        assert config["max_position_embeddings"] == tok.model_max_length + config["pad_token_id"] + 1 == 514
        assert (config["type_vocab_size"], config["layer_norm_eps"]) == (1, 1e-5)
        assert model.position_limit(folders[family], model.backbone_family(folders[family])) == 512
    assert type(AutoTokenizer.from_pretrained(folders["roberta"])).__name__ == "RobertaTokenizer"
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


# one per tokenizer kind (bpe, wordpiece, unigram), and the families built last
@pytest.mark.parametrize("family", ["llama", "bert", "xlm-roberta", "qwen2", "gemma", "roberta"])
def test_a_build_gives_the_same_files(folders, corpus, tmp_path, family):
    demo.build_family(str(tmp_path), family, corpus)
    names = sorted(os.listdir(folders[family]))
    assert sorted(os.listdir(tmp_path)) == names
    match, mismatch, errors = filecmp.cmpfiles(folders[family], str(tmp_path), names, shallow=False)
    assert mismatch == errors == []


@pytest.mark.parametrize("family,head_dim", [("gemma3_text", 12), ("gemma", 24)])  # Gemma's: twice hidden / heads
def test_sizes_follow_the_arguments(corpus, tmp_path, family, head_dim):
    tok = demo.build_family(str(tmp_path), family, corpus, hidden_size=48, num_layers=4, vocab_size=300)
    config = config_of(str(tmp_path))
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (48, 4, head_dim)
    assert config["vocab_size"] == len(tok) <= 300
    if family == "gemma3_text":
        assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2


# ---- the training code on each family ------------------------------------------------------------

TRAINED = [family for family, kind in demo.FAMILIES.items() if kind != "refused"]
PACKABLE = [family for family in TRAINED if family not in model.UNPACKABLE]
POOLINGS = {"decoder": ("lasttoken", "mean"), "encoder": ("mean", "cls")}
M = 40  # tokens per sequence at most: past the sliding windows (16) and ModernBERT's local attention (8)
# A retrieval batch in collate's order: 2 queries, their positives, their 2 hard negatives each. LONG is
# cut to M tokens; the last sequence is cut to its end token alone (as max_seq_length 1 would).
BATCH_TEXTS = ["who is kamar velzor", LONG, "kamar velzor is a pilot from river town", "a",
               "the plot was dull and the acting weak " * 3, "film", "chess", "poetry"]
# float32 rounding: the layouts sum the same products in other orders. Largest differences seen: 2.9e-6 in
# embeddings of norm 5.7 (LoRA; 1.2e-6 without), 4.5e-6 relative in losses, 2.7e-5 relative in gradients
# (LoRA; 3.9e-6 without). Under cls pooling the encoders' gradients cancel (each embedding is a LayerNorm
# output, the loss's gradient at it orthogonal to it): a rounding of 6e-8 in one embedding moves them by
# 3.8e-3 relative. In float64 every difference falls below 1e-12 (but Gemma's, whose norms round to float32).
ATOL, LOSS_RTOL = 5e-6, 1e-5
GRAD_RTOL = {"lasttoken": 1e-4, "mean": 1e-4, "cls": 1e-2}


@pytest.fixture(scope="module")
def still(folders, tmp_path_factory):
    """{family: folder}: each trained family's build with every dropout probability of its config 0, so
    that two training-mode passes over the same sequences give the same numbers."""
    root = tmp_path_factory.mktemp("still")
    out = {}
    for family in TRAINED:
        out[family] = shutil.copytree(folders[family], str(root / family))
        values = config_of(out[family])
        values.update({key: 0.0 for key, value in values.items()
                       if isinstance(value, float) and ("dropout" in key or "pdrop" in key)})
        with open(os.path.join(out[family], "config.json"), "w") as f:
            json.dump(values, f)
    return out


def kind_of(family):
    return demo.FAMILIES[family]


def family_tokenizer(folder):
    family = model.backbone_family(folder)
    return model.load_tokenizer(folder, special_tokens=family.special_tokens), family.special_tokens


def training_batch(folder):
    """(BATCH_TEXTS tokenized by the family's rule as a collate batch, the tokenizer's pad id)."""
    tokenizer, special_tokens = family_tokenizer(folder)
    sequences = data.tokenize(tokenizer, BATCH_TEXTS, M, special_tokens)
    sequences[-1] = sequences[-1][-1:]
    input_ids, lengths = model.flatten(sequences)
    assert max(lengths) == M and min(lengths) == 1
    return dict(input_ids=input_ids, lengths=lengths, num_queries=2, num_neg=2), tokenizer.pad_token_id


def train_step(embedder, batch):
    """One training step's embeddings, f2llm losses and gradients of the trainable parameters."""
    embedder.train()
    embedder.zero_grad()
    embeddings = embedder(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])
    losses = f2llm_losses(embeddings, batch["num_queries"], batch["num_neg"], "retrieval")
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in embedder.named_parameters() if p.requires_grad}
    return embeddings.detach(), {key: loss.item() for key, loss in losses.items()}, grads


@torch.no_grad()
def one_at_a_time(embedder, batch):
    """Each sequence of the batch embedded alone: no padding, no packing, so any attention is right."""
    return torch.cat([embedder(ids, n[None]) for ids, n in zip(batch["input_ids"].split(batch["lengths"].tolist()),
                                                               batch["lengths"])])


def assert_same_step(got, expected, alone, grad_rtol):
    """Embeddings within ATOL of each sequence alone and of the expected step's; the same losses; each
    gradient within grad_rtol of the expected one's largest entry. Returns the largest differences."""
    (emb, losses, grads), (ref_emb, ref_losses, ref_grads) = got, expected
    torch.testing.assert_close(emb, alone, rtol=0, atol=ATOL)
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=ATOL)
    assert losses.keys() == ref_losses.keys() == {"hard", "inbatch"}
    for key, value in ref_losses.items():
        assert losses[key] == pytest.approx(value, rel=LOSS_RTOL), key
    assert grads.keys() == ref_grads.keys() and grads
    # A gradient zero in exact arithmetic (a key bias: the softmax ignores what adds to every logit alike)
    # is rounding noise, measured against the largest gradient instead.
    floor = 1e-5 * max(g.abs().max() for g in ref_grads.values())
    relative = {name: ((grads[name] - g).abs().max() / g.abs().max().clamp_min(floor)).item()
                for name, g in ref_grads.items()}
    assert max(relative.values()) < grad_rtol, max(relative.items(), key=lambda item: item[1])
    assert all(g.abs().max() > 0 for name, g in ref_grads.items() if name.endswith("weight"))  # none detached
    return dict(alone=(emb - alone).abs().max().item(), expected=(emb - ref_emb).abs().max().item(),
                loss=max(abs(losses[key] - value) / value for key, value in ref_losses.items()),
                grad=max(relative.values()))


def load_layouts(folder, checkpointing=False):
    """{layout: backbone}: loaded for packed batches and for padded ones (which the grouped layout shares)."""
    return {layout: model.load_backbone(folder, dtype="float32", gradient_checkpointing=checkpointing,
                                        packed=layout == "packed") for layout in ("packed", "padded")}


def compare_layouts(backbones, batch, pad, poolings, record_property):
    """For each pooling: the packed and grouped layouts' training steps against the padded one's and
    against each sequence alone."""
    for pooling in poolings:
        padded = model.Embedder(backbones["padded"], "padded", pad, pooling=pooling)
        expected, alone = train_step(padded, batch), one_at_a_time(padded, batch)
        assert torch.pdist(alone).min() > 1e-3  # distinct sequences, distinct embeddings: the equalities mean something
        for layout in ("packed", "grouped"):
            embedder = model.Embedder(backbones["packed" if layout == "packed" else "padded"], layout, pad,
                                      pooling=pooling)
            record_property(f"{layout}/{pooling}", assert_same_step(train_step(embedder, batch), expected, alone,
                                                                    GRAD_RTOL[pooling]))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", PACKABLE)
def test_packed_grouped_padded_and_alone_agree(still, family, checkpointing, record_property):
    batch, pad = training_batch(still[family])
    backbones = load_layouts(still[family], checkpointing)
    assert backbones["packed"].config._attn_implementation == ("eager_varlen" if family == "gemma2" else "sdpa_varlen")
    assert backbones["padded"].config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    assert all(backbone.is_gradient_checkpointing == checkpointing for backbone in backbones.values())
    compare_layouts(backbones, batch, pad, POOLINGS[kind_of(family)], record_property)


# ---- LoRA ------------------------------------------------------------------------------------------

ATTENTION_AND_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
BERT_LINEAR = {"query", "key", "value", "dense"}
# the last part of the names of the linear layers LoRA adapts by default
LORA_TARGETS = {
    **dict.fromkeys(("qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text"), ATTENTION_AND_MLP),
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), BERT_LINEAR), "electra": BERT_LINEAR | {"embeddings_project"},
    "distilbert": {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"},
    "deberta-v2": {"query_proj", "key_proj", "value_proj", "dense"}, "modernbert": {"Wqkv", "Wo", "Wi"},
}
LORA = {**LORA_DEFAULTS, "r": 4, "dropout": 0.0}  # no dropout: two passes give the same numbers


def with_lora(backbone):
    """The backbone with default-target adapters, A and B drawn from a fixed seed (B is zero at init,
    which would leave the adapters without effect and A without gradient)."""
    adapted = lora.add_lora(backbone, LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted((name, p) for name, p in adapted.named_parameters() if ".lora_" in name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return adapted


@pytest.mark.parametrize("family", TRAINED)
def test_lora_default_targets_are_the_family_projections(folders, family):
    backbone = model.load_backbone(folders[family], dtype="float32")
    names = lora.linear_layers(backbone)
    assert {name.rsplit(".", 1)[-1] for name in names} == LORA_TARGETS[family]
    assert not [name for name in names if "pooler" in name]
    adapted = lora.add_lora(backbone, LORA_DEFAULTS)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert {name.removeprefix("base_model.model.").split(".lora_")[0] for name in trainable} == set(names)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.parametrize("family", PACKABLE)
def test_lora_packed_equals_padded(still, family, record_property):
    batch, pad = training_batch(still[family])
    backbones = {layout: with_lora(backbone) for layout, backbone in load_layouts(still[family]).items()}
    compare_layouts(backbones, batch, pad, POOLINGS[kind_of(family)][:1], record_property)


# Each merged weight W + BA is rounded to float32 once, where the adapted model rounds W x and B A x apart.
# Largest differences seen (embeddings of norm 5.7): 1.8e-6 (Phi-3), 3.9e-6 (BERT), 5.8e-6 (RoBERTa); with
# the weights, the adapters and the merge in float64, 1.1e-14 at most.
MERGE_ATOL = 1e-5


# fused projections; a pooler left out; a pooler missing from the checkpoint
@pytest.mark.parametrize("family", ["phi3", "bert", "roberta"])
def test_lora_merged_weights_embed_like_the_adapted_model(still, family, tmp_path):
    batch, pad = training_batch(still[family])
    adapted = with_lora(model.load_backbone(still[family], dtype="float32"))
    tokenizer, _ = family_tokenizer(still[family])
    model.save_inference_model(adapted.get_base_model(), tokenizer, str(tmp_path), state_dict=lora.merged_state_dict(
        adapted))
    merged = model.load_backbone(str(tmp_path), dtype="float32")
    assert not any(".lora_" in name or "base_layer" in name for name in merged.state_dict())
    pooling = model.family_of(merged).pooling()
    want = one_at_a_time(model.Embedder(adapted, pad_token_id=pad, pooling=pooling), batch)
    got = one_at_a_time(model.Embedder(merged, pad_token_id=pad, pooling=pooling), batch)
    torch.testing.assert_close(got, want, rtol=0, atol=MERGE_ATOL)
    base = one_at_a_time(model.Embedder(model.load_backbone(still[family], dtype="float32"), pad_token_id=pad,
                                        pooling=pooling), batch)
    assert (got - base).abs().max() > 1e-2  # the adapters changed the embeddings


# ---- the tokenization rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", TRAINED)
def test_tokenize_follows_the_family_rule(folders, family):
    """Encoders: [CLS] text [SEP] (RoBERTa, XLM-R: <s> text </s>), the text cut so that the closing token stays;
    decoders: the text without bos (Llama's, Mistral's and Gemma's tokenizers add one), cut, eos."""
    folder = folders[family]
    special_tokens = kind_of(family) == "encoder"
    assert model.tokenizer_rule(folder) is special_tokens
    tokenizer = model.load_tokenizer(folder, special_tokens=special_tokens)
    texts = [LONG, "hello world", ""]
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = data.tokenize(tokenizer, texts, 12, special_tokens)
    end = model.end_token_id(tokenizer, special_tokens)
    if special_tokens:
        assert end == tokenizer.sep_token_id
        assert ids == [[tokenizer.cls_token_id] + text[:10] + [end] for text in plain]
    else:
        assert end == tokenizer.eos_token_id
        assert ids == [text[:11] + [end] for text in plain]
        assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in sum(ids, [])
    assert len(ids[0]) == 12 and len(plain[0]) > 12


RECORD_KEYS = {"version", "input", "max_seq_length", "tokenizer", "layout"}  # a decoder's, as before encoders


@pytest.fixture(scope="module")
def tokenized_kinds(folders, sample, tmp_path_factory):
    """{kind: folder}: the sample's raw files tokenized by tokenize_data_qwen.py (main, in this process)
    for bert (encoder) and llama (decoder)."""
    out = {}
    for kind, family in (("encoder", "bert"), ("decoder", "llama")):
        out[kind] = str(tmp_path_factory.mktemp(f"tokenized_{kind}"))
        proc = call_main(tokenize_data_qwen.main, ["--model_path", folders[family], "--input_dir",
                                                   os.path.join(sample[0], "raw"), "--output_dir", out[kind],
                                                   "--max_seq_length", "24", "--num_proc", "1"])
        assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("kind,family", [("encoder", "bert"), ("decoder", "llama")])
def test_tokenize_data_records_the_rule(folders, tokenized_kinds, kind, family):
    tokenizer = model.load_tokenizer(folders[family], special_tokens=kind == "encoder")
    files = sorted(os.listdir(tokenized_kinds[kind]))
    assert files
    for name in files:
        record = tokenize_data_qwen.read_record(os.path.join(tokenized_kinds[kind], name))
        if kind == "encoder":
            assert record.keys() == RECORD_KEYS | {"special_tokens"} and record["special_tokens"] is True
        else:
            assert record.keys() == RECORD_KEYS
    rows = pq.read_table(os.path.join(tokenized_kinds[kind], "msmarco.parquet")).column("query_input_ids").to_pylist()
    first = tokenizer.cls_token_id if kind == "encoder" else None
    end = model.end_token_id(tokenizer, kind == "encoder")
    assert all(row[-1] == end and (first is None or row[0] == first) and len(row) <= 24 for row in rows)
    assert kind == "encoder" or not any(tokenizer.bos_token_id in row for row in rows)


@pytest.fixture
def accelerate_state():
    """run.main in this process sets up accelerate: leave no state to other tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_config(tmp_path, name, model_path, data_path, **overrides):
    """A short training config (batch 8, 2 hard negatives, 24 tokens, 2 steps) of model_path on data_path."""
    path, _ = make_config(tmp_path, None, data_path, name, model_path=model_path, train_batch_size=8,
                          max_seq_length=24, train_steps=2, warmup_steps=1, **overrides)
    return path


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("family,other", [("bert", "decoder"), ("llama", "encoder")])
def test_data_of_the_other_kind_is_refused(folders, tokenized_kinds, tmp_path, monkeypatch, family, other):
    made = f"tokenized for a{'n' * (other == 'encoder')} {other}"
    config = train_config(tmp_path, "run", folders[family], tokenized_kinds[other])
    assert_user_error(call_main(run.main, ["--config", config]), made, "tokenize_data_qwen.py")
    monkeypatch.setattr(evaluate, "load_encoder", None)  # refused before the model loads
    assert_user_error(call_main(evaluate.main, [folders[family], tokenized_kinds[other]]), made)


# ---- the sentence-transformers export ----------------------------------------------------------------

EXPORT_M = 16  # max_seq_length of the saved models: LONG is cut
PROMPTS = {"query": "query: "}
EXPORT_TEXTS = ["who is kamar velzor", "", "Hello, World!", LONG, "héllo wörld ✓ 日本語", "a"]
EXPORTS = [(family, pooling) for family in TRAINED for pooling in POOLINGS[kind_of(family)]
           if pooling != "mean" or family in ("qwen3", "bert")]


def assert_same_vectors(ours, theirs):
    """Each pair of embeddings within 1e-4 (for unit vectors: cosine >= 0.99999999), or both zero: the demo
    Phi-3's eos is its pad token, whose embedding row random init leaves zero, so an empty text embeds as
    zeros. Returns the lowest cosine of a nonzero pair."""
    ours, theirs = torch.as_tensor(ours), torch.as_tensor(theirs)
    assert ((ours - theirs).norm(dim=1) <= 1e-4).all(), (ours - theirs).norm(dim=1)
    nonzero = theirs.norm(dim=1) > 0
    assert torch.allclose(theirs[nonzero].norm(dim=1), torch.ones(int(nonzero.sum())), atol=1e-5)
    return (ours[nonzero] * theirs[nonzero]).sum(dim=1).min().item()


@pytest.mark.parametrize("family,pooling", EXPORTS)
def test_sentence_transformers_encodes_like_the_encoder(folders, family, pooling, tmp_path, record_property):
    tokenizer, special_tokens = family_tokenizer(folders[family])
    path = str(tmp_path / "model")
    model.save_inference_model(model.load_backbone(folders[family]), tokenizer, path, max_seq_length=EXPORT_M,
                               prompts=PROMPTS, pooling=pooling)
    st, encoder = SentenceTransformer(path, device="cpu"), model.load_encoder(path, device="cpu")
    assert encoder.embedder.pooling == pooling and st.max_seq_length == encoder.max_seq_length == EXPORT_M
    features = st.tokenize(EXPORT_TEXTS)
    fed = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    assert fed == data.tokenize(tokenizer, EXPORT_TEXTS, EXPORT_M, special_tokens)
    assert max(map(len, fed)) == EXPORT_M
    ours = encoder.encode(EXPORT_TEXTS, convert_to_tensor=True)
    query = encoder.encode(EXPORT_TEXTS, prompt_name="query", convert_to_tensor=True)
    record_property("min_cosine", min(assert_same_vectors(ours, st.encode(EXPORT_TEXTS)),
                                      assert_same_vectors(query, st.encode(EXPORT_TEXTS, prompt_name="query"))))
    assert ((query - ours).norm(dim=1) > 1e-3).all()  # the prompt was really put in front


# ---- refusals -----------------------------------------------------------------------------------------

SUPPORTED = ("this project trains decoders (qwen3, qwen2, llama", "encoders (bert, roberta")


def assert_one_line(call, *fragments):
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def falcon(folders, tmp_path_factory):
    """A tiny Falcon (a decoder whose attention is its own, not transformers' interface) saved with
    AutoModel.from_config(...).save_pretrained, with the llama build's tokenizer."""
    folder = str(tmp_path_factory.mktemp("falcon"))
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    tokenizer.save_pretrained(folder)
    AutoModel.from_config(AutoConfig.for_model("falcon", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4)).save_pretrained(folder)
    return folder


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("family", ["t5", "clip", "falcon"])
def test_other_models_are_refused_naming_what_is_supported(folders, falcon, sample, tmp_path, family):
    folder = falcon if family == "falcon" else folders[family]
    why = {"t5": "an encoder-decoder", "clip": "several towers", "falcon": "attention interface"}[family]
    said = f"model_type '{family}'"
    assert_one_line(lambda: model.check_model_folder(folder), said, why, *SUPPORTED)
    assert_one_line(lambda: model.load_backbone(folder), said, why, *SUPPORTED)
    config = train_config(tmp_path, "run", folder, os.path.join(sample[0], "raw"))
    assert_user_error(call_main(run.main, ["--config", config]), said, why, *SUPPORTED)


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("family,asked", [("llama", "encoder"), ("bert", "decoder")])
def test_model_type_must_agree_with_the_folder(folders, sample, tmp_path, family, asked):
    found = kind_of(family)
    fragments = (f"model_type '{asked}'", f"holds a{'n' * (found == 'encoder')} {found} ({family})",
                 f'"model_type": "{found}" or "auto"')
    assert_one_line(lambda: model.backbone_family(folders[family], asked), *fragments)
    config = train_config(tmp_path, "run", folders[family], os.path.join(sample[0], "raw"), model_type=asked)
    assert_user_error(call_main(run.main, ["--config", config]), *fragments)


@pytest.mark.usefixtures("accelerate_state")
def test_cls_pooling_is_refused_for_a_decoder(folders, sample, tmp_path):
    config = train_config(tmp_path, "run", folders["qwen3"], os.path.join(sample[0], "raw"), pooling="cls")
    assert_user_error(call_main(run.main, ["--config", config]), "pooling 'cls'", "qwen3 is a decoder",
                      '"lasttoken"')


# ---- DeBERTa-v2: attention outside the interface, padded batches only --------------------------------

def warnings(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_deberta_takes_no_packed_batches(folders, monkeypatch):
    backbone = model.load_backbone(folders["deberta-v2"], packed=True)
    assert backbone.config._attn_implementation == "eager"  # its own attention, under the name transformers gives it
    with pytest.raises(ValueError, match="deberta-v2 cannot take packed batches: use layout padded"):
        model.Embedder(backbone, "packed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU with flash-attn: still its own
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    assert model.pick_attn_implementation("auto", packed=False) == "flash_attention_2"
    assert model.pick_attn_implementation("auto", packed=True, causal=False, interface=False) == "eager"


@pytest.mark.usefixtures("accelerate_state")
def test_deberta_trains_on_padded_batches_with_a_warning(folders, sample, tmp_path):
    config = train_config(tmp_path, "deberta", folders["deberta-v2"], os.path.join(sample[0], "raw"))
    proc = call_main(run.main, ["--config", config])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert warnings(proc.stderr) == ["warning: deberta-v2's attention does not go through transformers' attention "
                                     "interface, so packed sequences cannot be kept apart: training on padded batches"]
    final = os.path.join(tmp_path, "deberta", "out", "run", "step_2")
    assert f"final checkpoint: {final}" in proc.stdout
    trained, initial = AutoModel.from_pretrained(final).state_dict(), AutoModel.from_pretrained(
        folders["deberta-v2"]).state_dict()
    assert max((trained[key] - initial[key]).abs().max().item() for key in initial) > 1e-4


# ---- a family without tests here ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def untested(folders, tmp_path_factory):
    """{kind: folder}: GPT-2 (a decoder) and CamemBERT (an encoder with RoBERTa's position offset), neither
    in model's tables, random-init by AutoModel.from_config and saved, with the tokenizer of a built family
    of the same kind (llama's, xlm-roberta's)."""
    out = {}
    for kind, model_type, source, sizes in (
            ("decoder", "gpt2", "llama", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
            ("encoder", "camembert", "xlm-roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, max_position_embeddings=130,
                                                         pad_token_id=1))):
        out[kind] = str(tmp_path_factory.mktemp(model_type))
        tokenizer = AutoTokenizer.from_pretrained(folders[source])
        tokenizer.save_pretrained(out[kind])
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **sizes)).save_pretrained(
            out[kind])
    return out


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_an_untested_family_packs_as_its_sequences_alone(untested, kind):
    family = model.backbone_family(untested[kind])
    assert (family.kind, family.tested, family.packable) == (kind, False, True)
    tokenizer = model.load_tokenizer(untested[kind], special_tokens=family.special_tokens)
    backbone = model.load_backbone(untested[kind], dtype="float32", packed=True)
    assert backbone.config._attn_implementation == "sdpa_varlen"
    embedder = model.Embedder(backbone, "packed", tokenizer.pad_token_id, pooling=family.pooling()).eval()
    assert embedder.packing_agreement() >= model.PACKING_AGREEMENT
    batch, _ = training_batch(untested[kind])
    with torch.no_grad():
        packed = embedder(batch["input_ids"], batch["lengths"])
    alone = one_at_a_time(model.Embedder(model.load_backbone(untested[kind], dtype="float32"), "padded",
                                         tokenizer.pad_token_id, pooling=family.pooling()), batch)
    torch.testing.assert_close(packed, alone, rtol=0, atol=ATOL)


@pytest.fixture
def accelerator(accelerate_state):
    return Accelerator(cpu=True)


def test_an_untested_family_that_packs_wrong_trains_padded(untested, accelerator, monkeypatch, capsys):
    """run.build_model checks an untested family's packing when it loads; below PACKING_AGREEMENT, padded."""
    cfg = Config(model_path=untested["decoder"], train_data_path="unused")
    tokenizer = model.load_tokenizer(untested["decoder"])
    assert run.build_model(cfg, tokenizer, accelerator).layout == "packed"
    assert warnings(capsys.readouterr().err) == []
    monkeypatch.setattr(model.Embedder, "packing_agreement", lambda self: 0.5)
    embedder = run.build_model(cfg, tokenizer, accelerator)
    assert embedder.layout == "padded" and embedder.backbone.config._attn_implementation == "sdpa"
    assert warnings(capsys.readouterr().err) == ["warning: gpt2: packed batches embed unlike single sequences (cosine "
                                                 "0.5000), so its attention does not keep them apart: training on "
                                                 "padded batches"]
