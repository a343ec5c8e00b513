"""Retrieval evaluation: nDCG@10, MRR@10 and recall@10, per dataset and averaged.

    python evaluate.py CHECKPOINT DATA_DIR [--split validation|all] [--config CONFIG] [--max_queries N]
        [--batch_size 64] [--max_seq_length L]

Each query is ranked against the documents of the rows evaluated with it: every distinct positive
and hard negative among them; its relevant document is its own positive. run.py computes the same
metrics on the validation split at each validation (`retrieval_set`, `retrieval_metrics`); this
script prints them for a checkpoint as a table (`format_table`), and from Python evaluate() returns
them. DATA_DIR holds tokenized files (what tokenize_data_qwen.py writes) or raw ones (query, passage,
negative_i), tokenized here with the checkpoint's tokenizer; both hold out the validation rows by the
rule of data.load_splits, so a raw file and its tokenized copy give the same table.
"""
import argparse
import glob
import os
import tempfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from config import Config, load_config, load_dataset_types
from data import (CorpusRows, as_v2_ids, check_ids, check_texts, check_token_values, check_tokenization_rule,
                  corpus_path, find_datasets, is_text, load_corpus, load_splits, read_schema, rows_of, text_columns,
                  token_columns, tokenize, validation_test_size)
from errors import UserError, exit_on_user_error
from metrics import METRICS, retrieval_metrics, retrieval_set
from model import load_encoder, tokenizer_rule

SPLITS = ("validation", "all")


def format_table(results):
    """{dataset: metrics} (at least one) -> a text table: one row per dataset, then "mean", the
    mean of the datasets' metrics; columns nDCG@10, MRR@10, recall@10."""
    rows = [*results.items(), ("mean", {key: sum(m[key] for m in results.values()) / len(results) for key in METRICS})]
    width = max(len(name) for name in [*results, "dataset", "mean"])
    lines = [f"{'dataset':<{width}}" + "".join(f"  {title:>9}" for title in METRICS.values())]
    lines += [f"{name:<{width}}" + "".join(f"  {m[key]:>9.4f}" for key in METRICS) for name, m in rows]
    return "\n".join(lines)


def evaluate_split(encoder, split, max_queries=None, batch_size=64):
    """The retrieval metrics of an Encoder on a split's first max_queries rows, and the number of
    queries and docs. Token ids outside the model's vocabulary are a UserError."""
    queries, docs, relevant = retrieval_set(split, max_queries)
    vocab = encoder.embedder.backbone.get_input_embeddings().num_embeddings
    lo, hi = min(min(seq) for seq in queries + docs), max(max(seq) for seq in queries + docs)
    if lo < 0 or hi >= vocab:
        raise UserError(f"token id {lo if lo < 0 else hi} outside the model's vocabulary [0, {vocab}): was the data "
                        "tokenized with this checkpoint's tokenizer?")
    scores = encoder.encode_ids(queries, batch_size) @ encoder.encode_ids(docs, batch_size).T
    return retrieval_metrics(scores, relevant), len(queries), len(docs)


def columns_of(path):
    """A file's token columns (a tokenized file) or text columns (a raw one), checked from its footer."""
    num_rows, schema = read_schema(path)
    if "query_input_ids" in schema.names:
        return token_columns(path, 0)
    if num_rows < 2:
        raise UserError(f"{path}: {num_rows} row(s); a dataset needs at least 2 (one for validation)")
    return text_columns(schema, path)


def first_rows(path, columns, n):
    """The first n rows (all if None) of a parquet file's columns, reading no further than needed."""
    batches = []
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        batches.append(batch)
        if n is not None and sum(len(b) for b in batches) >= n:
            break
    return pa.Table.from_batches(batches).slice(0, n)


def resolve_ids(table, columns, path, cfg):
    """Tokenized rows, checked, as v1 token columns: a v2 file's document ids (`*_id` columns) are
    looked up in its corpus, as data.load_splits' splits do."""
    documents = None
    if is_text(table.schema.field(columns[1]).type):  # published v2: string ids into the folder's corpus
        table, columns, documents = as_v2_ids(path, table, columns, cfg.cache_dir)
    check_token_values(table, [c for c in columns if c.endswith("_input_ids")], path)
    id_columns = [c for c in columns if c.endswith("_id")]
    if not id_columns:
        return table
    if documents is None:
        documents = load_corpus(corpus_path(path), cfg)
    check_ids(table, id_columns, len(documents), path)
    return CorpusRows(datasets.Dataset(InMemoryTable(table)), documents).__getitems__(range(table.num_rows))


def tokenize_rows(table, columns, tokenizer, max_seq_length, special_tokens=False):
    """Raw text columns -> the token columns `{column}_input_ids` tokenize_data_qwen.py would write
    (special_tokens: an encoder's rule, see data.tokenize)."""
    texts = sorted({t for c in columns for t in table.column(c).to_pylist()})
    ids = dict(zip(texts, tokenize(tokenizer, texts, max_seq_length, special_tokens)))
    return pa.table({f"{c}_input_ids": pa.array([ids[t] for t in table.column(c).to_pylist()], pa.list_(pa.int32()))
                     for c in columns})


def eval_rows(path, columns, cfg, split, max_queries, tokenizer, max_seq_length, special_tokens=False):
    """The rows of a file to evaluate, as a split with token columns: `validation`, the rows
    data.load_splits holds out of a retrieval dataset (same seed, validation_fraction and
    min_eval_queries), in its order; `all`, the file's
    rows in order. At most the first max_queries (None: all). Raw files are tokenized here, with the
    checkpoint's rule (special_tokens: an encoder's)."""
    raw = columns[0] == "query"
    if split == "validation":
        if raw:
            table = pq.read_table(path, columns=columns)
            check_texts(table, columns, path)
            # data.load_splits' split rule: it depends on the number of rows only
            test_size = validation_test_size(table.num_rows, cfg.validation_fraction, cfg.min_eval_queries)
            held_out = datasets.Dataset(InMemoryTable(table)).train_test_split(test_size=test_size,
                                                                               seed=cfg.seed)["test"]
        else:
            held_out = load_splits(path, columns, cfg, cfg.min_eval_queries)[1]
        table = rows_of(held_out).__getitems__(range(min(max_queries or len(held_out), len(held_out))))
    else:
        table = first_rows(path, columns, max_queries)
        if raw:
            check_texts(table, columns, path)
        else:
            table = resolve_ids(table, columns, path, cfg)
    if raw:
        table = tokenize_rows(table, columns, tokenizer, max_seq_length, special_tokens)
    return datasets.Dataset(InMemoryTable(table))


def eval_config(config, checkpoint, data_dir, cache_dir):
    """The config that decides the split (seed, validation_fraction), cache_dir, eval_queries and dataset
    types: the file `config`'s, else the defaults with a temporary cache_dir."""
    if config:
        return load_config(config)
    return Config(model_path=checkpoint, train_data_path=data_dir, cache_dir=cache_dir)


def check_options(split, max_queries, batch_size, max_seq_length):
    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if max_queries is not None and max_queries < 0:
        raise UserError(f"--max_queries {max_queries}: must be 0 (all) or a number of queries")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError(f"--max_seq_length {max_seq_length}: must be at least 2 (one token of text plus eos)")


def check_folders(checkpoint, data_dir):
    if not os.path.isdir(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found: pass a checkpoint folder (output_dir/experiment_id/"
                        "step_N or epoch_N) or a backbone folder with its tokenizer")
    if not os.path.isdir(data_dir):
        raise UserError(f"DATA_DIR {data_dir} not found: pass a folder of *.parquet files")
    if not glob.glob(os.path.join(data_dir, "*.parquet")):
        raise UserError(f"DATA_DIR {data_dir} holds no *.parquet files: pass a folder of tokenized or raw "
                        "F2LLM-format files (query, passage, negative_i)")


def evaluate(checkpoint, data_dir, *, split="validation", config=None, max_queries=None, batch_size=64,
             max_seq_length=None):
    """{dataset: metrics} of a checkpoint on every retrieval dataset of data_dir (other task types are
    skipped), with one line per dataset on stdout. The keyword arguments are the command line's flags,
    with its defaults; max_queries None: the config's eval_queries, 0: all. Bad input is a UserError
    (every file is checked before the model loads)."""
    check_options(split, max_queries, batch_size, max_seq_length)
    check_folders(checkpoint, data_dir)
    with tempfile.TemporaryDirectory() as cache_dir:
        cfg = eval_config(config, checkpoint, data_dir, cache_dir)
        types = load_dataset_types(cfg)
        # 0 caps nothing (in a training config, eval_queries 0 turns the metrics off; here they are the point)
        max_queries = (cfg.eval_queries if max_queries is None else max_queries) or None
        special_tokens = tokenizer_rule(checkpoint)
        planned = []
        for name, path in find_datasets(data_dir):
            columns = columns_of(path)  # every file checked before the model loads
            task = types.get(name, "retrieval")
            if task == "retrieval":
                if columns[0] != "query":  # tokenized: by the checkpoint's rule
                    check_tokenization_rule(path, special_tokens)
                planned.append((name, path, columns))
            else:
                print(f"skip {name}: a {task} dataset (only retrieval datasets are evaluated)")
        if not planned:
            raise UserError(f"DATA_DIR {data_dir} holds no retrieval dataset (see configs/dataset_types.json "
                            "and the config's dataset_types)")
        encoder = load_encoder(checkpoint, max_seq_length=max_seq_length)
        results = {}
        for name, path, columns in planned:
            rows = eval_rows(path, columns, cfg, split, max_queries, encoder.tokenizer, encoder.max_seq_length,
                             encoder.special_tokens)
            try:
                results[name], num_queries, num_docs = evaluate_split(encoder, rows, max_queries, batch_size)
            except UserError as err:
                raise UserError(f"{path}: {err}") from None
            print(f"{name}: {num_queries} queries ({split} rows) ranked against {num_docs} documents")
    return results


def parse_args(argv=None):
    """The arguments given, by evaluate's names: the flags left out take its defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    p.add_argument("checkpoint", help="a checkpoint folder (or any backbone folder with its tokenizer)")
    p.add_argument("data_dir", help="folder of *.parquet files, tokenized (tokenize_data_qwen.py) or raw (query, "
                                    "passage, negative_i); one dataset per file")
    p.add_argument("--config", help="training config: its seed, validation_fraction, cache_dir, eval_queries and "
                                    "dataset types are used (default: the Config defaults, a temporary cache)")
    p.add_argument("--split", choices=SPLITS,
                   help="validation: the rows training held out for validation (default); all: every row")
    p.add_argument("--max_queries", type=int, help="queries per dataset: its first N rows of the split; 0: all "
                                                   "(default: the config's eval_queries, 1000)")
    p.add_argument("--batch_size", type=int, help="sequences per forward pass (default 64)")
    p.add_argument("--max_seq_length", type=int, help="tokens per sequence (default: the checkpoint's, else 1024)")
    return p.parse_args(argv)


@exit_on_user_error(interrupted="interrupted: evaluate writes no results file (only the cache of the data it "
                                 "read), so nothing is half-written; run the same command again")
def main(argv=None):
    print(format_table(evaluate(**vars(parse_args(argv)))))


if __name__ == "__main__":
    main()
