"""The training configuration: one dataclass, the single source of truth for every option.

Defaults are the published values of F2LLM's `configs/config.json` (the 4B run); options this
project adds carry a default that improves on the published code, and the published behaviour
is one switch away (see docs/differences.md). The fields' metadata (help, group, see) is the config
reference: `config_reference()` writes docs/config.md from it (`python docs/make_config_reference.py`),
and `run_parser()` makes run.py's command line from it (`--KEY VALUE` for every key, and `--help`,
which run.py prints before it imports torch: this module imports nothing heavy).
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field

from errors import UserError

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TASK_TYPES = ("retrieval", "classification", "clustering")
BATCH_LAYOUTS = ("packed", "grouped", "padded")
POOLINGS = ("auto", "lasttoken", "mean", "cls")
# The keys whose value is one of a few names: each key's names.
CHOICES = {
    "negative_sampling": ("per_row", "per_batch"),
    "validation_negatives": ("first", "random"),
    "dataset_draw": ("seeded", "published"),
    "inbatch_gradient": ("all", "own", "none"),
    "lr_schedule_steps": ("optimizer", "published_v1", "published_v2"),
    "scheduler_type": ("cosine", "constant_with_warmup"),
    "attention_mask_from": ("lengths", "pad_token_id"),
    "batch_layout": BATCH_LAYOUTS,
    "dtype": ("auto", "bfloat16", "float32"),
    "log_keys": ("grouped", "published"),
    "contrastive_loss": ("f2llm", "joint"),
    "adamw_implementation": ("fused", "torch_default"),
    "model_type": ("auto", "decoder", "encoder"),
    "pooling": POOLINGS,
    "loss_dtype": ("float32", "embeddings"),
}
# The experiment trackers report_to takes: accelerate's (accelerate.tracking.LOGGER_TYPE_TO_CLASS), by the
# names its log_with takes. Not its "all", which logs to whichever trackers happen to be installed.
TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
# Keys of earlier versions of this project: what replaced them.
REPLACED_KEYS = {"gather_with_grad": "inbatch_gradient (true: \"all\", false: \"own\")"}
# Keys of the published Args that configure nothing: num_processes is a placeholder the published
# run.py fills in for its args.json (the launch decides the number of processes).
IGNORED_KEYS = ("num_processes",)
PROMPT_NAMES = ("query", "document")
LORA_KEYS = {"r": int, "alpha": float, "dropout": float, "target_modules": list}
# target_modules None: every linear layer of the backbone's blocks (lora.linear_layers)
LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}
# The smallest temperature: the logits cos/temperature then stay within +-1000. Below it the softmax is
# an argmax in all but name (a bfloat16 cosine near 1 moves in steps of 2**-8, over 4 nats of logit
# at 1e-3 and 40 at 1e-4) and the loss and gradient norm grow as 1/temperature, until the gradient
# norm overflows float32 near 1e-19 and every step is skipped as non-finite (1e-30: inf).
MIN_TEMPERATURE = 1e-3
SEED_LIMIT = 2**32  # numpy's seeds (accelerate's set_seed seeds numpy): 0 <= seed < 2**32
# The sections of docs/config.md, in order: (a field's `group`, heading, what the keys have in common).
CONFIG_GROUPS = (
    ("published", "Published keys",
     "The keys of the published `configs/config.json`; the defaults are its values (the 4B run)."),
    ("project", "Options this project adds",
     "Keys the published code does not have. Some make settable what it fixed in the code, at its value "
     "(`temperature`, for one); some switch between its behaviour and this project's fix, the default being the "
     "fix and the value marked (published) giving its behaviour back ([differences.md](differences.md)); the rest "
     "add what it lacks (resume, retrieval metrics, prompts, the cached step)."),
    ("v2", "F2LLM-v2 options and LoRA",
     "F2LLM-v2's options and LoRA, each off by default, so the defaults stay the published v1 recipe; "
     "`configs/f2llm_v2.json` sets the v2 ones as the published v2 run did. See [f2llm-v2.md](f2llm-v2.md)."),
)


RESUME_RULES = {
    "free": "decides where outputs go or how often to log, validate and save, not the training: changed freely",
    "follows": "takes effect from the resumed step (the lr schedule is recomputed with it), with a warning",
    "fixed": "decides the weights restored, the data split or its order: a resume with it changed is refused",
}


def _opt(default, help, on_resume="follows", group="project", see=None, **kw):
    """A config field. `on_resume`: what a change between a checkpoint and its resume does (a key of
    RESUME_RULES). `group` (a name of CONFIG_GROUPS) and `see` (a page of docs/) place the key in
    docs/config.md."""
    metadata = {"help": help, "on_resume": on_resume, "group": group, "see": see}
    return field(default=default, metadata=metadata, **kw)


@dataclass
class Config:
    # Published keys.
    model_path: str = field(metadata={"help": "Backbone folder (a decoder such as Qwen3, or an encoder such as BERT: "
                                              "docs/backbones.md) with its tokenizer.",
                                      "group": "published"})
    train_data_path: str = field(metadata={"help": "Folder of tokenized `*.parquet` files, one per dataset (raw ones "
                                                   "are tokenized into cache_dir first).", "group": "published"})
    model_type: str = _opt("auto", "`auto`: the backbone's kind from the model_type of its config.json (decoders: "
                                   "Qwen, Llama, Mistral, Gemma, Phi-3, ...; encoders: BERT, RoBERTa, XLM-RoBERTa, "
                                   "DistilBERT, ELECTRA, DeBERTa-v2, ModernBERT); `decoder` or `encoder` (the "
                                   "published encoder branch's key) only confirm it: a value that disagrees stops the "
                                   "run.",
                           group="published", see="backbones.md", on_resume="fixed")
    experiment_id: str = _opt("4b+lr.8e-6+bs.16x32+context.1024+2epochs",
                              "Run name: sub-folder of output_dir and tb_dir.", on_resume="free",
                              group="published")
    output_dir: str = _opt("output", "Where checkpoints go (`output_dir/experiment_id/step_N`, `epoch_N`).",
                           on_resume="free", group="published")
    tb_dir: str = _opt("output/tb", "TensorBoard log root (`tb_dir/experiment_id`), with `tensorboard` in "
                                    "report_to.", on_resume="free", group="published")
    cache_dir: str = _opt("cache", "Cache of the `datasets` train/validation splits.", on_resume="free",
                          group="published")
    train_batch_size: int = _opt(16, "Queries per batch per process (micro batch).", group="published",
                                 on_resume="fixed")
    checkpointing_steps: int = _opt(5000, "Save `step_N` every this many steps (0: only at epoch ends).",
                                    on_resume="free", group="published")
    validation_steps: int = _opt(5000, "Validate every this many steps (0: only at epoch ends).",
                                 on_resume="free", group="published")
    max_seq_length: int = _opt(1024, "Longest sequence in tokens, the eos (decoders) or the special tokens "
                                     "(encoders) included.", group="published")
    learning_rate: float = _opt(8e-6, "Peak learning rate.", group="published")
    min_lr: float = _opt(1e-7, "The learning rate is clamped from below at this value after each step.",
                         group="published")
    weight_decay: float = _opt(0.01, "AdamW weight decay.", group="published")
    warmup_steps: int = _opt(500, "Linear warmup steps before the cosine decay.", group="published")
    train_epochs: int = _opt(2, "Passes over the training data.", group="published")
    log_interval: int = _opt(100, "Log training losses and lr every this many steps.", on_resume="free",
                             group="published")
    num_hard_neg: int = _opt(7, "Hard negatives per query for retrieval and clustering (classification uses 1). 0: "
                                "retrieval trains on the (query, positive) pairs alone, the batch's other "
                                "positives as negatives (in-batch negatives).", group="published")
    train_steps: int = _opt(-1, "Total optimizer steps; -1 means batches per epoch x train_epochs.", group="published")
    # Options this project adds.
    temperature: float = _opt(0.05, "Softmax temperature of both contrastive losses (cosine similarity); at least "
                                    "0.001, which keeps the logits cos/temperature within +-1000.")
    negative_sampling: str = _opt("per_row", "How a training batch's hard negatives are drawn from each row's: "
                                             "`per_row`, each row on its own; `per_batch` (published), one draw of "
                                             "columns for the whole batch (k = 1: always negative_1).")
    negative_columns: int = _opt(None, "Training draws hard negatives from each row's first this many negative "
                                       "columns only (published: 24, its `random.sample(range(24), k)`); null: "
                                       "from all of them.")
    validation_negatives: str = _opt("first", "Validation batches' hard negatives: `first`, each row's first k; "
                                              "`random` (published), drawn like training's, the same at every "
                                              "validation.", on_resume="free")
    dataset_draw: str = _opt("seeded", "The order of the datasets' batches in an epoch: `seeded`, drawn by "
                                       "(seed, epoch); `published`, the published MultiLoader's random.Random(epoch) "
                                       "stream, whatever the seed.", on_resume="fixed")
    inbatch_gradient: str = _opt("all", "Which positives of the global batch the in-batch loss sends gradient to: "
                                        "`all` (the gradient of the global-batch loss), `own` (this process's "
                                        "only), `none` (published: only the queries learn from it).")
    contrastive_loss: str = _opt("f2llm", "`f2llm` (published): hard-negative loss plus in-batch loss over the "
                                          "positives; `joint`: on retrieval batches one softmax of each query over "
                                          "every positive and hard negative of the global batch (sentence-"
                                          "transformers' MultipleNegativesRankingLoss), a candidate with the "
                                          "positive's text not counted as a negative; other task types keep the "
                                          "hard-negative loss.", see="beyond-the-recipe.md")
    loss_dtype: str = _opt("float32", "The softmax cross-entropy of the contrastive losses (and the distillation "
                                      "loss) in `float32`, whatever the embeddings' dtype; `embeddings` (published): "
                                      "in the embeddings' dtype, so in bf16 in a bf16 run (loss and gradient then "
                                      "differ by up to about 1%).")
    false_negative_margin: float = _opt(None, "If set (e.g. 0.1), every contrastive term drops the candidates whose "
                                              "cosine similarity to the query exceeds the positive's by more than "
                                              "this (likely unlabeled positives). null: off (published).",
                                  see="beyond-the-recipe.md")
    log_keys: str = _opt("grouped", "TensorBoard names of the losses: `grouped`, train/DATASET/hard, "
                                    "valid/TASK_TYPE/inbatch, ... (each loss term apart); `published`, "
                                    "DATASET/training_loss_hard, Avg/TASK_TYPE/valid_loss_in_batch, ... (training's "
                                    "Matryoshka terms inside the loss they cut).", on_resume="free")
    # A tuple: a dataclass default cannot be a list (__post_init__ makes it one).
    report_to: list = _opt(("tensorboard",), "Experiment trackers that get the config and the metrics, from the "
                                             "main process (accelerate's): `tensorboard` (into tb_dir), `mlflow`, "
                                             "`wandb`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `trackio`; "
                                             "[]: none. A resumed run continues its MLflow and W&B runs. Each but "
                                             "tensorboard needs its package (requirements-trackers.txt).",
                           on_resume="free", see="trackers.md")
    attention_mask_from: str = _opt("lengths", "`lengths`: mask from sequence lengths; `pad_token_id`: published "
                                               "rule input_ids != pad id, which masks eos when pad == eos.")
    dataset_types_file: str = _opt("configs/dataset_types.json",
                                   "JSON {task_type: [dataset names]}; a relative path is looked up in the working "
                                   "folder, then the repository.")
    dataset_types: dict = _opt(None, "Overrides and additions {dataset name: task type}.")
    pooling: str = _opt("auto", "The embedding of a text: `auto` is `lasttoken` for decoders (the hidden state at "
                                "the appended eos; published) and `mean` for encoders (the mean over its tokens, "
                                "special tokens included; the published encoder branch); `mean` for a decoder too; "
                                "`cls`: an encoder's first token (refused for decoders). Checkpoints record it for "
                                "sentence-transformers.", see="backbones.md", on_resume="fixed")
    attn_implementation: str = _opt("auto", "`auto`: flash_attention_2 if installed on a GPU; else, packed: "
                                            "flex_attention on a GPU, `sdpa_varlen` (ours) on the CPU; padded: sdpa. "
                                            "Or any transformers attn_implementation.")
    dtype: str = _opt("auto", "Backbone weights: `auto` is bfloat16 under DeepSpeed with bf16 (which keeps float32 "
                              "master weights), else float32 with accelerate's mixed precision; `bfloat16` or "
                              "`float32` force one (published: bfloat16).", on_resume="fixed")
    batch_layout: str = _opt("packed", "`packed`: a batch's sequences in one row with per-sequence boundaries, no "
                                       "padding; `grouped`: queries and documents padded as two groups; `padded`: "
                                       "all padded to the longest (published).",
                             see="speed-and-memory.md#padding-free-batches")
    grad_cache_chunk_size: int = _opt(0, "If > 0, the cached (GradCache) step: embed the batch in chunks of this many "
                                         "sequences without graph, then re-run each chunk with its embedding "
                                         "gradient; memory stops growing with the batch. 0: off.",
                                 see="speed-and-memory.md#the-cached-step")
    gradient_checkpointing: bool = _opt(True, "Recompute activations in the backward pass to save memory.")
    adam_betas: list = _opt(None, "AdamW betas.")
    adamw_implementation: str = _opt("fused", "`fused`: torch's one-kernel AdamW (the same update up to rounding; on "
                                              "the CPU about 12x faster than the per-tensor loop torch picks there); "
                                              "`torch_default` (published): torch's own choice (foreach on a GPU).",
                                        on_resume="fixed")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (DeepSpeed takes it from the accelerate config).")
    merge_checkpoints: bool = _opt(False, "F2LLM-v2's extra checkpoints for merging: step_5, and every 500 steps in "
                                          "the last 2,500 (with checkpointing_steps on). See merge_checkpoints.py.",
                                   group="v2", on_resume="free")
    validation_fraction: float = _opt(0.01, "Share of each dataset held out for validation.", on_resume="fixed")
    seed: int = _opt(0, "Seed of the validation split, shuffling, negative sampling and the dataset draw "
                        "(0 <= seed < 2**32).", on_resume="fixed")
    lr_schedule_steps: str = _opt("optimizer", "`optimizer`: warmup over warmup_steps optimizer steps, decay over "
                                              "the run; `published_v1`: as the published v1 code, whose schedule "
                                              "advances once per process per step over the unsharded step count "
                                              "(warmup of warmup_steps / processes steps); `published_v2`: the same "
                                              "with warmup_steps x processes.")
    scheduler_type: str = _opt("cosine", "`cosine`: linear warmup, then cosine decay to 0 over the run (clamped at "
                                         "min_lr); `constant_with_warmup` (F2LLM-v2): linear warmup, then constant.",
                               group="v2")
    resume_from: str = _opt("", "`latest`: continue from the newest intact checkpoint in output_dir/experiment_id "
                                "(or start afresh if there is none yet); a `step_N` / `epoch_N` path: from that one; "
                                "empty: start afresh, refused when the folder holds checkpoints already; `none`: "
                                "start afresh over them.", on_resume="free", see="long-runs.md#resume")
    save_total_limit: int = _opt(2, "How many of the newest checkpoints keep their full training state (optimizer, "
                                    "RNG, data position); older ones keep only their weights. 0: all keep it.",
                                 on_resume="free", see="long-runs.md#pruning")
    max_bad_steps: int = _opt(10, "Stop (with a checkpoint) after this many steps in a row with a non-finite loss "
                                  "or gradient; such a step is skipped.", see="long-runs.md#non-finite-losses",
                              on_resume="free")

    num_hard_neg_clustering: int = _opt(-1, "Hard negatives per query for clustering datasets; -1: num_hard_neg "
                                            "(published v1). F2LLM-v2 uses 9.", group="v2")
    use_mrl: bool = _opt(False, "F2LLM-v2 Matryoshka loss: both losses also on the first m dimensions of each "
                                "embedding, for every m in mrl_dims.", group="v2")
    mrl_dims: list = _opt(None, "Matryoshka dimensions, each below the hidden size; null: every power of two from "
                                "8 below the hidden size.", group="v2")
    teacher_model_path: str = _opt(None, "F2LLM-v2 knowledge distillation: an embedding checkpoint with the same "
                                         "tokenizer whose embeddings (cut to the student's size) the student "
                                         "matches by MSE. null: no distillation.", group="v2")
    kd_weight: float = _opt(1.0, "Weight of the distillation loss (with teacher_model_path).", group="v2")
    lora: dict = _opt(None, "LoRA through peft instead of full fine-tuning: {\"r\": 16, \"alpha\": 32, \"dropout\": "
                            "0.05, \"target_modules\": null} (missing keys take these values; target_modules "
                            "null: every linear layer of the backbone's blocks, e.g. Qwen's q_proj ... down_proj). "
                            "Merged into the saved weights. null: off.",
                        group="v2", on_resume="fixed")
    prompts: dict = _opt(None, "Instructions recorded in each checkpoint for sentence-transformers and MTEB, e.g. "
                               "{\"query\": \"Instruct: ...\\nQuery: \"}; keys query and document. Training data "
                               "carries its own.", see="evaluation.md#using-a-checkpoint", on_resume="free")
    eval_queries: int = _opt(1000, "Retrieval metrics at each validation: up to this many validation queries per "
                                   "retrieval dataset, each ranked against the positives and negatives of those "
                                   "rows. 0: off.", see="evaluation.md#retrieval-metrics-during-training",
                             on_resume="free")
    min_eval_queries: int = _opt(50, "Validation split of each retrieval dataset: at least this many rows (at most "
                                     "half the dataset), whatever validation_fraction gives, so that the retrieval "
                                     "metrics rest on enough queries; a warning names a dataset whose metrics rest "
                                     "on fewer. 0: validation_fraction alone (published).",
                                 see="evaluation.md#retrieval-metrics-during-training", on_resume="fixed")

    def __post_init__(self):
        if self.adam_betas is None:
            self.adam_betas = [0.9, 0.98]
        if self.dataset_types is None:
            self.dataset_types = {}
        if self.prompts is None:
            self.prompts = {}
        # transformers' TrainingArguments take "mlflow" and "none" as well as lists
        report_to = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        self.report_to = [] if report_to in (["none"], ("none",)) else list(report_to)
        if self.lora is not None and isinstance(self.lora, dict):
            self.lora = {**LORA_DEFAULTS, **self.lora}

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, self.experiment_id)


def config_keys():
    return [f.name for f in dataclasses.fields(Config)]


def resume_rule(key):
    """What changing `key` between a checkpoint and its resume does: "free", "follows" or "fixed"
    (RESUME_RULES); "follows" for keys of earlier versions."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    return fields[key].metadata.get("on_resume", "follows") if key in fields else "follows"


def config_reference():
    """docs/config.md: every key with its default and meaning, from the fields' metadata, in the sections
    of CONFIG_GROUPS (each in field order)."""
    defaults = Config(model_path="", train_data_path="")
    fields = dataclasses.fields(Config)
    ruled = {rule: ", ".join(f"`{f.name}`" for f in fields if resume_rule(f.name) == rule) for rule in RESUME_RULES}
    ignored = ", ".join(f"`{key}`" for key in IGNORED_KEYS)

    def paragraph(text):
        return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)

    lines = [
        "# Config keys",
        "",
        "<!-- Generated from the Config fields of config.py by `python docs/make_config_reference.py`: "
        "edit them there, then rerun it. -->",
        "",
        paragraph("`run.py --config FILE.json` takes these keys; every published key is accepted unchanged, and an "
                  "unknown key is an error that names the nearest valid one. Defaults are the published values (the "
                  f"4B run). {ignored}, a placeholder of the published code, is accepted and ignored: the launch "
                  "decides the number of processes."),
        "",
        paragraph("Any key can also be given on the command line after the file, `--KEY VALUE` (`python run.py "
                  "--config FILE.json --learning_rate 1e-4 --train_batch_size 8`, also after `run.py` under "
                  "`accelerate launch`): the command line wins over the file, its values are checked as the file's "
                  "and recorded in `output_dir/experiment_id/args.json`. Numbers and strings are given as such, "
                  "booleans as `true` / `false`, lists and objects as JSON text (`--adam_betas '[0.9, 0.98]'`, "
                  "`--lora '{\"r\": 8}'`), and `null` or `none` gives null to a key whose default is null. "
                  "`python run.py --help` lists every key with the first sentence of its meaning."),
        "",
        paragraph(f"Between a checkpoint and its resume, {ruled['free']} may change freely: they decide where "
                  f"outputs go and how often to log, validate and save, not the training. {ruled['fixed']} may not "
                  "(they decide the weights restored, the data split or its order): a resume with one of them "
                  "changed is refused with one line. Every other key takes effect from the resumed step (the lr "
                  "schedule is recomputed with the new learning_rate, warmup_steps, min_lr, train_steps; AdamW takes "
                  "the new weight_decay and betas), listed in a warning. The number of processes and the data must "
                  "stay the same (see [long-runs.md](long-runs.md#resume))."),
    ]
    unplaced = [f.name for f in fields if f.metadata["group"] not in {group for group, _, _ in CONFIG_GROUPS}]
    if unplaced:
        raise ValueError(f"config fields in no section of CONFIG_GROUPS: {', '.join(unplaced)}")
    for group, heading, intro in CONFIG_GROUPS:
        lines += ["", f"## {heading}", "", paragraph(intro), "", "| key | default | meaning |", "| --- | --- | --- |"]
        for f in (f for f in fields if f.metadata["group"] == group):
            default = "required" if f.default is dataclasses.MISSING else json.dumps(getattr(defaults, f.name))
            meaning = f.metadata["help"].replace("|", "\\|")
            if f.metadata.get("see"):
                page = f.metadata["see"].split("#")[0]
                meaning += f" See [{page}]({f.metadata['see']})."
            lines.append(f"| `{f.name}` | {default} | {meaning} |")
    lines += ["", paragraph("[`configs/own_data.json`](../configs/own_data.json) is a starting point for thousands "
                            "of (query, positive) pairs, with or without mined negatives, on one GPU or a CPU (a "
                            "0.6B backbone at learning_rate 1e-4, 3 hard negatives, short warmup, a checkpoint and "
                            "a validation every 50 steps, resume_from latest): set model_path, train_data_path and "
                            "dataset_types (your files' names), or give them on the command line; num_hard_neg 0 "
                            "trains on the pairs alone."),
              "", paragraph("[`configs/demo.json`](../configs/demo.json) is a small example (the demo's); "
                            "[`configs/accelerate_cpu.yaml`](../configs/accelerate_cpu.yaml) runs one CPU process "
                            "without mixed precision."), ""]
    return "\n".join(lines)


def _type_ok(value, typ):
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


class _Overflow:
    """A JSON number literal beyond the range of a float, such as 1e400 (which json reads as Infinity)."""

    def __init__(self, text):
        self.text = text


def _parse_float(text):
    value = float(text)
    return _Overflow(text) if math.isinf(value) else value


def _not_finite(value, where):
    """(where, what) of the first number in `value`, lists and objects searched in order, that is not a
    finite float: NaN, Infinity or -Infinity (Python's JSON reader accepts them), or a number beyond the
    float range; `where` names its position (lora.alpha, adam_betas[1]). None if every number is finite."""
    if isinstance(value, _Overflow):
        return where, f"{value.text}, beyond the range of a float (+-1.8e308)"
    if isinstance(value, float) and not math.isfinite(value):
        return where, "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        return where, f"a number of {len(str(abs(value)))} digits, beyond the range of a float (+-1.8e308)"
    if isinstance(value, dict):
        items = ((f".{k}" if k.isidentifier() else f"[{json.dumps(k)}]", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for step, item in items:
        found = _not_finite(item, where + step)
        if found:
            return found
    return None


def _origin(path, overrides):
    """Where a key's value came from, as an error line names it: `FILE: key 'K'`, or `command line: --K`
    for a key that the command line overrode."""
    return lambda key: f"command line: --{key}" if key in overrides else f"{path}: key '{key}'"


def _validate(cfg, path, overrides=()):
    origin = _origin(path, overrides)

    def bad(key, why):
        raise UserError(f"{origin(key)} {why}")

    for key in ("train_batch_size", "max_seq_length", "train_epochs", "log_interval"):
        if getattr(cfg, key) < 1:
            bad(key, "must be at least 1")
    for key in ("checkpointing_steps", "validation_steps", "warmup_steps", "num_hard_neg", "save_total_limit"):
        if getattr(cfg, key) < 0:
            bad(key, "must be 0 or more")
    if not 0 <= cfg.seed < SEED_LIMIT:
        bad("seed", f"must be between 0 and {SEED_LIMIT - 1} (a numpy seed, 0 <= seed < 2**32), got {cfg.seed}")
    if cfg.max_seq_length < 2:
        bad("max_seq_length", "must be at least 2 (one token of text plus eos)")
    if cfg.train_steps == 0 or cfg.train_steps < -1:
        bad("train_steps", "must be -1 (epochs decide) or a positive number of steps")
    if cfg.learning_rate <= 0:
        bad("learning_rate", f"must be positive, got {cfg.learning_rate:g}")
    for key in ("min_lr", "weight_decay"):
        if getattr(cfg, key) < 0:
            bad(key, "must be 0 or more")
    if cfg.min_lr > cfg.learning_rate:
        bad("min_lr", f"({cfg.min_lr:g}) is above learning_rate ({cfg.learning_rate:g}): the lr, clamped from below "
                      "at min_lr, would stay at min_lr for the whole run; lower min_lr or raise learning_rate")
    for key, names in CHOICES.items():
        if getattr(cfg, key) not in names:
            quoted = [f"'{name}'" for name in names]
            bad(key, f"must be {', '.join(quoted[:-1])} or {quoted[-1]}")
    if cfg.max_bad_steps < 1:
        bad("max_bad_steps", "must be at least 1")
    if cfg.max_grad_norm <= 0:
        bad("max_grad_norm", "must be positive")
    if not cfg.temperature >= MIN_TEMPERATURE:
        bad("temperature", f"must be a positive number of at least {MIN_TEMPERATURE:g} (the logits cos/temperature "
                           f"then stay within +-{1 / MIN_TEMPERATURE:g}; below it the loss and gradient norm grow "
                           f"as 1/temperature), got {cfg.temperature:g}; the default is 0.05")
    if not 0 < cfg.validation_fraction < 1:
        bad("validation_fraction", "must be between 0 and 1")
    if cfg.attention_mask_from == "pad_token_id" and cfg.batch_layout == "packed":
        bad("attention_mask_from", "'pad_token_id' masks pad tokens, which packed batches do not have: "
                                   "set \"batch_layout\": \"padded\" with it")
    if cfg.attn_implementation in ("sdpa_varlen", "eager_varlen") and cfg.batch_layout != "packed":
        bad("attn_implementation", f"'{cfg.attn_implementation}' attends within packed sequence boundaries and "
                                   "ignores masks: use it with \"batch_layout\": \"packed\" only")
    if cfg.grad_cache_chunk_size < 0:
        bad("grad_cache_chunk_size", "must be 0 (off) or a number of sequences per chunk")
    if len(cfg.adam_betas) != 2 or not all(_type_ok(b, float) and 0 <= b < 1 for b in cfg.adam_betas):
        bad("adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    if cfg.num_hard_neg_clustering < -1:
        bad("num_hard_neg_clustering", "must be -1 (same as num_hard_neg) or 0 or more")
    if cfg.eval_queries < 0:
        bad("eval_queries", "must be 0 (off) or more")
    if cfg.min_eval_queries < 0:
        bad("min_eval_queries", "must be 0 (validation_fraction alone) or more")
    if cfg.mrl_dims is not None and (not cfg.mrl_dims or not all(_type_ok(m, int) and m > 0 for m in cfg.mrl_dims)):
        bad("mrl_dims", "must be a list of positive integers, e.g. [64, 128, 256], or null")
    if cfg.negative_columns is not None and cfg.negative_columns < max(cfg.num_hard_neg, cfg.num_hard_neg_clustering):
        bad("negative_columns", f"({cfg.negative_columns}) must be null (all) or at least the negatives a batch draws "
                                f"(num_hard_neg {cfg.num_hard_neg}, num_hard_neg_clustering "
                                f"{cfg.num_hard_neg_clustering})")
    if cfg.false_negative_margin is not None and not cfg.false_negative_margin >= 0:
        bad("false_negative_margin", "must be 0 or more (a cosine similarity margin, e.g. 0.1), or null (off)")
    if cfg.kd_weight < 0:
        bad("kd_weight", "must be 0 or more")
    for name, text in cfg.prompts.items():
        if name not in PROMPT_NAMES or not isinstance(text, str):
            bad("prompts", f"must map 'query' and/or 'document' to a string, got {name!r}: {json.dumps(text)}")
    if cfg.lora is not None:
        for key, value in cfg.lora.items():
            if key not in LORA_KEYS:
                bad("lora", f"has unknown key '{key}'; valid keys: {', '.join(LORA_KEYS)}")
            if not _type_ok(value, LORA_KEYS[key]) and not (key == "target_modules" and value is None):
                bad("lora", f"key '{key}' must be of type {LORA_KEYS[key].__name__}, got {json.dumps(value)}")
        if cfg.lora["r"] < 1 or cfg.lora["alpha"] <= 0 or not 0 <= cfg.lora["dropout"] < 1:
            bad("lora", "needs r >= 1, alpha > 0 and 0 <= dropout < 1")
        targets = cfg.lora["target_modules"]
        if targets is not None and (not targets or not all(isinstance(m, str) for m in targets)):
            bad("lora", "target_modules must be a non-empty list of module names, e.g. [\"q_proj\", \"v_proj\"], "
                        "or null (every linear layer of the backbone)")
    for name, task in cfg.dataset_types.items():
        if task not in TASK_TYPES:
            bad("dataset_types", f"gives dataset '{name}' the type '{task}'; use one of {', '.join(TASK_TYPES)}")
    for i, name in enumerate(cfg.report_to):
        if name not in TRACKERS:
            bad("report_to", unknown_tracker(name))
        if name in cfg.report_to[:i]:
            bad("report_to", f"names '{name}' twice")


def unknown_tracker(name):
    """The error text of a name report_to does not take: the closest tracker, or (none close) every one."""
    if name == "none":
        return "has 'none' beside other trackers: give [] for no tracker"
    if name == "all":
        return ("has 'all', which is not taken (it would log to whichever trackers happen to be installed): name "
                "them, e.g. [\"tensorboard\", \"mlflow\"]")
    close = closest(name, TRACKERS) if isinstance(name, str) else None
    if close:
        return f"has the unknown tracker {json.dumps(name)}; did you mean '{close}'?"
    return f"has the unknown tracker {json.dumps(name)}; valid names: {', '.join(TRACKERS)} ([] for none)"


def closest(name, known):
    """The known name nearest to `name`, or None if none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.72)  # not lr -> lora, save_steps -> train_steps
    return close[0] if close else None


def unknown_key(key, known):
    """The error text of an unknown key: the closest known one, or (none close) every known key."""
    close = closest(key, known)
    if close:
        return f"unknown key '{key}'; did you mean '{close}'?"
    return f"unknown key '{key}'; valid keys: {', '.join(known)} (see docs/config.md)"


def load_config(path, overrides=None):
    """Read a JSON config file into a Config; unknown keys, wrong types and bad values are UserErrors.
    `overrides` ({key: value}, the command line's, see parse_override) replace the file's values before
    any check, so they are checked exactly as the file's keys; errors name them `command line: --KEY`."""
    overrides = dict(overrides or {})
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found: pass --config with a JSON file like configs/config.json")
    try:
        with open(path) as f:
            raw = json.load(f, parse_float=_parse_float)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
    except ValueError as err:  # not UTF-8 text, an integer of over 4300 digits
        raise UserError(f"{path}: not valid JSON ({err})")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must hold one JSON object of config keys")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    raw = {key: value for key, value in {**raw, **overrides}.items() if key not in IGNORED_KEYS}
    origin = _origin(path, overrides)
    for key, value in raw.items():
        if key in REPLACED_KEYS:
            raise UserError(f"{origin(key)} was replaced by {REPLACED_KEYS[key]}")
        if key not in fields:
            raise UserError(f"{'command line' if key in overrides else path}: {unknown_key(key, list(fields))}")
        if found := _not_finite(value, key):
            where, what = found
            held = "is" if where == key else f"has {where} ="
            raise UserError(f"{origin(key)} {held} {what}; give a finite number")
        if value is None and fields[key].default is None:
            continue
        if not _type_ok(value, hints[key]) and not (key == "report_to" and isinstance(value, str)):
            raise UserError(f"{origin(key)} must be of type {hints[key].__name__}, got {json.dumps(value)}")
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in raw]
    if missing:
        raise UserError(f"{path}: missing required key(s) {', '.join(missing)} (in the file, or --KEY VALUE on the "
                        "command line)")
    cfg = Config(**raw)
    _validate(cfg, path, overrides)
    return cfg


# run.py's own options, beside the config keys its command line takes.
# Each is argparse's keyword arguments; ray_train.py passes its own beside --config.
CONFIG_OPTION = {"config": dict(required=True, metavar="FILE",
                                help="JSON config (see configs/config.json and docs/config.md)")}
RUN_OPTIONS = {
    **CONFIG_OPTION,
    "prepare_only": dict(action="store_true", help="build the dataset split cache, then exit"),
    "break_lock": dict(action="store_true",
                       help="take over the run folder's lock even if its holder may still run (see docs/long-runs.md)"),
}
# How a command-line value is read, by the key's type: (metavar, what --help and an error call it).
VALUE_KINDS = {
    int: ("INT", "an integer, e.g. 16"),
    float: ("FLOAT", "a number, e.g. 1e-4"),
    bool: ("true|false", "true or false"),
    str: ("STR", "a string"),
    list: ("JSON", "a JSON list, e.g. '[0.9, 0.98]'"),
    dict: ("JSON", "a JSON object, e.g. '{\"r\": 8}'"),
}
TRUE_WORDS, FALSE_WORDS, NULL_WORDS = ("true", "yes", "1"), ("false", "no", "0"), ("null", "none")


def first_sentence(text):
    """The first sentence of a key's help (a period outside parentheses that ends a sentence, not e.g.'s),
    without Markdown backticks: its line in --help."""
    for match in re.finditer(r"\.(?=\s|$)", text):
        head = text[:match.end()]
        if head.count("(") == head.count(")") and not re.search(r"\b(e\.g|i\.e|etc|vs)\.$", head):
            return head.replace("`", "")
    return text.replace("`", "")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (exit_on_user_error), not usage plus a line
        raise UserError(f"command line: {message} ({self.prog} --help lists the options)")


def run_parser(description=None, prog="run.py", options=None):
    """A training script's command line: its `options` (RUN_OPTIONS for run.py: --config, --prepare_only,
    --break_lock) and --KEY VALUE for every config key (as transformers' HfArgumentParser scripts take
    them), whose values stay text for parse_override; a key not given is absent from the namespace.
    Light: `run.py --help` prints it before torch loads."""
    options = RUN_OPTIONS if options is None else options
    p = _Parser(
        prog=prog, description=description, allow_abbrev=False,
        usage=f"{prog} [-h] {' '.join(_usage(name, kw) for name, kw in options.items())} [--KEY VALUE ...]",
        epilog="Every config key may be given as --KEY VALUE after --config FILE; the command line wins over the "
               "file, and its values are checked as the file's (recorded in output_dir/experiment_id/args.json). "
               "Values: numbers and strings as such, booleans true/false, lists and objects as JSON text "
               "(--adam_betas '[0.9, 0.98]', --lora '{\"r\": 8}'), null or none for a key whose default is null. "
               "Under accelerate launch they go after run.py. Each key in full: docs/config.md.")
    for name, kw in options.items():
        p.add_argument(f"--{name}", **kw)
    hints = typing.get_type_hints(Config)
    defaults = Config(model_path="", train_data_path="")
    for group, heading, _ in CONFIG_GROUPS:
        section = p.add_argument_group(f"config keys: {heading.lower()}")
        for f in dataclasses.fields(Config):
            if f.metadata["group"] != group:
                continue
            metavar, _ = VALUE_KINDS[hints[f.name]]
            default = ("required, in the file or here" if f.default is dataclasses.MISSING
                       else f"default {json.dumps(getattr(defaults, f.name))}")
            kw = dict(nargs="?", const="true") if hints[f.name] is bool else {}
            section.add_argument(f"--{f.name}", metavar=metavar, default=argparse.SUPPRESS, **kw,
                                 help=f"{first_sentence(f.metadata['help'])} [{default}]".replace("%", "%%"))
    return p


def cli_help(description=None, prog="run.py", options=None):
    """The text of `run.py --help` (or of another script's, with its `options`: see run_parser)."""
    return run_parser(description, prog, options).format_help()


def _usage(name, kw):
    if kw.get("action") == "store_true":
        return f"[--{name}]"
    usage = f"--{name} {kw.get('metavar', name.upper())}"
    return usage if kw.get("required") else f"[{usage}]"


def parse_override(key, text):
    """The value of `--KEY TEXT` for config key `key`, read by the key's type: an int or float as a JSON
    number (a float also as Python reads it: nan, inf), a bool from true/false (yes/no, 1/0), a str as
    is, a list or dict as JSON text (a list of names also as name,name); null / none is None for a key
    whose default is None. A value of another type is left for load_config's checks (as the file's);
    text that reads as no value of the type is a UserError naming the option and the type."""
    field_ = {f.name: f for f in dataclasses.fields(Config)}[key]
    typ = typing.get_type_hints(Config)[key]
    word = text.strip().lower()
    if field_.default is None and word in NULL_WORDS:
        return None
    if typ is str:
        return text
    if typ is bool:
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise UserError(f"command line: --{key} expects true or false, got {text!r}")
    if typ is list and re.fullmatch(r"\s*[A-Za-z_][\w-]*(\s*,\s*[A-Za-z_][\w-]*)*\s*", text):
        return [item.strip() for item in text.split(",")]  # --report_to mlflow,tensorboard, as transformers takes it
    try:
        return json.loads(text, parse_float=_parse_float)
    except ValueError as err:
        detail = f" ({err.msg})" if typ in (list, dict) and isinstance(err, json.JSONDecodeError) else ""
        if typ is float:
            try:
                return float(text)
            except ValueError:
                pass
        raise UserError(f"command line: --{key} expects {VALUE_KINDS[typ][1]}, got {text!r}{detail}")


def _attach_negative_numbers(argv):
    """`--KEY -1e-4` as `--KEY=-1e-4`: argparse reads a word that starts with '-' as an option unless it
    is a plain negative integer or decimal (so -1e-4 and -inf would be)."""
    takes_number = {key for key, typ in typing.get_type_hints(Config).items() if typ in (int, float)}
    out = []
    for item in argv:
        if out and out[-1][2:] in takes_number and out[-1].startswith("--") and item.startswith("-"):
            try:
                float(item)
            except ValueError:
                pass
            else:
                out[-1] += f"={item}"
                continue
        out.append(item)
    return out


def parse_run_args(argv=None, description=None, prog="run.py", options=None):
    """A training script's command line (run_parser), parsed: (namespace of its options, {key: value} of
    the config keys given, read by parse_override). An unknown option is a UserError saying the nearest
    known one; so is a stray value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = RUN_OPTIONS if options is None else options
    args, rest = run_parser(description, prog, options).parse_known_args(_attach_negative_numbers(argv))
    for item in rest:
        if not item.startswith("-"):
            raise UserError(f"command line: unexpected value {item!r}: every config key takes one value, "
                            "--KEY VALUE (quote a list or an object: --adam_betas '[0.9, 0.98]')")
        name = item.lstrip("-").split("=", 1)[0]
        if name in IGNORED_KEYS:
            raise UserError(f"command line: --{name} is the launcher's: accelerate launch --{name} N run.py ...")
        if name in REPLACED_KEYS:
            raise UserError(f"command line: --{name} was replaced by {REPLACED_KEYS[name]}")
        raise UserError(f"command line: {unknown_key(name, list(options) + config_keys())}")
    overrides = {key: parse_override(key, getattr(args, key)) for key in config_keys() if hasattr(args, key)}
    for key in overrides:
        delattr(args, key)
    return args, overrides


def resolve_repo_path(path):
    """A relative path that does not exist in the working folder is taken relative to the repository."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_DIR, path)


def load_dataset_types(cfg):
    """Map dataset name -> task type, from `dataset_types_file` plus the config's `dataset_types` overrides."""
    path = resolve_repo_path(cfg.dataset_types_file)
    if not os.path.isfile(path):
        raise UserError(f"dataset_types_file {cfg.dataset_types_file} not found: point the config key "
                        "'dataset_types_file' at a JSON file {task_type: [dataset names]}")
    try:
        with open(path) as f:
            by_type = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})")
    types = {}
    for task, names in by_type.items():
        if task not in TASK_TYPES:
            raise UserError(f"{path}: unknown task type '{task}'; use {', '.join(TASK_TYPES)}")
        types.update({name: task for name in names})
    types.update(cfg.dataset_types)
    return types
