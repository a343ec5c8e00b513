"""The backbone (a Qwen3 or Qwen2 `AutoModel`, no LM head), last-token pooling, and the encoder.

The embedding of a sequence is the last hidden state at its last real token, the eos appended
to every text. It is not normalised here: the loss and the evaluation normalise.

Saved checkpoints are also sentence-transformers models (`save_inference_model`). Embed texts
from the command line:

    python model.py CHECKPOINT --input texts.txt --output embeddings.npy [--prompt_name query]
"""
import argparse
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


def pick_attn_implementation(requested="auto", packed=False):
    """flash_attention_2 where flash-attn is installed on a GPU. Otherwise, for packed batches,
    flex_attention on a GPU and our per-sequence `sdpa_varlen` on the CPU (transformers' sdpa would
    build a dense T x T block-diagonal mask); for padded batches PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if packed:
        return "flex_attention" if torch.cuda.is_available() else "sdpa_varlen"
    return "sdpa"


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          cu_seq_lens_q=None, **kwargs):
    """Causal SDPA on each sequence of a packed row separately (boundaries `cu_seq_lens_q`):
    exact, and O(sum of len^2) work where one masked T x T attention would be O(T^2)."""
    sizes = cu_seq_lens_q.diff().tolist() if cu_seq_lens_q is not None else [query.shape[2]]
    # split, not slicing: a slice's backward fills a zero tensor of the whole packed row per sequence
    parts = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))
    out = torch.cat([nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
        for q, k, v in parts], dim=2)
    return out.transpose(1, 2).contiguous(), None


# The oldest transformers whose packed batches are right: 4.53.0 added AttentionMaskInterface (the mask
# hook of sdpa_varlen) and 4.53.1 the packed-sequence masks that sdpa, eager and flex_attention build from
# the restarting position_ids. Before 4.53.1 those let each packed sequence attend to the ones before it
# in its row: wrong embeddings, no error (tested: 4.51.3, 4.52.4, 4.53.0).
PACKED_MIN_TRANSFORMERS = "4.53.1"


def check_library_support(attn_implementation="auto", packed=False):
    """Refuse, as one line, a layout / attention / library version combination known to give wrong
    embeddings (or to fail deep inside transformers): the packed layout, whatever the attention, and
    sdpa_varlen on a transformers older than PACKED_MIN_TRANSFORMERS. The padded and grouped layouts
    are right there. Reads transformers.__version__ at each call."""
    attn = pick_attn_implementation(attn_implementation, packed)
    installed = transformers.__version__
    if version.parse(installed) >= version.parse(PACKED_MIN_TRANSFORMERS):
        return
    upgrade = f'upgrade it (pip install -U "transformers>={PACKED_MIN_TRANSFORMERS}")'
    if packed:
        raise UserError(f'batch_layout "packed" needs transformers >= {PACKED_MIN_TRANSFORMERS} (installed: '
                        f"{installed}, where packed sequences attend to each other: wrong embeddings, no error): "
                        f'{upgrade} or set "batch_layout": "padded"')
    if attn == "sdpa_varlen":
        raise UserError(f"attn_implementation sdpa_varlen needs transformers >= {PACKED_MIN_TRANSFORMERS} "
                        f'(installed: {installed}): {upgrade} or set "attn_implementation": "sdpa"')


def _register_sdpa_varlen():
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register("sdpa_varlen", sdpa_varlen_attention)
    AttentionMaskInterface.register("sdpa_varlen", lambda *args, **kwargs: None)  # boundaries replace the mask


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


# model_type in a backbone's config.json -> the models it covers. The code here (last-token pooling,
# packed attention through `sdpa_varlen`, flex or flash-attn, LoRA target names) is written for these
# decoders; Qwen2 shares Qwen3's layout (tested: packed and padded batches give the per-text
# embeddings). Any other model_type would load with none of its weights matching.
SUPPORTED_MODEL_TYPES = {"qwen3": "Qwen3", "qwen2": "Qwen2, Qwen2.5"}
# Weight files from_pretrained reads from a local folder: one file, or the index of a sharded one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FOLDER_HINT = "point it at a local folder with the backbone's config.json, weights and tokenizer"


def supported_types():
    """The supported model types for a message: "qwen3 (Qwen3) or qwen2 (Qwen2, Qwen2.5)"."""
    return " or ".join(f"{key} ({models})" for key, models in SUPPORTED_MODEL_TYPES.items())


def require_folder(path, setting="model_path"):
    """Fail unless `path` is a local folder. transformers takes a path that does not exist for a hub
    repo id and answers with its repo-id rules, which says nothing about the typo. `setting` names
    the option the path came from (model_path, teacher_model_path, checkpoint)."""
    if not os.path.exists(path):
        raise UserError(f"{setting} {path} not found: {FOLDER_HINT}")
    if not os.path.isdir(path):
        raise UserError(f"{setting} {path} is a file, not a folder: {FOLDER_HINT}")


def check_model_type(path, setting="model_path"):
    """Fail unless the folder's config.json names a supported decoder: AutoModel would build any
    other architecture from it, and a mismatch of config and weights only shows as a load report."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise UserError(f"{setting} {path} has no config.json: {FOLDER_HINT}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{setting} {path}: cannot read config.json ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        said = f"says model_type {model_type!r}" if model_type else "names no model_type"
        raise UserError(f"{setting} {path}: its config.json {said}; this project trains {supported_types()} "
                        "decoders: point it at one of those")


def check_weight_files(path, setting="model_path"):
    """Fail unless the folder holds weights: without a weight file from_pretrained may build the
    model from its config alone, every weight random."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise UserError(f"{setting} {path} holds no weights (none of {', '.join(WEIGHT_FILES)}): "
                        "copy the backbone's weight files into it")


def check_model_folder(path, setting="model_path"):
    """The checks a backbone folder passes before its weights load; they read config.json only."""
    require_folder(path, setting)
    check_model_type(path, setting)
    check_weight_files(path, setting)


def check_no_missing_weights(model, loading_info, path, setting="model_path"):
    """Fail when loading left weights of the model out: transformers initialises them at random
    and only logs it. Unexpected weights (a CausalLM's lm_head) are dropped, which is fine."""
    missing = sorted(loading_info["missing_keys"])
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


def load_pretrained(path, setting="model_path", **kwargs):
    """`AutoModel.from_pretrained(path, **kwargs)` for a checked folder, refusing a load that left
    weights missing or holds non-finite ones. Load errors the checks do not foresee (a truncated file, a shard that the
    index names but the folder lacks) become one line too."""
    check_model_folder(path, setting)
    try:
        model, loading_info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model from {setting} {path}: {str(err).strip().splitlines()[0]}") from None
    check_no_missing_weights(model, loading_info, path, setting)
    check_finite_weights(model, path, setting)
    return model


def load_backbone(model_path, attn_implementation="auto", dtype="auto", gradient_checkpointing=False, packed=False,
                  setting="model_path"):
    """The backbone ready to train or embed, from a checked folder (see load_pretrained); `setting`
    names the option the path came from, for the error lines."""
    attn_implementation = pick_attn_implementation(attn_implementation, packed)
    check_library_support(attn_implementation, packed)  # before sdpa_varlen's registration and the weights
    if attn_implementation == "sdpa_varlen":
        _register_sdpa_varlen()
    backbone = load_pretrained(model_path, setting, attn_implementation=attn_implementation,
                               **dtype_argument(pick_dtype(dtype)))
    backbone.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works under DDP and with inputs that need no gradient.
        # transformers 5 renamed the method (the old name goes in 6); 4.x has only the old one.
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return backbone


def last_token_pool(hidden, lengths):
    """hidden: [n, L, d] right-padded; lengths: [n] real tokens per row. Returns [n, d]."""
    return hidden[torch.arange(len(hidden), device=hidden.device), lengths.to(hidden.device) - 1]


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
    """Backbone plus last-token pooling: (flat input_ids [T], lengths [n]) -> embeddings [n, d].

    layout "packed": all sequences in one row with per-sequence boundaries (varlen attention), no
    padding; "grouped": the first num_queries sequences and the rest padded as two groups;
    "padded": all right-padded to the longest (published). mask_pad_token_id, for the padded
    layouts: None builds the attention mask from lengths, an id the published
    `input_ids != pad_token_id` mask.
    """

    def __init__(self, backbone, layout="padded", pad_token_id=0, mask_pad_token_id=None):
        super().__init__()
        if layout not in BATCH_LAYOUTS:
            raise ValueError(f"layout must be one of {BATCH_LAYOUTS}, got {layout!r}")
        if layout == "packed":  # also a backbone that load_backbone loaded for padded batches
            check_library_support(packed=True)
        self.backbone = backbone
        self.layout = layout
        self.pad_token_id = pad_token_id
        self.mask_pad_token_id = mask_pad_token_id

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
        return last_token_pool(self.backbone(input_ids=padded, attention_mask=mask).last_hidden_state, lengths)

    def _packed(self, input_ids, lengths):
        # position_ids restart at 0 per sequence (RoPE, and packing detection in flex / flash-attn);
        # cu_seq_lens give the boundaries to varlen kernels. use_cache=False whatever the config says:
        # with a cache transformers skips the packing detection, and sdpa / eager / flex would attend
        # across the sequences.
        ends = lengths.cumsum(0)
        cu = nn.functional.pad(ends, (1, 0)).int()
        positions = torch.arange(len(input_ids), device=input_ids.device) - torch.repeat_interleave(ends - lengths,
                                                                                                     lengths)
        longest = int(lengths.max())
        hidden = self.backbone(input_ids=input_ids[None], position_ids=positions[None], cu_seq_lens_q=cu,
                               cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                               use_cache=False).last_hidden_state[0]
        return hidden[ends - 1]


def flatten(sequences):
    """Token lists -> (flat input_ids [T], lengths [n]), the batch format of the Embedder."""
    lengths = torch.tensor([len(s) for s in sequences])
    return torch.tensor([t for s in sequences for t in s], dtype=torch.long), lengths


class Encoder:
    """A model ready to embed: tokenizer + Embedder, with the checkpoint's max_seq_length and prompts.

    `encode` takes texts (tokenised as in training: no special tokens, cut, eos appended), optionally
    behind a named prompt; `encode_ids` takes token lists that already end in eos (tokenized data).
    Both return float32 [n, d] on the CPU, L2-normalised unless normalize=False.
    """

    def __init__(self, embedder, tokenizer, max_seq_length=1024, prompts=None):
        self.embedder, self.tokenizer = embedder, tokenizer
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})

    @property
    def device(self):
        return next(self.embedder.parameters()).device

    def encode(self, texts, prompt_name=None, batch_size=32, normalize=True):
        if prompt_name is not None and prompt_name not in self.prompts:
            raise UserError(f"no prompt named '{prompt_name}' (this model has: {', '.join(self.prompts) or 'none'})")
        prefix = self.prompts.get(prompt_name, "") if prompt_name else ""
        ids = tokenize(self.tokenizer, [prefix + t for t in texts], self.max_seq_length)
        return self.encode_ids(ids, batch_size, normalize)

    def _cut(self, seq):
        """As collate cuts: at most max_seq_length tokens, the last one eos."""
        seq, cut = list(seq), self.max_seq_length
        return seq if len(seq) <= cut else seq[: cut - 1] + [self.tokenizer.eos_token_id]

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
    (default: cuda if available). max_seq_length and prompts come from the checkpoint's
    sentence-transformers files when present (defaults 1024 and none)."""
    tokenizer = load_tokenizer(path, setting="checkpoint")
    backbone = load_backbone(path, dtype=dtype, packed=layout == "packed", setting="checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder = Embedder(backbone, layout, tokenizer.pad_token_id).to(device)
    saved_length, prompts = st_settings(path)
    return Encoder(embedder, tokenizer, max_seq_length or saved_length, prompts)


def st_settings(path):
    """(max_seq_length, prompts) recorded in a checkpoint's sentence-transformers files; 1024 and
    none for a folder without them."""
    def read(name):
        file = os.path.join(path, name)
        return json.load(open(file)) if os.path.isfile(file) else {}

    return (read("sentence_bert_config.json").get("max_seq_length", 1024),
            read("config_sentence_transformers.json").get("prompts") or {})


def load_tokenizer(model_path, setting="model_path"):
    """The backbone's tokenizer; it must have an eos token (appended to every text). A missing pad
    token falls back to eos, which is safe because the attention mask comes from lengths. `setting`
    names the option the path came from, for the error lines."""
    require_folder(model_path, setting)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {model_path}: {str(err).splitlines()[0]}")
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {model_path} has no eos token: set eos_token in its "
                        "tokenizer_config.json (Qwen3: <|im_end|>, Qwen3 Base: <|endoftext|>)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
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
                         state_dict=None):
    """Write backbone and tokenizer with `save_pretrained` (AutoModel loads the folder) plus the
    sentence-transformers files: Transformer, last-token Pooling, Normalize, max_seq_length and
    the config's prompts. `SentenceTransformer(path).encode` then gives `load_encoder(path).encode`'s
    vectors. The caller's tokenizer is not changed: only the saved copy appends eos. `state_dict`
    replaces the backbone's own weights (LoRA: the merged ones)."""
    backbone.save_pretrained(path, save_function=save_function, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    _append_eos_with_special_tokens(path, tokenizer.eos_token, tokenizer.eos_token_id)
    _write_json(path, "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    _write_json(path, "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(path, "1_Pooling/config.json", {
        "word_embedding_dimension": backbone.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True})
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
    embeddings = encoder.encode(texts, prompt_name=prompt_name, batch_size=batch_size).numpy()
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
    p.add_argument("--max_seq_length", type=int, help="tokens per text, eos included (default: the checkpoint's)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    rows, dims = embed_file(**vars(args)).shape
    print(f"{args.output}: {rows} x {dims} float32")


if __name__ == "__main__":
    main()
