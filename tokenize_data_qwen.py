"""Pre-tokenize F2LLM training data (the v1 layout).

Reads every `*.parquet` of --input_dir (columns `query`, `passage`, `negative_1` ... `negative_n`)
and writes the same file to --output_dir with int-list columns `query_input_ids`,
`passage_input_ids`, `negative_{i}_input_ids` added. Each text: no special tokens, cut to
max_seq_length - 1 tokens, eos appended. Passages and negatives are deduplicated first, so each
unique text is tokenized once, in batches, over a pool of worker processes.
"""
import argparse
import glob
import multiprocessing
import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from data import tokenize
from errors import UserError, exit_on_user_error
from model import load_tokenizer

CHUNK = 1000  # texts per worker task: large enough for batched fast tokenization


def text_columns(schema, path):
    """The text columns of a file, in order: query, passage, negative_1 ... negative_n."""
    names = set(schema.names)
    for required in ("query", "passage"):
        if required not in names:
            raise UserError(f"{path}: no column '{required}'; F2LLM data needs columns query, passage, "
                            "negative_1 ... negative_n")
    negs = []
    for n in names:
        if m := re.fullmatch(r"negative_(\d+)", n):
            if n != f"negative_{int(m.group(1))}":
                raise UserError(f"{path}: column '{n}': name the negatives negative_1 ... negative_n, "
                                "without leading zeros")
            negs.append(int(m.group(1)))
    negs.sort()
    if negs != list(range(1, len(negs) + 1)):
        raise UserError(f"{path}: negative columns must be negative_1 ... negative_n without gaps, found "
                        f"{', '.join(f'negative_{i}' for i in negs)}")
    columns = ["query", "passage"] + [f"negative_{i}" for i in negs]
    for name in columns:
        typ = schema.field(name).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise UserError(f"{path}: column '{name}' has type {typ}; texts must be strings")
    return columns


def check_texts(table, columns, path):
    """Null, empty or whitespace-only texts are an error: nothing is dropped silently."""
    problems = []
    for name in columns:
        col = table.column(name)
        bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
        bad_rows = pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist()
        if bad_rows:
            shown = ", ".join(map(str, bad_rows[:5])) + (", ..." if len(bad_rows) > 5 else "")
            problems.append(f"'{name}' {len(bad_rows)} (rows {shown})")
    if problems:
        raise UserError(f"{path}: null or empty texts in column {'; '.join(problems)}; "
                        f"fill or remove those rows and run again")


_worker_state = {}  # the tokenizer of a pool worker, loaded once per process by _init_worker


def _init_worker(model_path, max_seq_length, threads=True):
    if not threads:  # pool workers already fill the cores: no tokenizer threads on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["tokenizer"] = load_tokenizer(model_path)
    _worker_state["max_seq_length"] = max_seq_length


def make_pool(model_path, max_seq_length, num_proc):
    """Worker processes that each load the tokenizer once; None for num_proc <= 1 (tokenize here)."""
    if num_proc <= 1:
        _init_worker(model_path, max_seq_length)
        return None
    return multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker,
                                                     initargs=(model_path, max_seq_length, False))


def _tokenize_chunk(texts):
    return tokenize(_worker_state["tokenizer"], texts, _worker_state["max_seq_length"])


def tokenize_unique(texts, pool, desc):
    """Tokenize a list of distinct texts through the pool (or in this process if pool is None)."""
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
    ids = []
    with tqdm(total=len(texts), desc=desc, unit="text") as bar:
        for chunk_ids in results:
            ids.extend(chunk_ids)
            bar.update(len(chunk_ids))
    return pa.array(ids, type=pa.list_(pa.int32()))


def tokenize_table(table, columns, pool, desc):
    """Add `{column}_input_ids` for each text column; each distinct text is tokenized once."""
    docs = columns[1:]
    groups = [(["query"], f"{desc} queries"), (docs, f"{desc} passages+negatives")]
    for group, label in groups:
        # string and large_string columns may mix in one file: compare them as large_string
        texts = {name: table.column(name).cast(pa.large_string()) for name in group}
        unique = pc.unique(pa.chunked_array([c for col in texts.values() for c in col.chunks], type=pa.large_string()))
        token_ids = tokenize_unique(unique.to_pylist(), pool, label)
        for name in group:
            index = pc.index_in(texts[name], value_set=unique)
            table = table.append_column(f"{name}_input_ids", token_ids.take(index))
    return table


def write_atomic(table, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="folder with the backbone's tokenizer")
    p.add_argument("--input_dir", required=True, help="folder of raw *.parquet files")
    p.add_argument("--output_dir", required=True, help="where the tokenized files go")
    p.add_argument("--max_seq_length", type=int, default=1024, help="tokens per text, eos included")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer worker processes")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2 (one token of text plus eos)")
    if not os.path.isdir(args.input_dir):
        raise UserError(f"input folder {args.input_dir} not found: pass --input_dir with the raw parquet files")
    files = sorted(glob.glob(os.path.join(args.input_dir, "*.parquet")))
    if not files:
        raise UserError(f"no *.parquet files in {args.input_dir}")
    load_tokenizer(args.model_path)  # fail here, once, rather than in every worker
    os.makedirs(args.output_dir, exist_ok=True)
    pool = make_pool(args.model_path, args.max_seq_length, args.num_proc)
    try:
        for path in files:
            name = os.path.basename(path)[: -len(".parquet")]
            try:
                table = pq.read_table(path)
            except (pa.ArrowException, OSError) as err:
                raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})")
            columns = text_columns(table.schema, path)
            check_texts(table, columns, path)
            table = table.drop_columns([c for c in table.column_names if c.endswith("_input_ids")])
            table = tokenize_table(table, columns, pool, name)
            write_atomic(table, os.path.join(args.output_dir, f"{name}.parquet"))
    finally:
        if pool is not None:
            pool.close()
            pool.join()


if __name__ == "__main__":
    main()
