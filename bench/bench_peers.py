"""Peer benchmark: this project's training vs sentence-transformers (ST) and FlagEmbedding, same model,
data and settings.

All sides start from the same random-init Qwen3 (demo.build_backbone: hidden 64, 2 layers, 4 heads,
Qwen3's 151,936 embedding rows: 9.72M embedding parameters and 0.07M in the layers, small enough
for minutes on a CPU) with Qwen3's real tokenizer (demo.build_qwen3_tokenizer), train on the same
rows with the same hyper-parameters for the same number of steps, and are evaluated by the same
metric code on the same held-out rows. Each training run is a subprocess with one thread
(OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false), so that its time and memory are its own; the
variant order interleaves the sides and is reversed for every second regime.

Shared settings: batch 16 queries; every row exactly k = 3 hard negatives (ours: num_hard_neg 3,
which samples 3 of 3, all of them in a random order; ST: columns anchor, positive, negative_1..3;
FlagEmbedding: train_group_size 4, its 3 of 3 negatives in a random order);
AdamW (betas 0.9 / 0.98, eps 1e-8, weight decay 0.01 on every parameter; fused, the default of
both: ST gets a fused torch.optim.AdamW over all parameters, as ours, where its Trainer's own
adamw_torch_fused would exempt the norm weights); lr 1e-3, linear warmup over 10% of the steps,
then cosine decay to 0 (ours: min_lr 0; ST: lr_scheduler_type cosine; the same formula, lr 0 at the
first step on both); gradient clipping 1.0; temperature 0.05 (ST: scale 20); float32;
max_seq_length 512 on both; no gradient checkpointing.
Ours trains on the train split run.py makes of the file (99%, seed 0, datasets' train_test_split,
which depends on the number of rows only); ST's dataset is that same split of the same file.

The embedding is the same: the last hidden state at an eos appended to each text (no other special
token), cosine similarity. The ST model is model.save_inference_model of the same backbone
(Transformer, last-token Pooling, Normalize; its saved tokenizer appends the eos and cuts the text
at max_seq_length - 1 as ours does). Before training the report checks it: the lowest cosine
between SentenceTransformer.encode and model.load_encoder(...).encode on the held-out texts, and
the untrained MRR@10 of each; and on one batch (the file's first 16 rows) with the same weights, ours'
joint loss and its gradient against MNRL's, plain and with ours' same-text rule (loss_agreement).

Variants (VARIANTS, a table of config overrides or ST options; a variant whose config keys this
checkout's config.py lacks is skipped with a note): ours-f2llm (the recipe: hard-negative loss +
in-batch loss), ours-joint (contrastive_loss joint: each query against every positive and hard
negative of the batch, as MNRL, a candidate with the positive's text not counted as a negative),
ours-joint-fnm0.1 (false_negative_margin 0.1), st-mnrl (MultipleNegativesRankingLoss), st-cmnrl
(CachedMultipleNegativesRankingLoss, mini_batch_size 32, ST's default: no smaller than the batch's
columns, so it only adds its no-grad pass), flag (FlagEmbedding, below). ST uses its default batch
sampler: random batches, like ours; its recommended NO_DUPLICATES would keep duplicate texts apart but
change what a batch holds. The ablation of ours-joint against MNRL (BENCHMARKS.md), each one change:
st-mnrl-mask (MNRL with ours-joint's same-text rule: same_text_masked_mnrl), st-mnrl-nodup (the
NO_DUPLICATES sampler), st-mnrl-trainer-adamw and flag-trainer-adamw (their Trainer's own AdamW,
which exempts norm weights and biases from weight decay), ours-joint-wd0 (no weight decay at all).

FlagEmbedding runs this file with --flag_worker: its decoder-only embedder fine-tuning
(FlagEmbedding.finetune.embedder.decoder_only.base) through its own DecoderOnlyEmbedderRunner, as
its command line does, on a jsonl file of {query, pos: [positive], neg: [3 negatives]} written from
the same split. Its settings: full fine-tuning (use_lora False; its default is LoRA), last_token
pooling, normalised embeddings, temperature 0.05, no query instruction, query and passage max length
512, one process (no cross-device negatives), the shared hyper-parameters through its
TrainingArguments, and a fused torch AdamW over all parameters put in as its Trainer's optimizer (as
ST's). Its loss is its in-batch loss: each query against every positive and hard negative of the
batch, MNRL's; its Trainer's sampler and seed are ST's, so with the same seed both draw the same
batches and train to the same model (the test checks it). Its tokenizer: AutoTokenizer with
add_eos_token=True, which for Qwen3's tokenizer under transformers 5 appends <|im_end|>, our eos
(the cut: 511 tokens and the eos, as ours), padding on the left with <|endoftext|>, whose
last_token pooling then takes the last position. Its checkpoints are evaluated by its inference
embedder (BaseLLMEmbedder, float32, no instruction), whose own tokenizer load appends no eos: the
training tokenizer is put in (flag_encoder); the untrained check reports both.

Ours runs the real command, `accelerate launch --config_file configs/accelerate_cpu.yaml run.py
--config CFG`, what users type, on the raw parquet folder: run.py tokenizes it into its cache_dir
first (tokenize_data_qwen.py's code, in its own process; each run anew). The launcher adds a few
seconds of start-up to e2e, nothing to training. ST runs this file with
--st_worker: a SentenceTransformerTrainer script as its docs write one; FlagEmbedding with
--flag_worker (above).

Measured, per variant:
- train s: the training loop, batches fetched and collated included, checkpoint saving excluded.
  Ours: sum over log intervals of steps / train/steps_per_s from its TensorBoard events (run.py's
  Throughput: from just before the loop to the last step; validation and saving excluded). ST:
  from the Trainer's on_train_begin to the last step's on_step_end, minus each checkpoint step's
  on_step_end to on_save (the saving); its batches are tokenized here, inside its collator.
  FlagEmbedding: the same callbacks on its Trainer (it tokenizes in its collator too).
- e2e s: raw parquet to trained model on disk. Ours: the launch's wall time (start-up,
  tokenization, split preparation, model load, training, checkpoint saves, validation of the
  held-out 1%). ST: from the worker's launch to
  trainer.train() returning (start-up, dataset building, model load, training, checkpoint saves);
  FlagEmbedding: the same, its jsonl file's writing included.
- real tok/s: tokens of the training texts (eos included, no padding) over train s. Ours: its
  packed batches' tokens (TensorBoard train/tokens_per_s x interval time); ST: the sum of the
  attention masks over the forward passes with gradient (a hook on its Transformer module;
  FlagEmbedding: on its backbone).
- pad: tokens computed per real token. Ours: 1.0 by construction (a packed batch is one row of
  exactly its real tokens; bench_padding.py measures it). ST: input_ids sizes over attention mask
  sums of every training forward (the anchors padded to their longest, the candidate columns merged
  and padded to their longest; CMNRL: per column and mini-batch, its no-grad pass included).
  FlagEmbedding: the same (the queries padded to their longest, the passages to theirs).
- RSS MiB: peak resident memory of the training process. Ours: ru_maxrss of the launch (the
  largest of the launcher and run.py), taken through a small intermediate process, since a child's
  ru_maxrss starts at its parent's peak; ST, FlagEmbedding: the worker's VmHWM when train() returns.
- rows: training rows seen. Ours: from the steps and the split size (batches of 16, each epoch's
  last one short); ST, FlagEmbedding: sequences embedded with gradient / (2 + k).
- MRR@10, nDCG@10: metrics.retrieval_metrics on the held-out queries against the held-out corpus
  (every distinct positive and negative of the held-out rows; relevant: the query's own positive),
  ours encoded by model.load_encoder(checkpoint).encode, ST by SentenceTransformer(checkpoint)
  .encode, FlagEmbedding by flag_encoder(checkpoint).encode_queries / encode_corpus, float32, batch
  32. Each saves a checkpoint every `eval_every` steps (ours step_N, ST and FlagEmbedding
  checkpoint-N, each with its optimizer state), evaluated after the run: MRR per step and per
  second of training. MRR@T interpolates each curve (the untrained model at 0 s) at T, the
  shortest training time of the regime's variants: quality at equal time.

Data (generated in the F2LLM format; the training file is peers_REGIME.parquet, typed "retrieval"
by the config's dataset_types): a document mixes common English words, words of its topic and rare
words; a query holds a few of its document's rare words, some of its topic words and question words.
Topic and rare words are whole tokens of Qwen3's vocabulary (lower-case words it keeps as one token
after a space), so that matching them is learnable in few steps. Hard negatives are, as in F2LLM
data, passages of other rows (about half the negatives) or negative-only passages, of the same topic
and holding none of the query's rare words: hard-ish but correct. Held-out rows are generated
apart (new documents, same vocabulary), with negatives among themselves. Regimes (tokens with eos;
the report prints the measured percentiles): short, queries ~5-13 and documents ~6-17; long
(F2LLM-like), queries ~10-50 and documents ~70-430, at most 512.

FAMILIES, regimes that differ in what makes retrieval hard (same vocabulary rules, 3 negatives):
keyword, queries of 2-4 of the document's rare words alone (~5 tokens) against documents of
~22-40: exact matching of a few tokens, no topic or question words to lean on; paraphrase, short
symmetric pairs (~10-17 tokens each) whose rare words come in 500 synonym pairs, the query taking
the other word of a pair 80% of the time: the model must learn which words mean the same from the
training rows; needle, documents of 4-7 passages on different topics (~80-170 tokens), the query
made from one of them: one relevant passage inside a long text; neardup, every negative a copy of
the positive with the query's rare words (and one other) swapped: only the words asked for tell
them apart, and the held-out corpus holds the copies too; zipf, topics drawn with p ~ 1/rank^1.1
over 64 topics: most rows share a few head topics (same-topic in-batch negatives), tail topics
are rarely seen.

--quick (ours-f2llm, st-mnrl, ours-joint, flag): short 640 train rows, 40 steps, evaluated every 20;
long 320 rows, 16 steps, every 8; each family 320 rows, 20 steps, every 10; 96 held-out rows. The
default (every variant but the ablation's): short 1600 rows, 200 steps, every 50; long 800 rows, 60
steps, every 15; each family 1600 rows, 100 steps (one epoch), every 50; 200 held-out rows.
--regimes picks the regimes (default short and long; `families` for all FAMILIES). Timings on a
shared 2-core machine are rough: the report prints the load averages.

Not equal, by design or beyond reach: ST and FlagEmbedding tokenize inside their training loops,
ours before it (in e2e only); ours-joint drops candidates with the positive's text, MNRL and
FlagEmbedding do not; each side draws its
own random batches (over whole epochs the rows are the same); the figures are for a tiny model on a CPU, where
per-step overheads (Python, the Trainer, AdamW over the 9.7M embedding rows) weigh far more than on
a real one, and ST on a GPU with flash-attn can unpad its batches.
"""
import benchutil  # noqa: I001  (first: import paths and environment)
import argparse
import contextlib
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_DIR = benchutil.REPO_DIR
MAX_SEQ_LENGTH = 512
VALIDATION_FRACTION = 0.01  # run.py's default: the share of the file it holds out; ST drops the same rows
SEED = 0
HIDDEN, LAYERS = 64, 2
HP = {"batch_size": 16, "learning_rate": 1e-3, "warmup_fraction": 0.1, "weight_decay": 0.01,
      "adam_betas": [0.9, 0.98], "max_grad_norm": 1.0, "temperature": 0.05}

# name, side, ours: config overrides / st: trainer options
VARIANTS = [
    ("ours-f2llm", "ours", {}),
    ("st-mnrl", "st", {"loss": "mnrl", "batch_sampler": "batch_sampler"}),
    ("ours-joint", "ours", {"contrastive_loss": "joint"}),
    ("st-cmnrl", "st", {"loss": "cmnrl", "mini_batch_size": 32, "batch_sampler": "batch_sampler"}),
    ("ours-joint-fnm0.1", "ours", {"contrastive_loss": "joint", "false_negative_margin": 0.1}),
    ("flag", "flag", {"optimizer": "all"}),
    # the ablation (see BENCHMARKS.md): MNRL with one thing changed towards ours-joint or away from the bench's parity
    ("st-mnrl-mask", "st", {"loss": "mnrl", "same_text_mask": True, "batch_sampler": "batch_sampler"}),
    ("st-mnrl-nodup", "st", {"loss": "mnrl", "batch_sampler": "no_duplicates"}),
    ("st-mnrl-trainer-adamw", "st", {"loss": "mnrl", "batch_sampler": "batch_sampler", "optimizer": "trainer"}),
    ("flag-trainer-adamw", "flag", {"optimizer": "trainer"}),
    ("ours-joint-wd0", "ours", {"contrastive_loss": "joint", "weight_decay": 0.0}),
]

FAMILIES = ("keyword", "paraphrase", "needle", "neardup", "zipf")  # the regimes of REGIMES below but the first two
SIZES = {  # regime: (train rows, steps, evaluated every this many steps); negatives per row, held-out rows
    True: {"short": (640, 40, 20), "long": (320, 16, 8), **{f: (320, 20, 10) for f in FAMILIES},
           "num_neg": 3, "heldout": 96},
    False: {"short": (1600, 200, 50), "long": (800, 60, 15), **{f: (1600, 100, 50) for f in FAMILIES},
            "num_neg": 3, "heldout": 200},
}
QUICK_VARIANTS = ("ours-f2llm", "st-mnrl", "ours-joint", "flag")
ABLATION = ("st-mnrl-mask", "st-mnrl-nodup", "st-mnrl-trainer-adamw", "flag-trainer-adamw", "ours-joint-wd0")

COMMON_WORDS = ("the of and to a in is it that was for on are with as at be this from or had by not but some can "
                "out other were all there when up use an each which do their time if will way about many then "
                "them would like so these her make see him has more could go come did no most my over know than "
                "may down been now find any new part take get place made after back").split()
COMMON_SET = set(COMMON_WORDS)
QUESTION_WORDS = "what which where who how why when does is are find show tell about the a of".split()
# words per text (about its tokens: the words are single tokens): uniform ranges, or lognormal
# (median, sigma, low, high). The regimes "short" and "long" are the figure-7 data; the others are
# FAMILIES, each hard in its own way (see TextGen): "query" how a query is made ("question", or
# "keywords": 2-4 of its document's rare words alone, or "paraphrase": the document's rare words
# mostly as their synonyms), "passages" a document of several passages of which one holds the
# query's words ("needle"), "negatives" "near_duplicates" (the positive with the query's words
# swapped), "topics" and "zipf" (topics drawn with p ~ 1/rank^zipf), "rare" the size of the rare
# vocabulary (paraphrase: synonym pairs, few enough to recur in training)
REGIMES = {
    "short": {"doc_words": (4, 16), "query_words": (4, 12), "rare_share": 0.3, "topic_share": 0.3},
    "long": {"doc_words": (170, 0.6, 45, 500), "query_words": (22, 0.5, 8, 60), "rare_share": 0.25,
             "topic_share": 0.3},
    "keyword": {"doc_words": (20, 40), "query_words": (2, 4), "rare_share": 0.3, "topic_share": 0.3,
                "query": "keywords"},
    "paraphrase": {"doc_words": (8, 16), "query_words": (8, 16), "rare_share": 0.3, "topic_share": 0.3,
                   "query": "paraphrase", "rare": 1000},
    "needle": {"doc_words": (15, 30), "passages": (4, 7), "query_words": (4, 12), "rare_share": 0.3,
               "topic_share": 0.3},
    "neardup": {"doc_words": (10, 20), "query_words": (4, 12), "rare_share": 0.3, "topic_share": 0.3,
                "negatives": "near_duplicates"},
    "zipf": {"doc_words": (4, 16), "query_words": (4, 12), "rare_share": 0.3, "topic_share": 0.3, "topics": 64,
             "zipf": 1.1},
}


# ---- data ---------------------------------------------------------------------------------------

def single_token_words(tokenizer):
    """Lower-case words of 4 to 9 letters that the tokenizer keeps whole after a space, sorted; not
    the common or question words."""
    space = "\u0120"  # byte-level BPE's symbol of a leading space
    words = {t[1:] for t in tokenizer.get_vocab() if t.startswith(space) and t[1:].isascii() and t[1:].isalpha()
             and t[1:].islower() and 4 <= len(t) - 1 <= 9}
    return sorted(words - COMMON_SET - set(QUESTION_WORDS))


class TextGen:
    """Documents and queries with a structure that a small model can learn from few steps.

    Vocabulary: common English words (Zipf frequencies), and from `words` (single tokens, so that a
    word's identity is its token's) `num_topics` topics of 30 words each and `num_rare` rare words.
    A document of n words takes ~rare_share of them from the rare words, ~topic_share from its
    topic, the rest common words, shuffled. With `synonyms` the rare words come in pairs: documents
    use the first of each pair, paraphrased queries mostly the second."""

    def __init__(self, seed, words, num_topics=16, words_per_topic=30, num_rare=3000, synonyms=False):
        self.rng = np.random.default_rng(seed)
        words = list(self.rng.choice(words, num_topics * words_per_topic + num_rare, replace=False))
        self.topics = [words[i * words_per_topic:(i + 1) * words_per_topic] for i in range(num_topics)]
        rare = words[num_topics * words_per_topic:]
        self.rare, self.synonym = (rare[::2], dict(zip(rare[::2], rare[1::2]))) if synonyms else (rare, {})
        self.rare_set = set(self.rare)
        self.topic_sets = [set(t) for t in self.topics]
        p = 1.0 / np.arange(1, len(COMMON_WORDS) + 1)
        self.common_p = p / p.sum()

    @classmethod
    def for_regime(cls, seed, words, regime):
        spec = REGIMES[regime]
        return cls(seed, words, num_topics=spec.get("topics", 16), num_rare=spec.get("rare", 3000),
                   synonyms=spec.get("query") == "paraphrase")

    def count(self, spec):
        if len(spec) == 2:
            return int(self.rng.integers(spec[0], spec[1] + 1))
        median, sigma, low, high = spec
        return int(np.clip(round(self.rng.lognormal(math.log(median), sigma)), low, high))

    def passage(self, topic, regime):
        n = self.count(regime["doc_words"])
        rare = max(2, round(regime["rare_share"] * n))
        on_topic = max(1, round(regime["topic_share"] * n))
        words = (list(self.rng.choice(self.rare, rare, replace=False))
                 + list(self.rng.choice(self.topics[topic], on_topic))
                 + list(self.rng.choice(COMMON_WORDS, max(0, n - rare - on_topic), p=self.common_p)))
        self.rng.shuffle(words)
        return words

    def document(self, topic, regime):
        """(the document's words, the words of its passage about `topic`, the one queries are made
        from): the same list, or ("passages") that passage among passages of other topics."""
        relevant = self.passage(topic, regime)
        if "passages" not in regime:
            return relevant, relevant
        others = [t for t in range(len(self.topics)) if t != topic]
        parts = [self.passage(int(t), regime) for t in self.rng.choice(others, self.count(regime["passages"]) - 1)]
        parts.insert(int(self.rng.integers(0, len(parts) + 1)), relevant)
        return [w for part in parts for w in part], relevant

    def query(self, doc_words, topic, regime):
        """(query text, its key words): a few of the document's rare words, some of its topic words
        and question words; "keywords": 2-4 of its rare words alone; "paraphrase": every word of the
        document's length again, rare words as their synonym with probability 0.8, topic and common
        words drawn anew, shuffled."""
        n = self.count(regime["query_words"])
        rare = sorted({w for w in doc_words if w not in self.topic_sets[topic] and w not in COMMON_SET})
        style = regime.get("query", "question")
        if style == "keywords":
            keys = list(self.rng.choice(rare, min(len(rare), n), replace=False))
            return " ".join(keys), set(keys)
        if style == "paraphrase":
            words = [self.synonym[w] if self.rng.random() < 0.8 else w for w in rare]
            on_topic = max(1, round(regime["topic_share"] * n))
            words += list(self.rng.choice(self.topics[topic], on_topic))
            words += list(self.rng.choice(COMMON_WORDS, max(0, n - len(words)), p=self.common_p))
            self.rng.shuffle(words)
            return " ".join(words), set(rare)
        keys = list(self.rng.choice(rare, min(len(rare), max(1, n // 3)), replace=False))
        on_topic = [w for w in doc_words if w in self.topic_sets[topic]]
        words = keys + list(self.rng.choice(on_topic, min(len(on_topic), max(1, n // 4)), replace=False))
        words += list(self.rng.choice(QUESTION_WORDS, max(0, n - len(words))))
        self.rng.shuffle(words)
        return " ".join(words), set(keys)

    def near_duplicate(self, doc_words, keys):
        """The document with each key word, and one other rare word, swapped for a rare word it does
        not hold: the same text but for the words the query asks for."""
        words = list(doc_words)
        spare = [i for i, w in enumerate(words) if w in self.rare_set and w not in keys]
        swap = sorted({i for i, w in enumerate(words) if w in keys}
                      | set(self.rng.choice(spare, min(1, len(spare)), replace=False).tolist()))
        fresh = [w for w in self.rng.choice(self.rare, len(swap) + len(words), replace=False) if w not in set(words)]
        for i, w in zip(swap, fresh):
            words[i] = str(w)
        return " ".join(words)

    def rows(self, n, regime, num_neg):
        """n rows {query, passage, negative_1..negative_num_neg}. As in F2LLM data, the negatives are
        passages of other rows or negative-only passages (n more): of the row's topic where enough of
        them hold none of the query's key words; "near_duplicates": num_neg near_duplicate copies of
        the positive."""
        regime = REGIMES[regime]
        if "zipf" in regime:
            p = 1.0 / np.arange(1, len(self.topics) + 1) ** regime["zipf"]
            topics = self.rng.choice(len(self.topics), 2 * n, p=p / p.sum())
        else:
            topics = self.rng.integers(0, len(self.topics), 2 * n)
        docs = [self.document(int(t), regime) for t in topics]
        doc_sets = [set(d) for d, _ in docs]
        passages = [" ".join(d) for d, _ in docs]
        by_topic = [np.flatnonzero(topics == t) for t in range(len(self.topics))]
        rows = []
        for i in range(n):
            query, keys = self.query(docs[i][1], int(topics[i]), regime)
            row = {"query": query, "passage": passages[i]}
            if regime.get("negatives") == "near_duplicates":
                row.update({f"negative_{c + 1}": self.near_duplicate(docs[i][0], keys) for c in range(num_neg)})
                rows.append(row)
                continue
            picked = []
            for pool in (by_topic[topics[i]], np.flatnonzero(topics != topics[i])):
                if len(picked) < num_neg:
                    fit = [j for j in self.rng.permutation(pool) if j != i and not keys & doc_sets[j]]
                    picked += fit[: num_neg - len(picked)]
            row.update({f"negative_{c + 1}": passages[j] for c, j in enumerate(picked)})
            rows.append(row)
        return rows


def train_file_rows(n_train, fraction=VALIDATION_FRACTION, seed=SEED):
    """The row count of a file whose train split (run.py's rule) has exactly n_train rows."""
    import datasets

    n = n_train
    while len(datasets.Dataset.from_dict({"i": list(range(n))})
               .train_test_split(test_size=fraction, seed=seed)["train"]) < n_train:
        n += 1
    return n


def train_split(table, fraction=VALIDATION_FRACTION, seed=SEED):
    """The rows of a raw table that run.py trains on: data.load_splits' split, which depends on the
    number of rows only (evaluate.eval_rows relies on the same)."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table)).train_test_split(test_size=fraction, seed=seed)["train"]


def write_data(root, regime, words, n_train, n_heldout, num_neg, seed=SEED):
    """The regime's raw training file (raw_REGIME/peers_REGIME.parquet) and held-out file, from the
    vocabulary `words` (single_token_words); their paths."""
    gen = TextGen.for_regime(seed, words, regime)
    name = f"peers_{regime}"
    raw_dir = os.path.join(root, f"raw_{regime}")
    os.makedirs(raw_dir, exist_ok=True)
    train = gen.rows(train_file_rows(n_train), regime, num_neg)
    heldout = gen.rows(n_heldout, regime, num_neg)
    paths = {"name": name, "raw_dir": raw_dir, "train": os.path.join(raw_dir, f"{name}.parquet"),
             "heldout": os.path.join(root, f"heldout_{regime}.parquet")}
    pq.write_table(pa.Table.from_pylist(train), paths["train"])
    pq.write_table(pa.Table.from_pylist(heldout), paths["heldout"])
    return paths


def heldout_set(path):
    """(queries, docs, relevant) of a held-out file, as metrics.retrieval_set builds them from
    token lists: docs are the distinct positives and negatives in order of first appearance."""
    table = pq.read_table(path)
    negatives = sorted((c for c in table.column_names if c.startswith("negative_")), key=lambda c: int(c[9:]))
    index, relevant = {}, []
    for row in zip(*(table.column(c).to_pylist() for c in ["passage", *negatives])):
        relevant.append([index.setdefault(text, len(index)) for text in row][:1])
    return table.column("query").to_pylist(), list(index), relevant


def metrics(encode, heldout):
    """MRR@10, nDCG@10 of an encode(texts) -> [n, d] normalised tensor on a held-out set."""
    from metrics import retrieval_metrics

    queries, docs, relevant = heldout
    out = retrieval_metrics(encode(queries) @ encode(docs).T, relevant)
    return {"mrr@10": out["mrr@10"], "ndcg@10": out["ndcg@10"]}


def length_stats(tokenizer, path):
    """Token-length percentiles (eos included, cut at MAX_SEQ_LENGTH) of a raw file's queries and documents."""
    from data import tokenize

    table = pq.read_table(path)
    docs = [t for c in table.column_names if c != "query" for t in table.column(c).to_pylist()]
    out = {}
    for kind, texts in (("query", table.column("query").to_pylist()), ("document", docs)):
        lengths = np.array([len(ids) for ids in tokenize(tokenizer, texts, MAX_SEQ_LENGTH)])
        out[kind] = {f"p{q}": int(np.percentile(lengths, q)) for q in (5, 50, 95)} | {"max": int(lengths.max())}
    return out


# ---- models -------------------------------------------------------------------------------------

def build_models(root, hidden=HIDDEN, layers=LAYERS, tokenizer_builder=None):
    """The shared starting point: the backbone folder (with Qwen3's tokenizer) that ours trains
    from, and its sentence-transformers export that ST trains from. Returns both paths."""
    import demo
    from model import load_backbone, load_tokenizer, save_inference_model

    backbone_dir, st_dir = os.path.join(root, "backbone"), os.path.join(root, "st_init")
    with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
        (tokenizer_builder or demo.build_qwen3_tokenizer)(backbone_dir)
        demo.build_backbone(backbone_dir, demo.QWEN3_EMBEDDING_ROWS, hidden_size=hidden, num_layers=layers)
        save_inference_model(load_backbone(backbone_dir, dtype="float32"), load_tokenizer(backbone_dir), st_dir,
                             max_seq_length=MAX_SEQ_LENGTH)
    return backbone_dir, st_dir


def untrained_agreement(backbone_dir, st_dir, heldout):
    """Before training: the lowest cosine between our encoder's embeddings of the held-out texts and
    ST's, FlagEmbedding's inference embedder's (flag_encoder) and its training forward's (left-padded
    batches through BiDecoderOnlyEmbedderModel.encode, as its collator builds them); FlagEmbedding's
    inference embedder as it loads a tokenizer by itself (no eos) too; the MRR@10 of ours, ST and
    FlagEmbedding (they must agree: the comparison is apples to apples)."""
    import torch
    from FlagEmbedding.finetune.embedder.decoder_only.base import BiDecoderOnlyEmbedderModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from model import load_encoder

    with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
        ours = load_encoder(backbone_dir, device="cpu", dtype="float32", max_seq_length=MAX_SEQ_LENGTH)
        st = SentenceTransformer(st_dir, device="cpu")
        flag = flag_encoder(backbone_dir)
        flag_training = BiDecoderOnlyEmbedderModel(AutoModel.from_pretrained(backbone_dir), tokenizer=flag.tokenizer,
                                                   normalize_embeddings=True).eval()
    texts = heldout[0] + heldout[1]
    reference = ours.encode(texts, convert_to_tensor=True)

    def lowest(embeddings):
        return (reference * torch.as_tensor(embeddings)).sum(-1).min().item()

    with torch.no_grad():
        batches = [flag.tokenizer.pad(flag.tokenizer(texts[i:i + 16], truncation=True, max_length=MAX_SEQ_LENGTH),
                                      return_tensors="pt") for i in range(0, len(texts), 16)]
        training = torch.cat([flag_training.encode(dict(batch)) for batch in batches])
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        flag_cosine = lowest(flag.encode_corpus(texts))
        flag.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)  # what BaseLLMEmbedder loads: no eos
        no_eos = lowest(flag.encode_corpus(texts))
    flag.tokenizer = flag_training.tokenizer
    return {"lowest_cosine": lowest(st.encode(texts)), "flag_lowest_cosine": flag_cosine,
            "flag_training_lowest_cosine": lowest(training), "flag_without_eos_lowest_cosine": no_eos,
            "ours": metrics(functools.partial(ours.encode, convert_to_tensor=True), heldout),
            "st": metrics(functools.partial(st.encode, convert_to_tensor=True), heldout),
            "flag": flag_metrics(flag, heldout)}


def loss_agreement(backbone_dir, st_dir, rows, num_neg):
    """One batch of raw rows and the same weights, ours' packed forward and joint loss against ST's
    padded forward and MNRL, plain and with the same-text rule (same_text_masked_mnrl): each loss,
    and the relative difference of ST's embedding-matrix gradient to ours'. Where the rule makes
    them equal, what is left between ours-joint and ST in training is the batches' draw."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from data import collate, tokenize
    from loss import f2llm_losses
    from model import Embedder, load_backbone, load_tokenizer

    tokenizer = load_tokenizer(backbone_dir)
    texts = ["query", "passage", *(f"negative_{i}" for i in range(1, num_neg + 1))]
    table = pa.table({("query_input_ids" if c == "query" else "passage_input_ids" if c == "passage" else c):
                      tokenize(tokenizer, [r[c] for r in rows], MAX_SEQ_LENGTH) for c in texts})
    batch = collate(table, num_neg=num_neg, max_seq_length=MAX_SEQ_LENGTH, eos_id=tokenizer.eos_token_id,
                    rng=np.random.default_rng(SEED), doc_keys=True)
    with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
        ours = Embedder(load_backbone(backbone_dir, dtype="float32", packed=True), layout="packed")
    embeddings = ours(batch["input_ids"], batch["lengths"], num_queries=len(rows))
    loss = f2llm_losses(embeddings, len(rows), num_neg, "retrieval", temperature=HP["temperature"],
                        contrastive_loss="joint", keys=batch["doc_keys"])["joint"]
    loss.backward()
    reference = ours.backbone.get_input_embeddings().weight.grad
    out = {"ours-joint": {"loss": loss.item()}}
    for name, make in (("st-mnrl", losses.MultipleNegativesRankingLoss),
                       ("st-mnrl-mask", same_text_masked_mnrl(losses.MultipleNegativesRankingLoss))):
        with contextlib.redirect_stderr(io.StringIO()):
            st = SentenceTransformer(st_dir, device="cpu")
        value = make(st, scale=1 / HP["temperature"])([st.tokenize([r[c] for r in rows]) for c in texts], None)
        value.backward()
        grad = st[0].auto_model.get_input_embeddings().weight.grad
        out[name] = {"loss": value.item(), "gradient_difference": ((grad - reference).norm() / reference.norm()).item()}
    return out


# ---- runs ---------------------------------------------------------------------------------------

def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1")


def launch(cmd, log_path):
    """Run cmd (cwd: the repository) to the end; (wall seconds, peak RSS MiB of it and its waited
    children, its output). A failure raises with the end of its output."""
    rss_path = log_path + ".rss"
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(benchutil.with_peak_rss(cmd, rss_path), cwd=REPO_DIR, env=child_env(), stdout=log,
                               stderr=subprocess.STDOUT)
    wall = time.time() - t0
    with open(log_path) as f:
        out = f.read()
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{out[-3000:]}")
    with open(rss_path) as f:
        return wall, int(f.read()) / 1024, out


def lr_settings(steps):
    return {"learning_rate": HP["learning_rate"], "warmup_steps": max(1, round(HP["warmup_fraction"] * steps))}


def shared_adamw(parameters):
    """The ST and FlagEmbedding workers' optimizer, ours' settings: a fused AdamW with weight decay on
    every parameter (their Trainers' own would exempt norm weights and biases)."""
    import torch

    return torch.optim.AdamW(parameters, lr=HP["learning_rate"], betas=tuple(HP["adam_betas"]),
                             weight_decay=HP["weight_decay"], fused=True)


def ours_config(run, overrides):
    """run.py's config for one of our variants (see the module docstring for what is shared)."""
    per_epoch = -(-run["train_rows"] // HP["batch_size"])
    return {"model_path": run["backbone_dir"], "train_data_path": run["raw_dir"],
            "experiment_id": run["variant"], "output_dir": run["work"], "tb_dir": os.path.join(run["work"], "tb"),
            "cache_dir": os.path.join(run["work"], "cache"), "dataset_types": {run["name"]: "retrieval"},
            "train_batch_size": HP["batch_size"], "train_steps": run["steps"],
            "train_epochs": -(-run["steps"] // per_epoch), "num_hard_neg": run["num_neg"],
            "max_seq_length": MAX_SEQ_LENGTH, "batch_layout": "packed", **lr_settings(run["steps"]), "min_lr": 0.0,
            "scheduler_type": "cosine", "weight_decay": HP["weight_decay"], "adam_betas": HP["adam_betas"],
            "max_grad_norm": HP["max_grad_norm"], "temperature": HP["temperature"], "dtype": "float32",
            "gradient_checkpointing": False, "log_interval": run["eval_every"],
            "checkpointing_steps": run["eval_every"], "validation_steps": 0, "eval_queries": 0,
            "min_eval_queries": 0,  # the 1% split: both sides train on the same rows
            "validation_fraction": VALIDATION_FRACTION, "seed": run["seed"], **overrides}


def tensorboard_intervals(tb_dir):
    """[(step, seconds, tokens)] of each log interval, from run.py's throughput scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    events.Reload()
    steps_per_s = {e.step: e.value for e in events.Scalars("train/steps_per_s")}
    tokens_per_s = {e.step: e.value for e in events.Scalars("train/tokens_per_s")}
    out, last = [], 0
    for step in sorted(steps_per_s):
        seconds = (step - last) / steps_per_s[step]
        out.append((step, seconds, tokens_per_s[step] * seconds))
        last = step
    return out


def run_ours(run, overrides):
    """One of our variants through accelerate launch; its measurements and its checkpoints' metrics."""
    from model import load_encoder

    config, config_path = ours_config(run, overrides), os.path.join(run["work"], "config.json")
    assert config["batch_layout"] == "packed", "pad 1.0: a packed batch is exactly its real tokens"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    wall, rss, out = launch([accelerate, "launch", "--config_file", "configs/accelerate_cpu.yaml", "run.py",
                             "--config", config_path], os.path.join(run["work"], "run.log.txt"))
    final = [line for line in out.splitlines() if line.startswith("final checkpoint: ")][-1]
    final = os.path.join(REPO_DIR, final[len("final checkpoint: "):])
    intervals = tensorboard_intervals(os.path.join(run["work"], "tb", run["variant"]))
    assert intervals[-1][0] == run["steps"], f"the run logged up to step {intervals[-1][0]}, not {run['steps']}"
    curve, elapsed = [], 0.0
    for step, seconds, _ in intervals:
        elapsed += seconds
        path = final if step == run["steps"] else os.path.join(run["work"], run["variant"], f"step_{step}")
        with contextlib.redirect_stderr(io.StringIO()):  # loading progress bars
            encoder = load_encoder(path, device="cpu", dtype="float32", max_seq_length=MAX_SEQ_LENGTH)
        curve.append({"step": step, "train_s": elapsed,
                      **metrics(functools.partial(encoder.encode, convert_to_tensor=True), run["heldout_set"])})
    return {"steps": run["steps"], "rows": rows_seen(run["train_rows"], run["steps"]),
            "train_s": elapsed, "e2e_s": wall, "real_tokens": round(sum(t for *_, t in intervals)),
            "padding": 1.0, "peak_rss_mib": rss, "curve": curve}


def rows_seen(train_rows, steps, bs=HP["batch_size"]):
    """Rows in `steps` batches of bs over epochs of train_rows (each epoch's last batch may be short)."""
    per_epoch = -(-train_rows // bs)
    full, rest = divmod(steps, per_epoch)
    return full * train_rows + min(rest * bs, train_rows)


def run_worker(run, options, side):
    """One ST or FlagEmbedding variant in a worker subprocess (this file with --st_worker or
    --flag_worker); its measurements."""
    spec = {key: run[key] for key in ("variant", "work", "st_dir", "backbone_dir", "train", "heldout", "steps",
                                      "eval_every", "num_neg", "seed")} | {"options": options}
    spec_path, result_path = os.path.join(run["work"], "spec.json"), os.path.join(run["work"], "result.json")
    with open(spec_path, "w") as f:
        json.dump(spec | {"result": result_path}, f)
    t0 = time.time()
    launch([sys.executable, os.path.abspath(__file__), f"--{side}_worker", spec_path],
           os.path.join(run["work"], "log.txt"))
    with open(result_path) as f:
        result = json.load(f)
    result["e2e_s"] = result.pop("trained_at") - t0
    return result


# ---- the sentence-transformers side (runs in its own process) ------------------------------------

def st_worker(spec_path):
    """Train one ST variant as a user's script would, then evaluate its checkpoints; writes the
    result JSON (the launch time is taken by the parent, so e2e includes the imports)."""
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses

    torch.set_num_threads(1)
    options, steps = spec["options"], spec["steps"]
    table = pq.read_table(spec["train"])
    names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, spec["num_neg"] + 1)]
    dataset = train_split(table.rename_columns(names), seed=spec["seed"])
    model = SentenceTransformer(spec["st_dir"], device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and model.max_seq_length == MAX_SEQ_LENGTH
    scale = 1 / HP["temperature"]
    if options.get("same_text_mask"):
        loss = same_text_masked_mnrl(losses.MultipleNegativesRankingLoss)(model, scale=scale)
    elif options["loss"] == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale)
    else:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=options["mini_batch_size"])
    lr = lr_settings(steps)
    args = SentenceTransformerTrainingArguments(
        output_dir=spec["work"], per_device_train_batch_size=HP["batch_size"], max_steps=steps,
        learning_rate=lr["learning_rate"], warmup_steps=lr["warmup_steps"], lr_scheduler_type="cosine",
        weight_decay=HP["weight_decay"], adam_beta1=HP["adam_betas"][0], adam_beta2=HP["adam_betas"][1],
        max_grad_norm=HP["max_grad_norm"], seed=spec["seed"], batch_sampler=options["batch_sampler"],
        save_strategy="steps", save_steps=spec["eval_every"], logging_steps=spec["eval_every"], report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    # "trainer": its Trainer's own, adamw_torch_fused without decay on norms and biases
    optimizer = shared_adamw(model.parameters()) if options.get("optimizer", "all") == "all" else None
    timer, counts, count, callback = trainer_probes()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         optimizers=(optimizer, None), callbacks=[callback])
    # on the Transformer module: it calls the backbone's forward directly, past the backbone's hooks
    hook = model[0].register_forward_pre_hook(lambda module, args: count(args[0]))
    trainer.train()
    trained_at = time.time()
    rss = benchutil.proc_status_kb("VmHWM") / 1024  # its own pages: ru_maxrss would add the parent's
    hook.remove()
    heldout = heldout_set(spec["heldout"])
    curve = []
    for step, train_s in sorted(timer.at_save.items()):
        saved = SentenceTransformer(os.path.join(spec["work"], f"checkpoint-{step}"), device="cpu")
        curve.append({"step": step, "train_s": train_s,
                      **metrics(functools.partial(saved.encode, convert_to_tensor=True), heldout)})
    assert curve and curve[-1]["step"] == steps, f"ST saved {sorted(timer.at_save)}, not up to step {steps}"
    write_result(spec, timer, counts, curve, trained_at, rss)


def same_text_masked_mnrl(mnrl):
    """MNRL's default loss (each anchor against every positive and negative of the batch, one
    softmax) with ours-joint's rule added: a candidate with the anchor's positive's text (the same
    token ids) is not a negative. For the ablation: MNRL with only that changed."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.util import cos_sim

    def texts(features):
        return [tuple(ids[m.bool()].tolist()) for ids, m in zip(features["input_ids"], features["attention_mask"])]

    class SameTextMasked(mnrl):
        def forward(self, sentence_features, labels):
            sentence_features = list(sentence_features)
            candidates = [t for features in sentence_features[1:] for t in texts(features)]
            keys = {t: i for i, t in enumerate(dict.fromkeys(candidates))}
            keys = torch.tensor([keys[t] for t in candidates])
            embeddings = embed_columns(self.model, sentence_features)
            scores = cos_sim(embeddings[0], torch.cat(embeddings[1:])) * self.scale
            target = torch.arange(len(embeddings[0]))
            same = keys[None, :] == keys[target][:, None]
            same[target, target] = False
            return F.cross_entropy(scores.masked_fill(same, float("-inf")), target)

    return SameTextMasked


def flag_jsonl(spec, path):
    """FlagEmbedding's training format, {query, pos: [..], neg: [..]} a line, of the split run.py trains on."""
    table = train_split(pq.read_table(spec["train"]), seed=spec["seed"])
    negatives = [f"negative_{i}" for i in range(1, spec["num_neg"] + 1)]
    with open(path, "w") as f:
        for row in table:
            f.write(json.dumps({"query": row["query"], "pos": [row["passage"]], "neg": [row[c] for c in negatives]})
                    + "\n")


def flag_encoder(path):
    """FlagEmbedding's decoder-only inference embedder of a checkpoint (or the backbone), as training
    embeds: no query instruction, last token, normalised, float32, and the eos appended. Its own
    tokenizer load adds no eos (training's runner passes add_eos_token=True; the backbone's
    tokenizer, and so each checkpoint's copy, appends nothing), so the training tokenizer is put in."""
    from FlagEmbedding.inference.embedder.decoder_only.base import BaseLLMEmbedder
    from transformers import AutoTokenizer

    embedder = BaseLLMEmbedder(path, normalize_embeddings=True, use_fp16=False, query_instruction_for_retrieval=None,
                               devices="cpu", batch_size=32, query_max_length=MAX_SEQ_LENGTH,
                               passage_max_length=MAX_SEQ_LENGTH, convert_to_numpy=False)
    embedder.tokenizer = AutoTokenizer.from_pretrained(path, add_eos_token=True, padding_side="left")
    return embedder


def flag_worker(spec_path):
    """Train with FlagEmbedding's decoder-only embedder fine-tuning through its own runner, as its
    command line would (`python -m FlagEmbedding.finetune.embedder.decoder_only.base ...`), then
    evaluate its checkpoints; writes the result JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from FlagEmbedding.finetune.embedder.decoder_only.base import (
        DecoderOnlyEmbedderDataArguments,
        DecoderOnlyEmbedderModelArguments,
        DecoderOnlyEmbedderRunner,
        DecoderOnlyEmbedderTrainingArguments,
    )

    torch.set_num_threads(1)
    options, steps = spec["options"], spec["steps"]
    data_path = os.path.join(spec["work"], "train.jsonl")
    flag_jsonl(spec, data_path)
    lr = lr_settings(steps)
    model_args = DecoderOnlyEmbedderModelArguments(model_name_or_path=spec["backbone_dir"], use_lora=False)
    # one positive and k negatives a row: a group of 1 + k, the k drawn from exactly k (all, shuffled);
    # no instruction (query_instruction_for_retrieval None), the whole text up to max_seq_length
    data_args = DecoderOnlyEmbedderDataArguments(
        train_data=[data_path], train_group_size=1 + spec["num_neg"], query_max_len=MAX_SEQ_LENGTH,
        passage_max_len=MAX_SEQ_LENGTH, query_instruction_for_retrieval=None)
    training_args = DecoderOnlyEmbedderTrainingArguments(
        output_dir=os.path.join(spec["work"], "out"), per_device_train_batch_size=HP["batch_size"],
        max_steps=steps, learning_rate=lr["learning_rate"], warmup_steps=lr["warmup_steps"],
        lr_scheduler_type="cosine", weight_decay=HP["weight_decay"], adam_beta1=HP["adam_betas"][0],
        adam_beta2=HP["adam_betas"][1], max_grad_norm=HP["max_grad_norm"], seed=spec["seed"],
        temperature=HP["temperature"], sentence_pooling_method="last_token", normalize_embeddings=True,
        gradient_checkpointing=False, save_strategy="steps", save_steps=spec["eval_every"],
        logging_steps=spec["eval_every"], report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    runner = DecoderOnlyEmbedderRunner(model_args=model_args, data_args=data_args, training_args=training_args)
    if options.get("optimizer", "all") == "all":  # as the other sides; its Trainer's own exempts norms and biases
        runner.trainer.optimizer = shared_adamw(runner.model.parameters())
    timer, counts, count, callback = trainer_probes()
    runner.trainer.add_callback(callback)
    hook = runner.model.model.register_forward_pre_hook(  # the backbone, called by keywords
        lambda module, args, kwargs: count(kwargs), with_kwargs=True)
    runner.trainer.train()
    trained_at = time.time()
    rss = benchutil.proc_status_kb("VmHWM") / 1024
    hook.remove()
    heldout = heldout_set(spec["heldout"])
    curve = []
    for step, train_s in sorted(timer.at_save.items()):
        with contextlib.redirect_stderr(io.StringIO()):
            embedder = flag_encoder(os.path.join(training_args.output_dir, f"checkpoint-{step}"))
        curve.append({"step": step, "train_s": train_s, **flag_metrics(embedder, heldout)})
    assert curve and curve[-1]["step"] == steps, f"FlagEmbedding saved {sorted(timer.at_save)}, not up to step {steps}"
    write_result(spec, timer, counts, curve, trained_at, rss)


def flag_metrics(embedder, heldout):
    """metrics() with FlagEmbedding's query and corpus encoders (the same here: no instructions)."""
    from metrics import retrieval_metrics

    queries, docs, relevant = heldout
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        scores = embedder.encode_queries(queries) @ embedder.encode_corpus(docs).T
    out = retrieval_metrics(scores, relevant)
    return {"mrr@10": out["mrr@10"], "ndcg@10": out["ndcg@10"]}


def write_result(spec, timer, counts, curve, trained_at, rss):
    """A worker's measurements (trainer_probes') and MRR curve, into the file its parent reads."""
    result = {"steps": timer.last_step, "rows": counts["sequences"] // (2 + spec["num_neg"]),
              "train_s": curve[-1]["train_s"], "trained_at": trained_at, "real_tokens": counts["real_trained"],
              "padding": counts["padded"] / counts["real"], "peak_rss_mib": rss, "curve": curve}
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def trainer_probes():
    """What the ST and FlagEmbedding workers measure their transformers Trainer with: a LoopTimer and its
    Trainer callback, and the token counts with count(batch), which a forward pre-hook gives each
    batch (a dict with input_ids and attention_mask)."""
    import torch
    from transformers import TrainerCallback

    timer, counts = LoopTimer(), {"padded": 0, "real": 0, "real_trained": 0, "sequences": 0}

    def count(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        counts["padded"] += ids.numel()
        counts["real"] += int(mask.sum())
        if torch.is_grad_enabled():
            counts["real_trained"] += int(mask.sum())
            counts["sequences"] += len(ids)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            timer.begin()

        def on_step_end(self, args, state, control, **kw):
            timer.step_end(state.global_step)

        def on_save(self, args, state, control, **kw):
            timer.saved()

    return timer, counts, count, Timer()


class LoopTimer:
    """The Trainer loop's time up to each step, without the checkpoint saves: a save runs between a
    step's on_step_end and on_save."""

    def __init__(self):
        self.start, self.paused, self.last_step, self.last_end, self.at_save = None, 0.0, 0, None, {}

    def begin(self):
        self.start = time.perf_counter()

    def step_end(self, step):
        self.last_step, self.last_end = step, time.perf_counter()

    def saved(self):
        self.at_save[self.last_step] = self.last_end - self.start - self.paused
        self.paused += time.perf_counter() - self.last_end


# ---- the benchmark --------------------------------------------------------------------------------

def available(overrides):
    """The config keys of `overrides` this checkout lacks (the new loss keys may not be merged yet)."""
    from config import config_keys

    return [key for key in overrides if key not in config_keys()]


def mrr_at(curve, untrained, seconds):
    """MRR@10 at `seconds` of training, interpolated on the curve from (0 s, untrained)."""
    points = [(0.0, untrained)] + [(p["train_s"], p["mrr@10"]) for p in curve]
    return float(np.interp(seconds, [t for t, _ in points], [m for _, m in points]))


_START = time.time()


def progress(line):
    print(f"[{time.time() - _START:6.0f} s] {line}", flush=True)


def mean_of_seeds(runs):
    """One variant's runs with different training seeds as one: the first's fields, the numbers and
    the MRR curve averaged over the runs (the same steps in each), and each run's final MRR@10."""
    def mean(values):  # counts that agree (steps, rows) stay integers
        return values[0] if all(v == values[0] for v in values) else sum(values) / len(values)

    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = mean([r[key] for r in runs])
    out["curve"] = [{key: mean([r["curve"][i][key] for r in runs]) for key in point}
                    for i, point in enumerate(runs[0]["curve"])]
    out["final_mrr_by_seed"] = [r["curve"][-1]["mrr@10"] for r in runs]
    return out


def run(quick=False, regimes=("short", "long"), variants=None, sizes=None, hidden=HIDDEN, layers=LAYERS,
        tokenizer_builder=None, work_dir=None, seeds=(SEED,)):
    """Every variant on every regime, trained once per seed (the seed of the data split, the batch
    order and the negatives' order, on both sides; the data and the initial weights stay); the
    result dict (see report)."""
    sizes = sizes or SIZES[quick]
    variants = variants or (QUICK_VARIANTS if quick else [v[0] for v in VARIANTS if v[0] not in ABLATION])
    chosen = [v for v in VARIANTS if v[0] in variants]
    result = {"hidden": hidden, "layers": layers, "max_seq_length": MAX_SEQ_LENGTH, "hp": HP, "sizes": sizes,
              "load_average": [benchutil.load_average()], "skipped": {}, "regimes": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as root:
        t0 = time.time()
        backbone_dir, st_dir = build_models(root, hidden, layers, tokenizer_builder)
        result["build_s"] = time.time() - t0
        progress(f"built the backbone, its ST export and Qwen3's tokenizer in {result['build_s']:.0f} s")
        from model import load_tokenizer

        tokenizer = load_tokenizer(backbone_dir)
        words = single_token_words(tokenizer)
        for r, regime in enumerate(regimes):
            n_train, steps, eval_every = sizes[regime]
            paths = write_data(root, regime, words, n_train, sizes["heldout"], sizes["num_neg"])
            heldout = heldout_set(paths["heldout"])
            untrained = untrained_agreement(backbone_dir, st_dir, heldout)
            one_batch = loss_agreement(backbone_dir, st_dir, pq.read_table(paths["train"]).slice(0, HP["batch_size"])
                                       .to_pylist(), sizes["num_neg"])
            progress(f"{regime}: data and untrained check (lowest cosine {untrained['lowest_cosine']:.6f}) done")
            out = {"train_rows": n_train, "steps": steps, "num_neg": sizes["num_neg"],
                   "heldout_queries": len(heldout[0]), "heldout_docs": len(heldout[1]),
                   "lengths": length_stats(tokenizer, paths["train"]), "untrained": untrained,
                   "one_batch": one_batch, "variants": {}}
            order = chosen if r % 2 == 0 else chosen[::-1]
            for name, side, settings in order:
                missing = available(settings) if side == "ours" else []
                if missing:
                    result["skipped"][name] = f"config key(s) {', '.join(missing)} not in this checkout's config.py"
                    progress(f"skip {name}: {result['skipped'][name]}")
                    continue
                t0, runs = time.time(), []
                for seed in seeds:
                    work = os.path.join(root, f"{regime}_{name}_{seed}")
                    os.makedirs(work)
                    spec = {"variant": name, "work": work, "backbone_dir": backbone_dir, "st_dir": st_dir,
                            "raw_dir": paths["raw_dir"], "name": paths["name"], "train": paths["train"],
                            "heldout": paths["heldout"], "heldout_set": heldout, "train_rows": n_train,
                            "steps": steps, "eval_every": eval_every, "num_neg": sizes["num_neg"],
                            "seed": seed}
                    runs.append(run_ours(spec, settings) if side == "ours" else run_worker(spec, settings, side))
                    shutil.rmtree(work)  # checkpoints with optimizer state: ~120 MB each
                measured = mean_of_seeds(runs)
                measured |= {"side": side, "settings": settings, "final": measured["curve"][-1],
                             "real_tokens_per_s": measured["real_tokens"] / measured["train_s"],
                             "bench_s": time.time() - t0}
                out["variants"][name] = measured
                progress(f"{regime} {name}: train {measured['train_s']:.1f} s, e2e {measured['e2e_s']:.1f} s, MRR@10 "
                         f"{measured['final']['mrr@10']:.4f} ({measured['bench_s']:.0f} s with evaluation)")
            done = out["variants"]
            if done:
                equal_time = min(v["train_s"] for v in done.values())
                out["equal_time_s"] = equal_time
                for name, v in done.items():
                    start = untrained[v["side"]]["mrr@10"]
                    v["mrr@10_at_equal_time"] = mrr_at(v["curve"], start, equal_time)
            result["regimes"][regime] = out
            result["load_average"].append(benchutil.load_average())
    return result


def report(result):
    hp = result["hp"]
    lines = [benchutil.machine(),
             (f"model: Qwen3 hidden {result['hidden']}, {result['layers']} layers, Qwen3's tokenizer and 151,936 "
              f"embedding rows, float32, 1 thread per run; max_seq_length {result['max_seq_length']}; batch "
              f"{hp['batch_size']}, lr {hp['learning_rate']:g} (warmup {hp['warmup_fraction']:.0%}, cosine to 0), "
              f"temperature {hp['temperature']}; load average "
              + " -> ".join(_num(v) for v in result["load_average"])),
             ("train s: the training loop (batches included, checkpoint saving not); e2e s: raw parquet to trained "
              "model (ours: accelerate launch run.py on the raw folder, tokenizing it first; ST: its script, "
              "tokenizing in the loop); pad: computed / real tokens; MRR@T: MRR@10 at the regime's shortest "
              "training time")]
    lines += [f"skipped {name}: {why}" for name, why in result["skipped"].items()]
    for regime, out in result["regimes"].items():
        u, q, d = out["untrained"], out["lengths"]["query"], out["lengths"]["document"]
        lines += ["", (f"regime {regime}: {out['train_rows']} train rows x (query, positive, {out['num_neg']} "
                       f"negatives), {out['steps']} steps; tokens p5/p50/p95 (max): queries {q['p5']}/{q['p50']}/"
                       f"{q['p95']} ({q['max']}), documents {d['p5']}/{d['p50']}/{d['p95']} ({d['max']}); "
                       f"held-out {out['heldout_queries']} queries x {out['heldout_docs']} documents"),
                  (f"untrained: lowest cosine to our encoder's embeddings: ST {u['lowest_cosine']:.6f}, "
                   f"FlagEmbedding {u['flag_lowest_cosine']:.6f} (its training forward "
                   f"{u['flag_training_lowest_cosine']:.6f}; its embedder's own tokenizer, no eos: "
                   f"{u['flag_without_eos_lowest_cosine']:.4f}); MRR@10 ours {u['ours']['mrr@10']:.4f}, ST "
                   f"{u['st']['mrr@10']:.4f}, FlagEmbedding {u['flag']['mrr@10']:.4f}")]
        b = out["one_batch"]
        lines.append(f"one batch (the file's first rows), same weights: loss ours-joint {b['ours-joint']['loss']:.6f}, "
                     + ", ".join(f"{name} {b[name]['loss']:.6f} (gradient {b[name]['gradient_difference']:.1e} apart)"
                                 for name in ("st-mnrl", "st-mnrl-mask")))
        if not out["variants"]:
            continue
        rows = [[name, v["steps"], v["rows"], f"{v['train_s']:.1f}", f"{v['e2e_s']:.1f}",
                 f"{v['real_tokens_per_s']:,.0f}", f"{v['padding']:.2f}", f"{v['peak_rss_mib']:.0f}",
                 f"{v['final']['mrr@10']:.4f}", f"{v['final']['ndcg@10']:.4f}", f"{v['mrr@10_at_equal_time']:.4f}"]
                for name, v in out["variants"].items()]
        lines.append(benchutil.table(["variant", "steps", "rows", "train s", "e2e s", "real tok/s", "pad", "RSS MiB",
                                      "MRR@10", "nDCG@10", f"MRR@T={out['equal_time_s']:.0f}s"], rows))
        if len(next(iter(out["variants"].values()))["final_mrr_by_seed"]) > 1:
            lines.append("final MRR@10 of each seed (the table: their mean): " + "; ".join(
                f"{name} " + " ".join(f"{m:.4f}" for m in v["final_mrr_by_seed"])
                for name, v in out["variants"].items()))
        lines.append("MRR@10 by step (training seconds):")
        lines += [f"  {name:18s} " + "  ".join(f"{p['step']}: {p['mrr@10']:.4f} ({p['train_s']:.0f} s)"
                                               for p in v["curve"]) for name, v in out["variants"].items()]
    if len(result["regimes"]) > 1:
        lines += ["", "final MRR@10 by regime: the mean of the seeds (lowest-highest seed); train s", summary(result)]
    return "\n".join(lines)


def summary(result):
    """One row per regime, one column per variant: mean MRR@10 (the seeds' range) and train s."""
    names = list(dict.fromkeys(name for out in result["regimes"].values() for name in out["variants"]))
    rows = []
    for regime, out in result["regimes"].items():
        row = [regime]
        for name in names:
            v = out["variants"].get(name)
            seeds = v["final_mrr_by_seed"] if v else None
            row.append(f"{v['final']['mrr@10']:.3f} ({min(seeds):.3f}-{max(seeds):.3f}); {v['train_s']:.1f} s"
                       if v else "-")
        rows.append(row)
    return benchutil.table(["regime", *names], rows)


def _num(value):
    return "?" if value is None else f"{value:.2f}"


def main(argv=None):
    p = benchutil.add_quick_flag(argparse.ArgumentParser(
        description="Ours vs sentence-transformers: same model, data and settings; time, memory and MRR@10."))
    p.add_argument("--regimes", nargs="+", choices=[*REGIMES, "families"], default=["short", "long"],
                   help="default: short long; families: every one of FAMILIES")
    p.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], help="default: all but the ablation's")
    p.add_argument("--seeds", nargs="+", type=int, default=[SEED],
                   help="train each variant once per seed; the table shows the means (default: 0)")
    p.add_argument("--st_worker", help=argparse.SUPPRESS)  # internal: one ST run, in its own process
    p.add_argument("--flag_worker", help=argparse.SUPPRESS)  # internal: one FlagEmbedding run
    args = p.parse_args(argv)
    if args.st_worker:
        return st_worker(args.st_worker)
    if args.flag_worker:
        return flag_worker(args.flag_worker)
    regimes = [r for name in args.regimes for r in (FAMILIES if name == "families" else [name])]
    result = run(args.quick, tuple(regimes), args.variants, seeds=tuple(args.seeds))
    return benchutil.emit(result, report)


if __name__ == "__main__":
    main()
