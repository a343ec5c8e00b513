"""The backbone (a Qwen3 `AutoModel`, no LM head) and last-token pooling.

The embedding of a sequence is the last hidden state at its last real token, the eos appended
to every text. It is not normalised here: the loss and the evaluation normalise.
"""
import importlib.util

import torch
import transformers
from packaging import version
from torch import nn
from transformers import AutoModel, AutoTokenizer

from data import pad_batch, tokenize
from errors import UserError


def pick_attn_implementation(requested="auto"):
    """flash_attention_2 where flash-attn is installed and a GPU is present, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def pick_dtype(requested="auto"):
    """bfloat16 on a GPU that supports it, float32 otherwise (bf16 matmuls are slow on most CPUs)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, requested)


def load_backbone(model_path, attn_implementation="auto", dtype="auto", gradient_checkpointing=False):
    # transformers renamed torch_dtype to dtype in 4.56; the old name still works up to 4.x.
    dtype_key = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    backbone = AutoModel.from_pretrained(
        model_path, attn_implementation=pick_attn_implementation(attn_implementation), **{dtype_key: pick_dtype(dtype)}
    )
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


class Embedder(nn.Module):
    """Backbone plus last-token pooling: (input_ids, lengths) -> embeddings [n, d].

    mask_pad_token_id: None builds the attention mask from lengths; an id gives the published
    `input_ids != pad_token_id` mask.
    """

    def __init__(self, backbone, mask_pad_token_id=None):
        super().__init__()
        self.backbone = backbone
        self.mask_pad_token_id = mask_pad_token_id

    def forward(self, input_ids, lengths):
        mask = attention_mask(input_ids, lengths, self.mask_pad_token_id)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return last_token_pool(hidden, lengths)


@torch.no_grad()
def encode(embedder, tokenizer, texts, max_seq_length=1024, batch_size=32, normalize=True):
    """Embed texts in batches, tokenised as in training; returns a float32 tensor [n, d] on the CPU."""
    embedder.eval()
    device = next(embedder.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, lengths = pad_batch(tokenize(tokenizer, [texts[i] for i in idx], max_seq_length),
                                       tokenizer.pad_token_id)
        emb = embedder(input_ids.to(device), lengths.to(device)).float()
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        for i, e in zip(idx, emb.cpu()):
            out[i] = e
    return torch.stack(out)


def load_tokenizer(model_path):
    """The backbone's tokenizer; it must have an eos token (appended to every text). A missing pad
    token falls back to eos, which is safe because the attention mask comes from lengths."""
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
