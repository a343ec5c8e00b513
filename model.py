"""The backbone (any supported `AutoModel`, no LM head), its pooling, and the encoder.

Decoders (Qwen, Llama, Mistral, Gemma, Phi-3, and other decoders whose attention goes through
transformers' attention interface) embed a text as the last hidden state at its last token, the eos
appended to every text (F2LLM's recipe). Encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA,
DeBERTa-v2/v3, ModernBERT) take the tokenizer's own special tokens and a masked mean of the hidden
states (the published encoder branch), or the first token's (`cls`). The family comes from the
folder's config.json (`backbone_family`). Embeddings are not normalised here: the loss and the
evaluation normalise.

Saved checkpoints are also sentence-transformers models (`save_inference_model`). Embed texts
from the command line:

    python model.py CHECKPOINT --input texts.txt --output embeddings.npy [--prompt_name query]
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys

import numpy as np
import torch
import transformers
from packaging import version
from tokenizers import Tokenizer, processors
from torch import nn
from transformers import AutoModel, AutoTokenizer

from config import BATCH_LAYOUTS
from data import tokenize
from errors import UserError, exit_on_user_error


def pick_attn_implementation(requested="auto", packed=False, causal=True, softcap=False, interface=True):
    """flash_attention_2 where flash-attn is installed on a GPU. Otherwise, for packed batches,
    flex_attention on a GPU for decoders and our per-sequence `sdpa_varlen` elsewhere (transformers'
    sdpa would build a dense T x T block-diagonal mask); for padded batches PyTorch SDPA. A model with
    attention-logit soft-capping (Gemma 2), which SDPA cannot compute: eager, or packed `eager_varlen`
    (the same per-sequence attention, registered under a name transformers does not take for SDPA).
    A model whose attention is not on transformers' attention interface (`interface` False: DeBERTa-v2)
    has only its own, which transformers calls eager and loads under no other name."""
    if requested != "auto":
        return requested
    if not interface:
        return "eager"
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if packed:
        if softcap:  # transformers refuses SDPA to such models: ours, under a name without "sdpa"
            return "eager_varlen"
        return "flex_attention" if torch.cuda.is_available() and causal else "sdpa_varlen"
    return "eager" if softcap else "sdpa"


VARLEN = ("sdpa_varlen", "eager_varlen")  # the names sdpa_varlen_attention is registered under


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          cu_seq_lens_q=None, sliding_window=None, softcap=None, **kwargs):
    """SDPA on each sequence of a packed row separately (boundaries `cu_seq_lens_q`): exact, and
    O(sum of len^2) work where one masked T x T attention would be O(T^2). Causal or not as the
    module says (decoders, encoders); `sliding_window` W (Mistral, Gemma, ModernBERT's local layers)
    keeps the keys within W - 1 positions (before the query for a causal module, on either side for
    an encoder, as transformers' masks do); `softcap` (Gemma 2) caps the logits at +-softcap by tanh."""
    causal = getattr(module, "is_causal", True)
    sizes = cu_seq_lens_q.diff().tolist() if cu_seq_lens_q is not None else [query.shape[2]]
    # split, not slicing: a slice's backward fills a zero tensor of the whole packed row per sequence
    parts = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))
    out = torch.cat([_attend(q, k, v, causal, dropout, scaling, sliding_window, softcap) for q, k, v in parts], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _attend(q, k, v, causal, dropout, scaling, sliding_window, softcap):
    """One sequence's attention, [batch, heads, len, head_dim] each (k and v may have fewer heads)."""
    n = q.shape[2]
    allowed = None
    if sliding_window is not None and n > sliding_window:  # shorter: every key is within the window
        distance = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)[None, :]
        allowed = (distance < sliding_window) & (distance >= 0 if causal else distance > -sliding_window)
    if softcap is None:
        return nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal and allowed is None, scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1])
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    logits = softcap * torch.tanh(q @ k.transpose(-1, -2) * (scaling or q.shape[-1] ** -0.5) / softcap)
    if causal and allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = nn.functional.dropout(logits.float().softmax(-1).to(q.dtype), p=dropout)
    return weights @ v


# The oldest transformers whose packed batches are right: 4.53.0 added AttentionMaskInterface (the mask
# hook of sdpa_varlen) and 4.53.1 the packed-sequence masks that sdpa, eager and flex_attention build from
# the restarting position_ids. Before 4.53.1 those let each packed sequence attend to the ones before it
# in its row: wrong embeddings, no error (tested: 4.51.3, 4.52.4, 4.53.0).
PACKED_MIN_TRANSFORMERS = "4.53.1"


# Families whose packed batches need a newer transformers than PACKED_MIN_TRANSFORMERS: the first version
# whose models route their attention, and the packed boundaries, through the attention interface (before
# it the encoders' attention modules and ModernBERT's forward do not take them; tested down to these).
PACKED_MIN_BY_FAMILY = {"bert": "5.0.0", "roberta": "5.0.0", "xlm-roberta": "5.0.0", "distilbert": "5.0.0",
                        "electra": "5.0.0", "gemma3_text": "5.0.0", "modernbert": "5.1.0"}


def check_library_support(attn_implementation="auto", packed=False, model_type=None):
    """Refuse, as one line, a layout / attention / library version combination known to give wrong
    embeddings (or to fail deep inside transformers): the packed layout, whatever the attention, and
    sdpa_varlen on a transformers older than PACKED_MIN_TRANSFORMERS, or than the family's
    PACKED_MIN_BY_FAMILY. The padded and grouped layouts are right there. Reads
    transformers.__version__ at each call."""
    attn = pick_attn_implementation(attn_implementation, packed)
    installed = transformers.__version__
    needed = PACKED_MIN_BY_FAMILY.get(model_type, PACKED_MIN_TRANSFORMERS) if packed else PACKED_MIN_TRANSFORMERS
    if version.parse(installed) >= version.parse(needed):
        return
    upgrade = f'upgrade it (pip install -U "transformers>={needed}")'
    if packed:
        which = f"with {model_type} " if needed != PACKED_MIN_TRANSFORMERS else ""
        raise UserError(f'batch_layout "packed" {which}needs transformers >= {needed} (installed: {installed}, '
                        "where packed sequences attend to each other or fail: wrong embeddings or a crash): "
                        f'{upgrade} or set "batch_layout": "padded"')
    if attn in VARLEN:
        raise UserError(f"attn_implementation {attn} needs transformers >= {needed} "
                        f'(installed: {installed}): {upgrade} or set "attn_implementation": "sdpa"')


def _register_sdpa_varlen():
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in VARLEN:
        AttentionInterface.register(name, sdpa_varlen_attention)
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)  # boundaries replace the mask


def pick_dtype(requested="auto"):
    """bfloat16 on a GPU that supports it, float32 otherwise (bf16 matmuls are slow on most CPUs)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, requested)


def dtype_argument(dtype):
    """from_pretrained's keyword for the weights' dtype: transformers renamed torch_dtype to dtype in
    4.56; the old name still works up to 4.x."""
    key = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    return {key: dtype}


# The families whose training is tested here (packed == padded embeddings, a training run, the
# sentence-transformers export): model_type in config.json -> (kind, names). Another model_type is
# taken when its attention goes through transformers' attention interface (its kind read from the
# attention's is_causal), and its packed batches are checked against padded ones when it loads.
DECODERS = {"qwen3": "Qwen3", "qwen2": "Qwen2, Qwen2.5", "llama": "Llama 2, 3.x", "mistral": "Mistral",
            "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3"}
ENCODERS = {"bert": "BERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa", "distilbert": "DistilBERT",
            "electra": "ELECTRA", "deberta-v2": "DeBERTa-v2, v3", "modernbert": "ModernBERT"}
# Encoders whose attention is not transformers' attention interface: nothing bounds a packed row's
# sequences, so they train on padded batches (a warning says so when packed were asked for).
UNPACKABLE = ("deberta-v2",)
# The lowest cosine similarity of a family's packed and single-sequence embeddings for packed batches
# of it to train (checked at load for the families without tests here): rounding, not a wrong mask.
PACKING_AGREEMENT = 0.999
# Weight files from_pretrained reads from a local folder: one file, or the index of a sharded one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FOLDER_HINT = "point it at a local folder with the backbone's config.json, weights and tokenizer"
SUPPORTED = (f"decoders ({', '.join(DECODERS)}, and other decoders whose attention goes through transformers' "
             f"attention interface) and encoders ({', '.join(ENCODERS)})")


@dataclasses.dataclass(frozen=True)
class Family:
    """How a backbone trains, from its config.json. `kind` "decoder": causal attention, texts without
    special tokens and the eos appended, last-token pooling; "encoder": bidirectional attention, the
    tokenizer's own special tokens ([CLS] ... [SEP]), masked mean pooling. `packable`: a packed row's
    sequences can be kept apart (varlen attention); `tested`: one of DECODERS / ENCODERS."""

    model_type: str
    kind: str
    packable: bool = True
    tested: bool = True

    @property
    def special_tokens(self):
        """Whether texts take the tokenizer's special tokens (encoders) or none, the eos appended (decoders)."""
        return self.kind == "encoder"

    def pooling(self, requested="auto"):
        """The pooling a config's `pooling` asks for: "auto" is lasttoken for decoders, mean for encoders."""
        if requested == "auto":
            return "mean" if self.kind == "encoder" else "lasttoken"
        if requested == "cls" and self.kind == "decoder":
            raise UserError(f"pooling 'cls' takes an encoder's first token; {self.model_type} is a decoder, whose "
                            "first token sees nothing after it: use \"lasttoken\" (or \"mean\")")
        return requested


def require_folder(path, setting="model_path"):
    """Fail unless `path` is a local folder. transformers takes a path that does not exist for a hub
    repo id and answers with its repo-id rules, which says nothing about the typo. `setting` names
    the option the path came from (model_path, teacher_model_path, checkpoint)."""
    if not os.path.exists(path):
        raise UserError(f"{setting} {path} not found: {FOLDER_HINT}")
    if not os.path.isdir(path):
        raise UserError(f"{setting} {path} is a file, not a folder: {FOLDER_HINT}")


def read_model_type(path, setting="model_path"):
    """The model_type of the folder's config.json (one line if it has none or is unreadable)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise UserError(f"{setting} {path} has no config.json: {FOLDER_HINT}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{setting} {path}: cannot read config.json ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise UserError(f"{setting} {path}: its config.json names no model_type; this project trains {SUPPORTED}")
    return model_type


def backbone_family(path, model_type="auto", setting="model_path"):
    """The Family of a backbone folder, from its config.json; refused, as one line, when it is not a
    text decoder or encoder this code can train, or when `model_type` (a config's "decoder" /
    "encoder", the published encoder branch's key) says otherwise."""
    found = read_model_type(path, setting)
    if found in DECODERS:
        family = Family(found, "decoder")
    elif found in ENCODERS:
        family = Family(found, "encoder", packable=found not in UNPACKABLE)
    else:
        family = _untested_family(path, found, setting)
    if model_type not in ("auto", family.kind):
        raise UserError(f"model_type '{model_type}', but {setting} {path} holds a{'n' * (family.kind == 'encoder')} "
                        f"{family.kind} ({found}): set \"model_type\": \"{family.kind}\" or \"auto\"")
    return family


def _untested_family(path, model_type, setting):
    """A model_type outside DECODERS and ENCODERS: a Family if transformers builds a text model for it
    whose attention goes through the attention interface, else one line naming what is supported."""
    from transformers import AutoConfig

    said = f"{setting} {path}: its config.json says model_type '{model_type}'"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{said}, which this transformers {transformers.__version__} does not know "
                        f"({str(err).splitlines()[0]}); this project trains {SUPPORTED}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{said}, an encoder-decoder; this project trains {SUPPORTED}")
    if any(key.endswith("_config") and isinstance(value, dict) for key, value in config.to_dict().items()):
        raise UserError(f"{said}, a model of several towers (vision, audio or multimodal); this project trains "
                        f"{SUPPORTED}")
    with torch.device("meta"):  # the architecture without its weights: no memory, no time
        model = AutoModel.from_config(config)
    causal = {module.is_causal for module in model.modules() if isinstance(getattr(module, "is_causal", None), bool)}
    if not getattr(model, "_supports_attention_backend", False) or len(causal) != 1:
        raise UserError(f"{said}, whose attention does not go through transformers' attention interface, so "
                        f"packed sequences cannot be kept apart; this project trains {SUPPORTED}")
    return Family(model_type, "decoder" if causal.pop() else "encoder", tested=False)


def position_limit(path, family):
    """The most tokens a sequence can hold in the encoder at `path` whose positions are a learned table
    (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA: 512), None where nothing bounds them (rotary or
    relative positions: decoders, ModernBERT, DeBERTa v3). Read from the architecture, not the weights."""
    if family.kind != "encoder":
        return None
    from transformers import AutoConfig

    with torch.device("meta"):
        embeddings = getattr(AutoModel.from_config(AutoConfig.from_pretrained(path)), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa-style positions start at padding_idx + 1
    return table.num_embeddings - (0 if padding_idx is None else padding_idx + 1)


def check_positions(path, family, max_seq_length, setting="model_path"):
    """Refuse a max_seq_length that the backbone's position table cannot hold: the run would stop with an
    index error inside the embeddings at its first longer text, after hours perhaps."""
    limit = position_limit(path, family)
    if limit is not None and max_seq_length > limit:
        raise UserError(f"max_seq_length {max_seq_length} is above the {limit} positions of {setting} {path} "
                        f"({family.model_type}, learned position embeddings): set \"max_seq_length\": {limit} or less")


def check_weight_files(path, setting="model_path"):
    """Fail unless the folder holds weights: without a weight file from_pretrained may build the
    model from its config alone, every weight random."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise UserError(f"{setting} {path} holds no weights (none of {', '.join(WEIGHT_FILES)}): "
                        "copy the backbone's weight files into it")


def config_vocab_size(path):
    """The token ids the backbone at `path` embeds: its config.json's vocab_size (the embedding's rows,
    which may exceed the tokenizer's length); None where the folder does not say."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def check_model_folder(path, setting="model_path", model_type="auto"):
    """The checks a backbone folder passes before its weights load (they read config.json only);
    returns its Family."""
    require_folder(path, setting)
    family = backbone_family(path, model_type, setting)
    check_weight_files(path, setting)
    return family


# Modules of a base model that its hidden states do not pass through (BERT's pooler): frozen in
# training, and missing from a checkpoint saved as *ForMaskedLM without harm.
UNUSED_MODULES = ("pooler",)


def check_no_missing_weights(model, loading_info, path, setting="model_path"):
    """Fail when loading left weights of the model out: transformers initialises them at random
    and only logs it. Unexpected weights (a CausalLM's lm_head) are dropped, which is fine, and so
    are missing ones of UNUSED_MODULES."""
    missing = sorted(key for key in loading_info["missing_keys"] if key.split(".")[0] not in UNUSED_MODULES)
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{len(missing)} of {len(model.state_dict())} backbone weights are missing from {setting} "
                        f"{path} ({names}), so they would start from random init: point it at a complete checkpoint")


def check_finite_weights(model, path, setting="model_path"):
    """Fail when a loaded weight holds NaN or inf: training from it would only produce NaN losses
    (every step skipped) or spread them, and a checkpoint of it would be garbage that looks fine."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise UserError(f"{setting} {path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s) ({names}): "
                        "point it at an intact checkpoint")


def load_pretrained(path, setting="model_path", model_type="auto", **kwargs):
    """`AutoModel.from_pretrained(path, **kwargs)` for a checked folder, refusing a load that left
    weights missing or holds non-finite ones. Load errors the checks do not foresee (a truncated file, a
    shard that the index names but the folder lacks) become one line too."""
    check_model_folder(path, setting, model_type)
    try:
        model, loading_info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model from {setting} {path}: {str(err).strip().splitlines()[0]}") from None
    check_no_missing_weights(model, loading_info, path, setting)
    check_finite_weights(model, path, setting)
    return model


def load_backbone(model_path, attn_implementation="auto", dtype="auto", gradient_checkpointing=False, packed=False,
                  setting="model_path", model_type="auto"):
    """The backbone ready to train or embed, from a checked folder (see load_pretrained); `setting`
    names the option the path came from, for the error lines. `packed`: the attention picked for
    packed batches, where the family can take them (Family.packable)."""
    from transformers import AutoConfig

    family = check_model_folder(model_path, setting, model_type)
    softcap = getattr(AutoConfig.from_pretrained(model_path), "attn_logit_softcapping", None) is not None
    packed = packed and family.packable
    attn_implementation = pick_attn_implementation(attn_implementation, packed, family.kind == "decoder", softcap,
                                                   family.packable)
    check_library_support(attn_implementation, packed, family.model_type)  # before registration and the weights
    if attn_implementation in VARLEN:
        _register_sdpa_varlen()
    backbone = load_pretrained(model_path, setting, model_type, attn_implementation=attn_implementation,
                               **dtype_argument(pick_dtype(dtype)))
    backbone.config.use_cache = False
    # A padding_idx row of the input embeddings gets no gradient: where the config's pad id is the
    # appended eos (Phi-3), the pooled token's embedding would never train. Pad positions are masked
    # out anyway, so no row needs it.
    backbone.get_input_embeddings().padding_idx = None
    for name in UNUSED_MODULES:  # no gradient ever reaches them: DDP would wait for one
        if getattr(backbone, name, None) is not None:
            getattr(backbone, name).requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works under DDP and with inputs that need no gradient.
        # transformers 5 renamed the method (the old name goes in 6); 4.x has only the old one.
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return backbone


def family_of(backbone):
    """The Family of a loaded backbone (peft-wrapped or not), from its config."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    model_type = base.config.model_type
    if model_type in DECODERS or model_type in ENCODERS:
        return Family(model_type, "decoder" if model_type in DECODERS else "encoder", model_type not in UNPACKABLE)
    causal = any(getattr(module, "is_causal", False) is True for module in base.modules())
    return Family(model_type, "decoder" if causal else "encoder", tested=False)


def pool(hidden, lengths, pooling="lasttoken"):
    """hidden: [n, L, d] right-padded; lengths: [n] real tokens per row -> [n, d]: the last real
    token's state (lasttoken), the mean over the real tokens (mean), or the first token's (cls)."""
    lengths = lengths.to(hidden.device)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        real = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return (hidden * real[..., None].to(hidden.dtype)).sum(1) / lengths[:, None].to(hidden.dtype)
    return hidden[torch.arange(len(hidden), device=hidden.device), lengths - 1]


def pool_packed(hidden, lengths, pooling="lasttoken"):
    """pool() for one packed row: hidden [T, d] of sequences with `lengths` back to back -> [n, d]."""
    ends = lengths.cumsum(0)
    if pooling == "cls":
        return hidden[ends - lengths]
    if pooling == "mean":
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add(0, owner, hidden)
        return sums / lengths[:, None].to(hidden.dtype)
    return hidden[ends - 1]


def attention_mask(input_ids, lengths, pad_token_id=None):
    """1 on real tokens. With pad_token_id given, the published rule input_ids != pad_token_id,
    which also masks a real token equal to the pad id (the eos of Qwen3 Base tokenizers)."""
    if pad_token_id is not None:
        return (input_ids != pad_token_id).long()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions[None, :] < lengths.to(input_ids.device)[:, None]).long()


def pad_flat(input_ids, lengths, pad_token_id):
    """Flat tokens [T] of sequences with `lengths` -> right-padded [n, max(lengths)]."""
    positions = torch.arange(int(lengths.max()), device=input_ids.device)
    real = positions[None, :] < lengths[:, None]
    padded = input_ids.new_full(real.shape, pad_token_id)
    padded[real] = input_ids  # boolean indexing fills row by row, the order of the flat tokens
    return padded


class Embedder(nn.Module):
    """Backbone plus pooling: (flat input_ids [T], lengths [n]) -> embeddings [n, d].

    layout "packed": all sequences in one row with per-sequence boundaries (varlen attention), no
    padding; "grouped": the first num_queries sequences and the rest padded as two groups;
    "padded": all right-padded to the longest (published). mask_pad_token_id, for the padded
    layouts: None builds the attention mask from lengths, an id the published
    `input_ids != pad_token_id` mask. pooling: "lasttoken" (decoders), "mean" or "cls" (see pool).
    """

    def __init__(self, backbone, layout="padded", pad_token_id=0, mask_pad_token_id=None, pooling="lasttoken"):
        super().__init__()
        if layout not in BATCH_LAYOUTS:
            raise ValueError(f"layout must be one of {BATCH_LAYOUTS}, got {layout!r}")
        if layout == "packed":  # also a backbone that load_backbone loaded for padded batches
            check_library_support(packed=True, model_type=family_of(backbone).model_type)
            if not family_of(backbone).packable:
                raise ValueError(f"{family_of(backbone).model_type} cannot take packed batches: use layout padded")
        self.backbone = backbone
        self.layout = layout
        self.pad_token_id = pad_token_id
        self.mask_pad_token_id = mask_pad_token_id
        self.pooling = pooling
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        # RoBERTa-style embeddings number positions from padding_idx + 1: a packed sequence's must too
        padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
        self.position_offset = 0 if padding_idx is None else padding_idx + 1
        # BERT's default token types are zeros from a buffer as long as its position table, which a packed
        # row outgrows: zeros are passed instead. Only there: GPT-2 takes token_type_ids as more word ids,
        # whose embeddings it adds (zeros would add word 0's), and none by default.
        self.token_types = isinstance(getattr(getattr(base, "embeddings", None), "token_type_ids", None), torch.Tensor)

    @torch.no_grad()
    def packing_agreement(self, lengths=(3, 9, 5, 1), seed=0):
        """The lowest cosine similarity between the packed embeddings of a few random sequences and
        their embeddings one at a time (no padding, so any attention is right), in eval mode."""
        was_training = self.training
        self.eval()
        device = next(self.backbone.parameters()).device
        vocab = self.backbone.get_input_embeddings().num_embeddings
        lengths = torch.tensor(lengths, device=device)
        ids = torch.randint(vocab, (int(lengths.sum()),), generator=torch.Generator().manual_seed(seed)).to(device)
        # a pad id is a position gap to RoBERTa-style embeddings: the random texts hold none
        pads = {self.pad_token_id, self.position_offset - 1} - {-1}
        ids[torch.isin(ids, torch.tensor(sorted(pads), device=device))] = min(set(range(len(pads) + 1)) - pads)
        packed = self._packed(ids, lengths).float()
        alone = torch.cat([self._padded(seq, n[None]) for seq, n in zip(ids.split(lengths.tolist()), lengths)])
        self.train(was_training)
        return nn.functional.cosine_similarity(packed, alone.float(), dim=-1).min().item()

    def forward(self, input_ids, lengths, num_queries=None):
        lengths = lengths.to(input_ids.device)
        if self.layout == "packed":
            return self._packed(input_ids, lengths)
        if self.layout == "grouped" and num_queries and num_queries < len(lengths):
            split = int(lengths[:num_queries].sum())
            return torch.cat([self._padded(input_ids[:split], lengths[:num_queries]),
                              self._padded(input_ids[split:], lengths[num_queries:])])
        return self._padded(input_ids, lengths)

    def _padded(self, input_ids, lengths):
        padded = pad_flat(input_ids, lengths, self.pad_token_id)
        mask = attention_mask(padded, lengths, self.mask_pad_token_id)
        hidden = self.backbone(input_ids=padded, attention_mask=mask).last_hidden_state
        if self.mask_pad_token_id is not None and self.pooling == "mean":  # the published mask decides the mean
            return (hidden * mask[..., None].to(hidden.dtype)).sum(1) / mask.sum(1, keepdim=True).to(hidden.dtype)
        return pool(hidden, lengths, self.pooling)

    def _packed(self, input_ids, lengths):
        # position_ids restart per sequence (RoPE, learned positions, and packing detection in flex /
        # flash-attn); cu_seq_lens give the boundaries to varlen kernels. use_cache=False whatever the
        # config says: with a cache transformers skips the packing detection, and sdpa / eager / flex
        # would attend across the sequences.
        ends = lengths.cumsum(0)
        cu = nn.functional.pad(ends, (1, 0)).int()
        positions = torch.arange(len(input_ids), device=input_ids.device) - torch.repeat_interleave(ends - lengths,
                                                                                                     lengths)
        longest = int(lengths.max())
        extra = {"token_type_ids": torch.zeros_like(input_ids)[None]} if self.token_types else {}
        hidden = self.backbone(input_ids=input_ids[None], position_ids=(positions + self.position_offset)[None],
                               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                               use_cache=False, **extra).last_hidden_state[0]
        return pool_packed(hidden, lengths, self.pooling)


def flatten(sequences):
    """Token lists -> (flat input_ids [T], lengths [n]), the batch format of the Embedder."""
    lengths = torch.tensor([len(s) for s in sequences])
    return torch.tensor([t for s in sequences for t in s], dtype=torch.long), lengths


class Encoder:
    """A model ready to embed: tokenizer + Embedder, with the checkpoint's max_seq_length and prompts.

    `encode` takes texts (tokenised as in training: data.tokenize with the backbone's rule),
    optionally behind a named prompt, and returns a numpy float32 array [n, d] as
    sentence-transformers does (convert_to_tensor=True: a torch tensor); `encode_ids` takes token
    lists as training reads them (each ending in the end token: eos, or an encoder's closing [SEP] /
    </s>) and returns a torch float32 tensor [n, d] on the CPU. Both L2-normalise unless normalize=False.
    """

    def __init__(self, embedder, tokenizer, max_seq_length=1024, prompts=None, special_tokens=False):
        self.embedder, self.tokenizer = embedder, tokenizer
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})
        self.special_tokens = special_tokens
        self.end_id = end_token_id(tokenizer, special_tokens)

    @property
    def device(self):
        return next(self.embedder.parameters()).device

    def encode(self, texts, prompt_name=None, batch_size=32, normalize=True, convert_to_tensor=False):
        if prompt_name is not None and prompt_name not in self.prompts:
            raise UserError(f"no prompt named '{prompt_name}' (this model has: {', '.join(self.prompts) or 'none'})")
        prefix = self.prompts.get(prompt_name, "") if prompt_name else ""
        ids = tokenize(self.tokenizer, [prefix + t for t in texts], self.max_seq_length, self.special_tokens)
        out = self.encode_ids(ids, batch_size, normalize)
        return out if convert_to_tensor else out.numpy()

    def _cut(self, seq):
        """As collate cuts: at most max_seq_length tokens, the last one the end token."""
        seq, cut = list(seq), self.max_seq_length
        return seq if len(seq) <= cut else seq[: cut - 1] + [self.end_id]

    @torch.no_grad()
    def encode_ids(self, sequences, batch_size=32, normalize=True):
        was_training = self.embedder.training
        self.embedder.eval()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
        out = torch.empty(0)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, lengths = flatten([self._cut(sequences[i]) for i in idx])
            emb = self.embedder(input_ids.to(self.device), lengths.to(self.device)).float()
            if normalize:
                emb = nn.functional.normalize(emb, dim=-1)
            if not out.numel():
                out = torch.empty(len(sequences), emb.shape[1])
            out[torch.tensor(idx)] = emb.cpu()
        self.embedder.train(was_training)
        return out


def load_encoder(path, device=None, dtype="auto", max_seq_length=None, layout="padded"):
    """An Encoder for a checkpoint (or any backbone folder with its tokenizer), on `device`
    (default: cuda if available). max_seq_length, prompts and pooling come from the checkpoint's
    sentence-transformers files when present (defaults: 1024, or fewer where the positions end
    (position_limit), none and the family's pooling); a longer max_seq_length is refused."""
    family = check_model_folder(path, "checkpoint")
    saved_length, prompts = st_settings(path)
    limit = position_limit(path, family)
    if max_seq_length is None:
        max_seq_length = saved_length if limit is None else min(saved_length, limit)
    check_positions(path, family, max_seq_length, "checkpoint")
    tokenizer = load_tokenizer(path, setting="checkpoint", special_tokens=family.special_tokens)
    backbone = load_backbone(path, dtype=dtype, packed=layout == "packed", setting="checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    layout = layout if family.packable else "padded"
    embedder = Embedder(backbone, layout, tokenizer.pad_token_id, pooling=st_pooling(path) or family.pooling())
    return Encoder(embedder.to(device), tokenizer, max_seq_length, prompts, family.special_tokens)


def st_settings(path):
    """(max_seq_length, prompts) recorded in a checkpoint's sentence-transformers files; 1024 and
    none for a folder without them."""
    return (_read_json(path, "sentence_bert_config.json").get("max_seq_length", 1024),
            _read_json(path, "config_sentence_transformers.json").get("prompts") or {})


# sentence-transformers' pooling modes (1_Pooling/config.json) of ours
ST_POOLING = {"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens",
              "cls": "pooling_mode_cls_token"}


def st_pooling(path):
    """The pooling a checkpoint's sentence-transformers files name (one of ST_POOLING), or None."""
    modes = _read_json(path, os.path.join("1_Pooling", "config.json"))
    return next((ours for ours, key in ST_POOLING.items() if modes.get(key)), None)


def _read_json(path, name):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def tokenizer_rule(path):
    """Whether texts for the backbone at `path` take the tokenizer's special tokens (encoders) or
    none (decoders, and a folder that holds only a tokenizer, as tokenize_data_qwen.py may get)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return backbone_family(path).special_tokens


def end_token_id(tokenizer, special_tokens=False):
    """The token every sequence ends with, which a cut keeps: the eos for decoders; for encoders the
    closing special token the tokenizer puts after a text ([SEP], </s>), None if it puts none."""
    if not special_tokens:
        return tokenizer.eos_token_id
    last = tokenizer("a", add_special_tokens=True)["input_ids"][-1]
    return last if last in tokenizer.all_special_ids else None


# Files that hold a tokenizer's vocabulary: a fast tokenizer's tokenizer.json, or a slow one's files.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def check_tokenizer_files(path, setting="model_path"):
    """Fail unless the folder holds a vocabulary: without one, transformers 5 builds an empty tokenizer
    from config.json alone (every text becomes the eos token by itself), and an empty folder gives a
    message cut off at "from one of:"."""
    names = os.listdir(path)
    if not any(name in TOKENIZER_FILES or name.endswith((".model", ".tiktoken")) for name in names):
        raise UserError(f"cannot load a tokenizer from {setting} {path}: it holds no tokenizer files (none of "
                        f"{', '.join(TOKENIZER_FILES)}); copy the backbone's tokenizer files (tokenizer.json and "
                        "tokenizer_config.json) into it")


def load_tokenizer(model_path, setting="model_path", special_tokens=False):
    """The backbone's tokenizer, with what its texts need. Decoders (special_tokens False): an eos
    token, appended to every text. Encoders: a closing special token ([SEP], </s>). A missing pad
    token falls back to eos (or the closing token), which is safe because the attention mask comes
    from lengths. `setting` names the option the path came from, for the error lines."""
    require_folder(model_path, setting)
    check_tokenizer_files(model_path, setting)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as err:  # a broken tokenizer file raises OSError, ValueError, KeyError, tokenizers' Exception
        # transformers' messages run over several lines, the first cut at a colon
        raise UserError(f"cannot load a tokenizer from {setting} {model_path} ({type(err).__name__}: "
                        f"{' '.join(str(err).split())}); copy the backbone's tokenizer files into it again") from None
    end = end_token_id(tokenizer, special_tokens)
    if end is None and special_tokens:
        raise UserError(f"the tokenizer in {model_path} puts no special token after a text (as BERT's [SEP]): an "
                        "encoder's texts end in one, which a cut keeps; give its tokenizer.json a post-processor "
                        "that adds it")
    if end is None:
        raise UserError(f"the tokenizer in {model_path} has no eos token: set eos_token in its "
                        "tokenizer_config.json (Qwen3: <|im_end|>, Qwen3 Base: <|endoftext|>)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end)
    return tokenizer


# ---- the inference model: AutoModel and sentence-transformers ----------------------------------

def _write_json(path, name, value):
    os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
    with open(os.path.join(path, name), "w") as f:
        json.dump(value, f, indent=2)


# The last tokenizer.json _append_eos_with_special_tokens rewrote: (sha256 of it, eos, eos id) -> the
# rewritten file. A run saves the same tokenizer at every checkpoint, and parsing Qwen3's 151k
# merges again took 0.5 s each time.
_eos_appending = {}


def _append_eos_with_special_tokens(path, eos, eos_id):
    """Make the tokenizer saved in `path` append eos when called with special tokens (as
    sentence-transformers calls it, truncating the text to max_length - 1 tokens as data.tokenize
    does), the way Qwen3-Embedding ships its tokenizer. add_special_tokens=False is unchanged."""
    file = os.path.join(path, "tokenizer.json")
    with open(file, "rb") as f:
        plain = f.read()
    key = (hashlib.sha256(plain).digest(), eos, eos_id)
    if key not in _eos_appending:
        backend = Tokenizer.from_str(plain.decode("utf-8"))
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, eos_id)])
        _eos_appending.clear()
        _eos_appending[key] = backend.to_str(pretty=True).encode("utf-8")
    with open(file, "wb") as f:
        f.write(_eos_appending[key])


def save_inference_model(backbone, tokenizer, path, max_seq_length=1024, prompts=None, save_function=torch.save,
                         state_dict=None, pooling=None):
    """Write backbone and tokenizer with `save_pretrained` (AutoModel loads the folder) plus the
    sentence-transformers files: Transformer, Pooling (`pooling`; default the family's: lasttoken for
    decoders, mean for encoders), Normalize, max_seq_length and the config's prompts.
    `SentenceTransformer(path).encode` then gives `load_encoder(path).encode`'s vectors: a decoder's
    saved tokenizer appends the eos (the caller's is not changed), an encoder's adds its own special
    tokens as it always does. `state_dict` replaces the backbone's own weights (LoRA: the merged ones)."""
    family = family_of(backbone)
    pooling = pooling or family.pooling()
    backbone.save_pretrained(path, save_function=save_function, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    if not family.special_tokens:
        _append_eos_with_special_tokens(path, tokenizer.eos_token, tokenizer.eos_token_id)
    _write_json(path, "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    _write_json(path, "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    modes = ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"]
    _write_json(path, "1_Pooling/config.json", {"word_embedding_dimension": backbone.config.hidden_size,
                                                **{mode: mode == ST_POOLING[pooling] for mode in modes},
                                                "include_prompt": True})
    _write_json(path, "config_sentence_transformers.json", {
        "prompts": dict(prompts or {}), "default_prompt_name": None, "similarity_fn_name": "cosine"})


# ---- the encoder CLI ----------------------------------------------------------------------------

def read_texts(path):
    """The texts of `path` ("-": stdin): one per line, or the "text" field of each line of a .jsonl.
    Every line counts, an empty one too, so that row i of the output is line i of the input."""
    # lines end at "\n" only (not at the other breaks str.splitlines knows, such as U+2028)
    try:
        if path == "-":
            lines = [line.removesuffix("\n") for line in sys.stdin]
        else:
            with open(path, encoding="utf-8") as f:
                lines = [line.removesuffix("\n") for line in f]
    except FileNotFoundError:
        raise UserError(f"input file {path} not found: pass --input with one text per line (or a .jsonl)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            text = json.loads(line)["text"]
        except (ValueError, TypeError, KeyError):
            text = None
        if not isinstance(text, str):
            raise UserError(f'{path} line {number}: expected a JSON object with a string "text" field')
        texts.append(text)
    return texts


def embed_file(checkpoint, input="-", output="embeddings.npy", *, prompt_name=None, batch_size=32, device=None,
               max_seq_length=None):
    """Embed the texts of `input` (see read_texts) with a checkpoint and save them to `output` as a
    float32 .npy [n, d], L2-normalised; returns the embeddings. The keyword arguments are the command
    line's flags, with its defaults. Bad input is a UserError that says what to fix."""
    if not os.path.isdir(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found: pass a checkpoint folder, e.g. output/RUN/step_N")
    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2 (one token of text plus eos)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is available; use --device cpu")
    texts = read_texts(input)
    if not texts:
        raise UserError(f"{input} holds no texts")
    encoder = load_encoder(checkpoint, device=device, max_seq_length=max_seq_length)
    embeddings = encoder.encode(texts, prompt_name=prompt_name, batch_size=batch_size)
    try:
        with open(output, "wb") as f:  # np.save(name) would append .npy to any other name
            np.save(f, embeddings)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err.strerror}") from None
    return embeddings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Embed texts with a checkpoint: a float32 .npy [n, d], L2-normalised.")
    p.add_argument("checkpoint", help="a checkpoint folder (or any backbone with its tokenizer)")
    p.add_argument("--input", default="-", help='one text per line, or a .jsonl with a "text" field; - for stdin')
    p.add_argument("--output", default="embeddings.npy", help="where the .npy goes")
    p.add_argument("--prompt_name", help="put the checkpoint's prompt of this name (query, document) before each text")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--max_seq_length", type=int,
                   help="tokens per text, special tokens and eos included (default: the checkpoint's)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    rows, dims = embed_file(**vars(args)).shape
    print(f"{args.output}: {rows} x {dims} float32")


if __name__ == "__main__":
    main()
