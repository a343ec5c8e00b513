"""Tokenized datasets, the collate of one homogeneous batch, and the multi-dataset loader.

Three tokenized layouts (tokenize_data_qwen.py --layout): v1, one file per dataset with token columns
query_input_ids, passage_input_ids, negative_{i}_input_ids; v2 (F2LLM-v2), one query file per
dataset whose columns passage_id, negative_{i}_id hold ids into its corpus `corpus/NAME.parquet`
(doc_id, input_ids); published_v2, the published v2 script's `NAME_query.parquet` files whose
passage_input_ids, negative_{i}_input_ids hold string document ids of one corpus for the folder
(`corpus.parquet`, or the `NAME_corpus.parquet` files it is concatenated from). A published_v2 file
is turned into a v2 one (integer ids into the folder's corpus, cached under cache_dir) and a v2
split resolves the ids per batch, so everything past load_splits sees v1 token columns.

Every batch holds rows of one dataset only. Sequence order in a batch: the bs queries, the bs
positives, then each query's k hard negatives in turn (see loss.split_embeddings). A batch is
flat token ids plus per-sequence lengths; the model packs or pads it (model.Embedder).

The raw format is checked here too (text_columns, check_texts: string columns query, passage,
negative_1 ... negative_n of UTF-8 text, none blank), next to the tokenized columns it turns into:
tokenizing, mining and evaluation all read raw files, and what a file must hold is a rule of the data,
not of reading and writing files (files.py).
"""
import dataclasses
import functools
import glob
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from errors import UserError
from files import row_group_rows, stored_record, unreadable


QUERY_SUFFIX, CORPUS_SUFFIX, CORPUS_FILE = "_query.parquet", "_corpus.parquet", "corpus.parquet"


def find_datasets(data_path):
    """[(name, path)] of the datasets in data_path: each `*.parquet` file, named by its file name; in a
    folder of the published v2 layout, each `NAME_query.parquet`, named NAME."""
    if not os.path.isdir(data_path):
        raise UserError(f"train_data_path {data_path} not found: point it at the folder that "
                        "tokenize_data_qwen.py wrote")
    paths = sorted(glob.glob(os.path.join(data_path, "*.parquet")))
    if not paths:
        raise UserError(f"train_data_path {data_path} holds no *.parquet files: run tokenize_data_qwen.py "
                        "and point train_data_path at its --output_dir")
    if not published_corpus_files(data_path):
        return [(os.path.basename(p)[: -len(".parquet")], p) for p in paths]
    for p in paths:
        if not (p.endswith(QUERY_SUFFIX) or p.endswith(CORPUS_SUFFIX) or os.path.basename(p) == CORPUS_FILE):
            raise UserError(f"{p}: train_data_path is in the published v2 layout (NAME_query.parquet files and "
                            f"their corpus), where this file is no dataset; move it out of {data_path}")
    return [(os.path.basename(p)[: -len(QUERY_SUFFIX)], p) for p in paths if p.endswith(QUERY_SUFFIX)]


def holds_raw_files(data_path):
    """True if data_path's parquet files hold texts (`query`, `passage` string columns, no token ids),
    as tokenize_data_qwen.py reads them; False for tokenized files (or no folder: find_datasets says
    what is wrong). A folder must not mix the two."""
    paths = sorted(glob.glob(os.path.join(data_path, "*.parquet"))) if os.path.isdir(data_path) else []
    raw = {}
    for path in paths:
        names = set(read_schema(path)[1].names)
        raw[path] = {"query", "passage"} <= names and not names & {"query_input_ids", "passage_input_ids"}
    if len(set(raw.values())) > 1:
        texts = [os.path.basename(p) for p, r in raw.items() if r]
        raise UserError(f"train_data_path {data_path} mixes raw files ({', '.join(texts[:3])}) with tokenized "
                        "ones; keep one kind per folder")
    return any(raw.values())


def published_corpus_files(data_path):
    """The corpus of a folder in the published v2 layout: `corpus.parquet` if there is one (what the
    published run.py reads), else the `NAME_corpus.parquet` files the published README concatenates
    into it; [] when the folder is in another layout (no `*_query.parquet` beside a corpus)."""
    if not glob.glob(os.path.join(data_path, "*" + QUERY_SUFFIX)):
        return []
    single = os.path.join(data_path, CORPUS_FILE)
    return [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(data_path, "*" + CORPUS_SUFFIX)))


def negatives_key(task_type, cfg):
    """The config key that sets a task type's hard negatives per query (None: classification, always 1)."""
    if task_type == "classification":
        return None
    if task_type == "clustering" and cfg.num_hard_neg_clustering >= 0:
        return "num_hard_neg_clustering"
    return "num_hard_neg"


def num_negatives_needed(task_type, cfg):
    """Hard negatives per query: 1 for classification (binary labels: the other label), else the
    task type's key (clustering: num_hard_neg_clustering, F2LLM-v2; -1 falls back to num_hard_neg)."""
    key = negatives_key(task_type, cfg)
    return 1 if key is None else getattr(cfg, key)


def task_type_of(name, dataset_types, path):
    if name not in dataset_types:
        raise UserError(f"{path}: unknown dataset '{name}'; declare its task type in the config, e.g. "
                        f'"dataset_types": {{"{name}": "retrieval"}} (or classification, clustering)')
    return dataset_types[name]


def corpus_path(path):
    """The v2 corpus of the query file `DIR/NAME.parquet`: `DIR/corpus/NAME.parquet` (out of the
    training side's `*.parquet` glob)."""
    return os.path.join(os.path.dirname(path), "corpus", os.path.basename(path))


def read_schema(path):
    """(row count, Arrow schema) from a parquet footer, with unique column names."""
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except Exception as err:  # pyarrow raises several types for a broken file
        raise unreadable(path, err) from None
    if len(set(schema.names)) != len(schema.names):
        twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
        raise UserError(f"{path}: column name(s) {twice} appear more than once; keep one of each")
    return metadata.num_rows, schema


def is_token_list(typ):
    return (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)


def token_columns(path, needed_negatives, key="num_hard_neg"):
    """The columns a dataset file must have, each checked for type, in order query, passage, negatives
    (at least the needed ones): v1 `*_input_ids` lists of token ids, or v2 `query_input_ids` plus
    integer document ids `passage_id`, `negative_{i}_id` with a well-formed corpus file. At least 2
    rows (one for validation). Reads footers only. `key` is the config key the error names."""
    num_rows, schema = read_schema(path)
    if num_rows < 2:
        raise UserError(f"{path}: {num_rows} row(s); a dataset needs at least 2 (one for validation)")
    names = set(schema.names)
    if "query_input_ids" not in names:
        raise UserError(f"{path}: no column 'query_input_ids'; tokenize the raw data with tokenize_data_qwen.py first")
    if "passage_input_ids" in names:
        suffix = "_input_ids"
    elif "passage_id" in names:
        suffix = "_id"
    else:
        raise UserError(f"{path}: no column 'passage_input_ids' (v1 layout) or 'passage_id' (v2 layout); tokenize "
                        "the raw data with tokenize_data_qwen.py")
    n = negative_count(path, names, suffix)
    if n < needed_negatives:
        fix = f"lower {key} or add negatives" if key else "add a negative_1 column (the other label)"
        if n == 0 and key == "num_hard_neg":
            fix = ("set num_hard_neg 0 to train on the pairs alone (in-batch negatives), or add negatives "
                   "(mine_negatives.py mines them; docs/own-data.md)")
        have = f"negative_1 ... negative_{n}" if n else f"no negative_1{suffix} column"
        raise UserError(f"{path}: {n} hard negatives per row ({have}), fewer than the "
                        f"{needed_negatives} the config asks for; {fix}")
    columns = ["query_input_ids", f"passage{suffix}"] + [f"negative_{i}{suffix}" for i in range(1, n + 1)]
    if is_text(schema.field("passage_input_ids").type if suffix == "_input_ids" else pa.null()):
        return published_v2_columns(path, schema, columns)
    for col in columns:
        typ = schema.field(col).type
        if col.endswith("_input_ids") and not is_token_list(typ):
            raise UserError(f"{path}: column '{col}' is {typ}, not a list of token ids; tokenize the raw data "
                            "with tokenize_data_qwen.py")
        if col.endswith("_id") and not pa.types.is_integer(typ):
            raise UserError(f"{path}: column '{col}' is {typ}, not integer document ids; re-run "
                            "tokenize_data_qwen.py --layout v2")
    if suffix == "_id":
        check_corpus_columns(path)
    return columns


def negative_count(path, names, suffix):
    """How many negative columns `negative_{i}{suffix}` a file has, numbered 1 ... n. A gap or a leading
    zero is an error: counting up to the first gap would drop the columns after it without a word."""
    numbers = []
    for name in names:
        if m := re.fullmatch(rf"negative_(\d+){re.escape(suffix)}", name):
            if m.group(1) != str(int(m.group(1))):
                raise UserError(f"{path}: column '{name}': name the negatives negative_1{suffix} ... "
                                f"negative_n{suffix}, without leading zeros")
            numbers.append(int(m.group(1)))
    numbers.sort()
    for i, number in enumerate(numbers, start=1):
        if number != i:
            raise UserError(f"{path}: no column 'negative_{i}{suffix}', but there is 'negative_{number}{suffix}': "
                            f"the negative columns must be numbered from 1 without gaps (negative_1{suffix}, "
                            f"negative_2{suffix}, ...); rename them, or tokenize the raw data again with "
                            "tokenize_data_qwen.py")
    return len(numbers)


def is_text(typ):
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def id_column(column):
    """The v2 name of a published v2 document column: `X_input_ids` (string ids) -> `X_id`."""
    return column[: -len("_input_ids")] + "_id"


def as_v2_ids(path, table, columns, cache_dir, cached=False):
    """A published v2 query file's rows as v2 rows: (the table, or with `cached` the path of its
    twin under cache_dir; the v2 columns; the folder corpus's token lists)."""
    corpus = published_corpus(tuple(published_corpus_files(os.path.dirname(path))), cache_dir)
    rows = corpus.integer_ids(path, table, columns, cache_dir) if cached else corpus.id_table(table, columns, path)
    return rows, columns[:1] + [id_column(c) for c in columns[1:]], corpus.documents


def published_v2_columns(path, schema, columns):
    """token_columns of a published v2 query file: query_input_ids token lists, string document ids
    in the others, and a folder corpus with string `doc_id` and `input_ids` token lists."""
    if not is_token_list(schema.field("query_input_ids").type):
        raise UserError(f"{path}: column 'query_input_ids' is {schema.field('query_input_ids').type}, not a list of "
                        "token ids; tokenize the raw data with tokenize_data_qwen.py")
    for col in columns[1:]:
        if not is_text(schema.field(col).type):
            raise UserError(f"{path}: column '{col}' is {schema.field(col).type}, but passage_input_ids holds string "
                            "document ids (the published v2 layout): every document column must; re-run "
                            "tokenize_data_qwen.py --layout published_v2")
    corpus = published_corpus_files(os.path.dirname(path))
    if not corpus:
        raise UserError(f"{path}: its string document ids need the folder's corpus.parquet (or NAME_corpus.parquet "
                        "files), which is missing; re-run tokenize_data_qwen.py --layout published_v2")
    for file in corpus:
        check_corpus_schema(file, is_text, "string document ids", "published_v2")
    return columns


def check_corpus_columns(path):
    """A v2 query file's corpus exists, with an integer `doc_id` and an `input_ids` list of token ids."""
    corpus = corpus_path(path)
    if not os.path.isfile(corpus):
        raise UserError(f"{path}: its corpus {corpus} is missing; re-run tokenize_data_qwen.py --layout v2")
    check_corpus_schema(corpus, pa.types.is_integer, "integer ids", "v2")


def check_corpus_schema(corpus, is_id, id_type, layout):
    """A corpus file's `doc_id` (`is_id` of its type, described as `id_type`) and `input_ids` token lists."""
    _, schema = read_schema(corpus)
    for col, ok, what in (("doc_id", is_id, id_type), ("input_ids", is_token_list, "a list of token ids")):
        if col not in schema.names:
            raise UserError(f"{corpus}: no column '{col}'; re-run tokenize_data_qwen.py --layout {layout}")
        if not ok(schema.field(col).type):
            raise UserError(f"{corpus}: column '{col}' is {schema.field(col).type}, not {what}; re-run "
                            f"tokenize_data_qwen.py --layout {layout}")


def rows_shown(rows):
    """The first few row numbers, for an error message."""
    return ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")


def text_columns(schema, path):
    """The text columns of a raw file, in order: query, passage, negative_1 ... negative_n."""
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
        check_text_type(schema, name, path)
    return columns


def check_text_type(schema, name, path):
    typ = schema.field(name).type
    if not is_text(typ):
        raise UserError(f"{path}: column '{name}' has type {typ}; texts must be strings")


class FirstRows:
    """Rows with a problem: how many, and the first six (rows_shown shows five, then "..." if there are more)."""

    def __init__(self):
        self.count, self.first = 0, []

    def add(self, rows):
        self.count += len(rows)
        self.first += rows[: 6 - len(self.first)].tolist()


def invalid_utf8(chunk):
    """The rows of a string array whose bytes are not UTF-8. Parquet readers do not validate them: such a
    text reads without error and would fail later, deep in Arrow's string kernels."""
    try:
        chunk.validate(full=True)
        return np.empty(0, np.int64)
    except pa.ArrowInvalid:
        raws = chunk.cast(pa.large_binary()).to_pylist()  # no validation on this cast
        return np.array([i for i, raw in enumerate(raws) if raw is not None and not is_utf8(raw)], np.int64)


def is_utf8(raw):
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def blank(chunk):
    """The rows of a string array that are null, empty or whitespace only."""
    bad = pc.or_kleene(pc.is_null(chunk), pc.equal(pc.utf8_trim_whitespace(chunk), ""))
    return pc.indices_nonzero(pc.fill_null(bad, True)).to_numpy().astype(np.int64)


def check_text_chunks(columns, path):
    """Text that is not UTF-8, null, empty or whitespace-only is an error: nothing is dropped silently.
    `columns`: (name, its string arrays in row order) pairs; the errors name the rows by their position."""
    blanks = []
    for name, chunks in columns:
        not_utf8, empty, offset = FirstRows(), FirstRows(), 0
        for chunk in chunks:
            not_utf8.add(offset + invalid_utf8(chunk))
            if not not_utf8.count:  # the whitespace kernel needs valid UTF-8, and this column fails anyway
                empty.add(offset + blank(chunk))
            offset += len(chunk)
        if not_utf8.count:
            raise UserError(f"{path}: column '{name}' has {not_utf8.count} text(s) that are not valid UTF-8 "
                            f"(rows {rows_shown(not_utf8.first)}); write the file with UTF-8 strings and run again")
        if empty.count:
            blanks.append(f"'{name}' {empty.count} (rows {rows_shown(empty.first)})")
    if blanks:
        raise UserError(f"{path}: null or empty texts in column {'; '.join(blanks)}; "
                        f"fill or remove those rows and run again")


def check_texts(table, columns, path):
    """check_text_chunks on a table in memory."""
    check_text_chunks(((name, table.column(name).chunks) for name in columns), path)


def check_token_values(table, columns, path):
    """Every token list present and non-empty, with no null id: cheap (offsets and validity bitmaps
    only); the id range is check_token_range's."""
    for col in columns:
        lists = table.column(col)
        if lists.null_count:
            rows = np.flatnonzero(lists.is_null().to_numpy(zero_copy_only=False))
            raise UserError(f"{path}: column '{col}' has {lists.null_count} null token list(s) (rows "
                            f"{rows_shown(rows)}); re-tokenize the file")
        lengths = np.asarray(pc.list_value_length(lists), dtype=np.int64)
        if (lengths == 0).any():
            raise UserError(f"{path}: column '{col}' has {(lengths == 0).sum()} empty token list(s) (rows "
                            f"{rows_shown(np.flatnonzero(lengths == 0))}); every text needs at least its eos token")
        if pc.list_flatten(lists).null_count:
            raise UserError(f"{path}: column '{col}' has null token ids inside its lists; re-tokenize the file")


# collate casts token ids to int32, the widest a token id needs
INT32_LIMIT = 2**31


def check_token_range(table, columns, path, vocab_size):
    """Every token id within [0, vocab_size) (vocab_size None: within int32), at preparation: collate's
    check sees only the ids it keeps, so an id past max_seq_length, in a negative never drawn or in a
    validation split never run would go unseen, and any other stops a run hours in. One min_max per
    column over the flat ids; the rows are looked for only when it fails."""
    limit = vocab_size or INT32_LIMIT
    for col in columns:
        lists = table.column(col)
        lo, hi = (v.as_py() for v in pc.min_max(pc.list_flatten(lists)).values())
        if lo is None or (lo >= 0 and hi < limit):
            continue
        rows, first, offset = FirstRows(), None, 0
        for chunk in lists.chunks:
            ids = np.asarray(pc.list_flatten(chunk), dtype=np.int64)
            bad = (ids < 0) | (ids >= limit)
            if bad.any():
                parents = np.asarray(pc.list_parent_indices(chunk), dtype=np.int64)[bad]
                first = int(ids[bad][0]) if first is None else first
                rows.add(offset + np.unique(parents))
            offset += len(chunk)
        where = f"row {rows.first[0]}" if rows.count == 1 else f"{rows.count} rows: {rows_shown(rows.first)}"
        if vocab_size:
            raise UserError(f"{path}: column '{col}' holds token id {first} ({where}), outside the vocabulary of "
                            f"model_path (vocabulary size {vocab_size}, ids 0 ... {vocab_size - 1}): the data was "
                            "not tokenized with this model's tokenizer; tokenize the raw data again with "
                            "tokenize_data_qwen.py --model_path set to this model_path")
        raise UserError(f"{path}: column '{col}' holds token id {first} ({where}), which no tokenizer gives (ids "
                        f"are 0 ... {INT32_LIMIT - 1}); tokenize the raw data again with tokenize_data_qwen.py "
                        "--model_path set to this model_path")


def long_sequences(table, columns, max_seq_length):
    """[(column, how many of its token lists are longer than max_seq_length, the first such row)] of
    the columns that have any; from the list offsets only."""
    out = []
    for col in columns:
        longer = np.asarray(pc.greater(pc.list_value_length(table.column(col)), max_seq_length))
        if longer.any():
            out.append((col, int(longer.sum()), int(longer.argmax())))
    return out


def warn_long_sequences(path, found, num_rows, max_seq_length):
    """One warning line for a file's long_sequences: not an error, since data tokenized at a larger
    length than the run's is a legitimate choice, but a cut that was perhaps not meant."""
    if not found:
        return
    shown = "; ".join(f"column '{col}' {count} of {num_rows} (first row {row})" for col, count, row in found[:3])
    more = f"; and {len(found) - 3} more column(s)" if len(found) > 3 else ""
    print(f"warning: {path}: sequences longer than max_seq_length {max_seq_length}: {shown}{more}; they are "
          f"cut to {max_seq_length} tokens, keeping the closing token (tokenize at --max_seq_length "
          f"{max_seq_length}, or raise max_seq_length, to train on the whole texts)", file=sys.stderr, flush=True)


def first_process():
    """Whether this is a launch's first process (or no launch): the checks that read every token id
    run there only, once per launch rather than once per process; the others wait for it."""
    return os.environ.get("RANK", "0") == "0"


def check_token_lists(table, columns, path, cfg, vocab_size):
    """check_token_values, check_token_range, and the warning for sequences that training will cut."""
    check_token_values(table, columns, path)
    if not first_process():
        return
    check_token_range(table, columns, path, vocab_size)
    warn_long_sequences(path, long_sequences(table, columns, cfg.max_seq_length), table.num_rows, cfg.max_seq_length)


def read_dataset(path, cache_dir):
    """A parquet file (or a list of them, concatenated) as a memory-mapped `datasets` Dataset, cached
    under cache_dir."""
    import datasets  # here, not at the top: tokenize_data_qwen and its workers import this module for the
    # tokenizer recipe, and `datasets` (with pandas) is ~0.5 s of each one's start-up
    import pyarrow.dataset as pds
    from datasets.packaged_modules.parquet.parquet import ParquetConfig

    # datasets reads through Arrow's scanner, whose pre_buffer (on by default) keeps every row group of the
    # file in memory until the end of the conversion: memory in the file's size (e.g. 840 instead of 265 MB
    # for a 650 MB file). Versions without the option get none (older ones read with ParquetFile, which
    # does not pre-buffer).
    options = ({"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}
               if "fragment_scan_options" in {f.name for f in dataclasses.fields(ParquetConfig)} else {})
    check_cache_dir(cache_dir)
    try:
        return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache_dir, **options)
    except Exception as err:  # a corrupt page surfaces here, under several exception types
        cause = err.__cause__ or err
        if in_cache_dir(cause, cache_dir):  # a full disk, say: the data file is not to blame
            raise UserError(f"cache_dir {cache_dir}: cannot write the split cache ({cause}); free space there or "
                            "set cache_dir to a writable folder") from None
        label = path if isinstance(path, str) else " + ".join(path)
        raise UserError(f"{label}: cannot be read ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
                        "re-tokenize or re-download it")


def check_cache_dir(cache_dir):
    """cache_dir is a folder this process can write (made if missing): a probe file rather than
    os.access, which says yes to root on a read-only folder. Otherwise `datasets` fails deep inside
    with an error that reads like the data file's."""
    if cache_dir is None:
        return
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        why = "a file" if os.path.isfile(cache_dir) else err.strerror or err
        raise UserError(f"cache_dir {cache_dir} is not a writable folder ({why}): make it writable, "
                        "or set cache_dir to a folder that this user can write") from None


def in_cache_dir(err, cache_dir):
    """Whether err is an OSError on a path under cache_dir."""
    name = getattr(err, "filename", None) if isinstance(err, OSError) else None
    if not cache_dir or not isinstance(name, str):
        return False
    root = os.path.abspath(cache_dir)
    return os.path.commonpath([root, os.path.abspath(name)]) == root


def check_ids(table, columns, num_docs, path):
    """Every document id present and within [0, num_docs), whole columns at a time."""
    for col in columns:
        ids = table.column(col)
        if ids.null_count:
            rows = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))
            raise UserError(f"{path}: column '{col}' has {ids.null_count} null document id(s) (rows "
                            f"{rows_shown(rows)}); re-run tokenize_data_qwen.py --layout v2")
        lo, hi = (v.as_py() for v in pc.min_max(ids).values())
        if lo < 0 or hi >= num_docs:
            values = ids.to_numpy()
            bad = np.flatnonzero((values < 0) | (values >= num_docs))
            raise UserError(f"{path}: column '{col}' has {len(bad)} id(s) outside the corpus's [0, {num_docs}) "
                            f"(rows {rows_shown(bad)}, e.g. {values[bad[0]]}); re-run tokenize_data_qwen.py "
                            "--layout v2")


def load_corpus(path, cfg):
    """A v2 corpus's `input_ids` column (memory-mapped), after checking doc_id == row position and
    the token lists."""
    corpus = read_dataset(path, cfg.cache_dir).data.table
    start = 0
    for chunk in corpus.column("doc_id").chunks:  # chunk by chunk: no corpus-sized copies
        if chunk.null_count or not np.array_equal(chunk.to_numpy(), np.arange(start, start + len(chunk))):
            raise UserError(f"{path}: column 'doc_id' is not the row position 0 ... {corpus.num_rows - 1}, which "
                            "the query file's ids point at; re-run tokenize_data_qwen.py --layout v2")
        start += len(chunk)
    check_token_values(corpus, ["input_ids"], path)
    return corpus.column("input_ids")


def validation_size(num_rows, fraction, minimum=0):
    """The validation split's size: datasets' ceil(fraction x rows), raised to `minimum` rows
    (min_eval_queries of a retrieval dataset) but to at most half the rows, so that training keeps
    the other half."""
    share = -(-round(num_rows * fraction * 1e9) // 10**9)  # ceil, robust to float noise as datasets'
    return max(share, min(minimum, num_rows // 2))


def validation_test_size(num_rows, fraction, minimum=0):
    """train_test_split's test_size for validation_size's rows: the fraction itself where the minimum
    does not raise it (so that datasets splits as it always did), else the row count."""
    size = validation_size(num_rows, fraction, minimum)
    return fraction if size == validation_size(num_rows, fraction) else size


def load_splits(path, columns, cfg, min_rows=0):
    """The dataset's train / validation split (seeded), cached under cfg.cache_dir; the validation
    split holds validation_size(rows, validation_fraction, min_rows) rows. A v2 query file
    (columns from token_columns) is split exactly like its v1 file, and each split comes as
    CorpusRows, which resolves the document ids from the corpus; a published v2 file is first
    replaced by its v2 twin (PublishedCorpus.integer_ids), whose rows are the same in the same order."""
    ds = read_dataset(path, cfg.cache_dir)
    documents = None
    if is_text(ds.data.schema.field(columns[1]).type):
        twin, columns, documents = as_v2_ids(path, ds.data.table, columns, cfg.cache_dir, cached=True)
        ds = read_dataset(twin, cfg.cache_dir)
    from model import config_vocab_size  # here: model imports this module

    vocab_size = config_vocab_size(cfg.model_path)
    id_columns = [c for c in columns if c.endswith("_id")]
    check_token_lists(ds.data, [c for c in columns if c.endswith("_input_ids")], path, cfg, vocab_size)
    if id_columns:
        if documents is None:
            documents = load_corpus(corpus_path(path), cfg)
            check_documents(documents, corpus_path(path), cfg, vocab_size)
        else:
            published_corpus(tuple(published_corpus_files(os.path.dirname(path))), cfg.cache_dir).check(cfg, vocab_size)
        check_ids(ds.data, id_columns, len(documents), path)
    split = ds.select_columns(columns).train_test_split(
        test_size=validation_test_size(len(ds), cfg.validation_fraction, min_rows), seed=cfg.seed)
    if documents is None:
        return split["train"], split["test"]
    return CorpusRows(split["train"], documents), CorpusRows(split["test"], documents)


def check_documents(documents, path, cfg, vocab_size):
    """check_token_lists on a corpus's `input_ids` (a ChunkedArray)."""
    if not first_process():
        return
    table = pa.table({"input_ids": documents})
    check_token_range(table, ["input_ids"], path, vocab_size)
    warn_long_sequences(path, long_sequences(table, ["input_ids"], cfg.max_seq_length), table.num_rows,
                        cfg.max_seq_length)


@functools.lru_cache(maxsize=1)
def published_corpus(paths, cache_dir):
    """The PublishedCorpus of a folder, read once per process for all its datasets."""
    return PublishedCorpus(paths, cache_dir)


def id_stems(ids):
    """Each id without a trailing `_NUMBER`: the dataset name of a published id "NAME_i"."""
    return pc.replace_substring_regex(ids, pattern=r"_[0-9]+$", replacement="")


class PublishedCorpus:
    """The one corpus of a folder in the published v2 layout: string `doc_id`, `input_ids` token
    lists, from `paths` (corpus.parquet, or the NAME_corpus.parquet files, concatenated in order).

    The published run.py maps each id through a Python dict of the whole corpus, built in every
    process at every start. Here each query file's ids become integer positions into the corpus
    once, in a parquet file under cache_dir (the file's "v2 twin", kept while the query file and
    the corpus are unchanged), so training reads them like v2 ids. The lookup groups the corpus by
    the id's stem (the published ids are "NAME_i": the stem is the dataset name), so each dataset
    searches its own documents only; ids of any other form work too, in a larger search.
    """

    def __init__(self, paths, cache_dir):
        self.paths = list(paths)
        self.label = self.paths[0] if len(self.paths) == 1 else f"{os.path.dirname(self.paths[0])}/*{CORPUS_SUFFIX}"
        table = read_dataset(self.paths, cache_dir).data.table
        check_token_values(table, ["input_ids"], self.label)
        self.documents, self.doc_ids = table.column("input_ids"), table.column("doc_id")
        self.groups, self.checked = None, set()

    def check(self, cfg, vocab_size):
        """check_documents, once per vocabulary and length: the corpus is shared by the folder's datasets."""
        if (vocab_size, cfg.max_seq_length) not in self.checked:
            check_documents(self.documents, self.label, cfg, vocab_size)
            self.checked.add((vocab_size, cfg.max_seq_length))

    def build_groups(self):
        """The corpus rows sorted by id stem: (stems, row order, start of each stem's rows)."""
        if self.doc_ids.null_count:
            raise UserError(f"{self.label}: column 'doc_id' has {self.doc_ids.null_count} null id(s); re-run "
                            "tokenize_data_qwen.py --layout published_v2")
        if pc.count_distinct(self.doc_ids).as_py() != len(self.doc_ids):
            counts = pc.value_counts(self.doc_ids)
            twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
            raise UserError(f"{self.label}: {len(twice)} doc_id(s) appear more than once (e.g. {twice[0]}); "
                            "concatenate each NAME_corpus.parquet once")
        stems = id_stems(self.doc_ids)
        names = pc.unique(stems)
        codes = np.asarray(pc.index_in(stems, value_set=names), dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        self.groups = names, order, np.searchsorted(codes[order], np.arange(len(names) + 1))

    def positions(self, ids):
        """Row positions (int64) of the string ids (an Arrow array); -1 where an id is not in the corpus."""
        if self.groups is None:
            self.build_groups()
        names, order, starts = self.groups
        stems = pc.unique(id_stems(ids))
        found = pc.index_in(stems, value_set=names).drop_null().to_numpy()
        rows = np.concatenate([order[starts[g]: starts[g + 1]] for g in found] + [np.zeros(0, np.int64)])
        where = pc.index_in(ids, value_set=self.doc_ids.take(pa.array(rows)).combine_chunks())
        out = np.full(len(ids), -1, dtype=np.int64)
        valid = np.asarray(pc.is_valid(where))
        out[valid] = rows[np.asarray(where.drop_null(), dtype=np.int64)]
        return out

    def integer_ids(self, path, table, columns, cache_dir):
        """The path of the query file's v2 twin under cache_dir (its id_table); made here unless already there."""
        stamps = [(os.path.abspath(p), st.st_size, st.st_mtime_ns) for p in [path, *self.paths] for st in [os.stat(p)]]
        key = hashlib.sha256(json.dumps([1, stamps, columns]).encode()).hexdigest()[:16]
        name = os.path.basename(path)[: -len(QUERY_SUFFIX)]
        twin = os.path.join(cache_dir, "published_v2", f"{name}-{key}.parquet")
        if not os.path.isfile(twin):
            os.makedirs(os.path.dirname(twin), exist_ok=True)
            tmp = f"{twin}.tmp-{os.getpid()}"
            twin_table = self.id_table(table, columns, path)
            pq.write_table(twin_table, tmp, row_group_size=row_group_rows(twin_table))
            os.replace(tmp, twin)  # processes racing here write the same file: the last rename wins, whole
        return twin

    def id_table(self, table, columns, path):
        """A published v2 query table as a v2 one: query_input_ids and, for each id column
        `X_input_ids`, `X_id`, the row of the id in the corpus."""
        out = {columns[0]: table.column(columns[0])}
        for col in columns[1:]:
            ids = table.column(col).combine_chunks()
            if ids.null_count:
                rows = np.flatnonzero(np.asarray(ids.is_null()))
                raise UserError(f"{path}: column '{col}' has {ids.null_count} null document id(s) (rows "
                                f"{rows_shown(rows)}); re-run tokenize_data_qwen.py --layout published_v2")
            rows = self.positions(ids)
            if (rows < 0).any():
                bad = np.flatnonzero(rows < 0)
                raise UserError(f"{path}: column '{col}' has {len(bad)} document id(s) that {self.label} does not "
                                f"hold (rows {rows_shown(bad)}, e.g. {ids[int(bad[0])]}); concatenate every "
                                "NAME_corpus.parquet into corpus.parquet, or re-run tokenize_data_qwen.py")
            out[id_column(col)] = pa.array(rows, pa.int64())
        return pa.table(out)


def tokenize(tokenizer, texts, max_seq_length, special_tokens=False):
    """The recipe's tokenisation for decoders: no special tokens, cut to max_seq_length - 1, eos
    appended. With special_tokens (encoders), the tokenizer's own ([CLS] ... [SEP]), the text cut so
    that the whole fits in max_seq_length, the closing token kept."""
    if special_tokens:
        return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_seq_length)["input_ids"]
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_seq_length - 1)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


# tokenize_data_qwen.py's record in its outputs' parquet schema metadata: what a file was made from.
TOKENIZE_RECORD = b"f2llm_tokenize"


def check_tokenization_rule(path, special_tokens):
    """Refuse a file tokenize_data_qwen.py made for a backbone of the other kind: its record says
    "special_tokens": true for encoders' files and nothing for decoders'. Files without a record (the
    published script's) are taken as they are."""
    record = stored_record(path, TOKENIZE_RECORD)
    if record is None or bool(record.get("special_tokens")) == special_tokens:
        return
    made, now = ("an encoder", "a decoder") if record.get("special_tokens") else ("a decoder", "an encoder")
    raise UserError(f"{path} was tokenized for {made} ({'with' if made == 'an encoder' else 'without'} the "
                    f"tokenizer's special tokens) but model_path holds {now}: tokenize the raw files again with "
                    "tokenize_data_qwen.py --model_path set to this backbone")


class ArrowRows:
    """A split's rows fetched as one Arrow table per batch (`__getitems__`): no Python lists."""

    def __init__(self, split):
        self.split = split.with_format("arrow")

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        return self.split[list(indices)]


class CorpusRows(ArrowRows):
    """A v2 split: query rows whose passage_id, negative_{i}_id point into the corpus's token lists
    (`documents`); each batch's ids become passage_input_ids, negative_{i}_input_ids, so a batch is
    the same table as the v1 file's rows."""

    def __init__(self, split, documents):
        super().__init__(split)
        self.chunks = documents.chunks
        self.chunk_starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def take_documents(self, ids):
        """The token lists of document ids (int64 numpy), one zero-copy slice each, concatenated:
        Arrow's take on the chunked column costs time in the corpus size, not the batch size."""
        chunk = np.searchsorted(self.chunk_starts, ids, side="right") - 1
        local = ids - self.chunk_starts[chunk]
        return pa.concat_arrays([self.chunks[c].slice(i, 1) for c, i in zip(chunk.tolist(), local.tolist())])

    def __getitems__(self, indices):
        table = super().__getitems__(indices)
        id_columns = table.column_names[1:]
        ids = np.concatenate([table.column(c).to_numpy().astype(np.int64) for c in id_columns])
        docs = self.take_documents(ids)
        bs = table.num_rows
        columns = {"query_input_ids": table.column("query_input_ids")}
        for i, col in enumerate(id_columns):
            columns[col[: -len("_id")] + "_input_ids"] = docs.slice(i * bs, bs)
        return pa.table(columns)


def rows_of(split):
    """The rows of a split from load_splits as one Arrow table per batch of indices, with token
    columns query_input_ids, passage_input_ids, negative_{i}_input_ids."""
    return split if isinstance(split, ArrowRows) else ArrowRows(split)


def pick_negatives(num_rows, num_available, num_neg, rng, per_batch=False):
    """[num_rows, num_neg] negative column indices: drawn without replacement by `rng` (a numpy
    Generator), for each row on its own, or with `per_batch` once for the whole batch as the published
    collate_fn does (random.sample of k columns, every row the same ones; k = 1 always the first);
    the first num_neg of every row when rng is None (validation)."""
    if rng is None or (per_batch and num_neg == 1):
        return np.tile(np.arange(num_neg), (num_rows, 1))
    if per_batch:
        return np.tile(rng.permutation(num_available)[:num_neg], (num_rows, 1))
    return np.argsort(rng.random((num_rows, num_available)), axis=1)[:, :num_neg]


def sequence_keys(input_ids, lengths):
    """One int64 key per sequence of the flat `input_ids` (int64 numpy), from its token ids: equal
    for equal sequences, different for different ones but with probability ~2**-64 (an 8-byte
    blake2b digest), and the same in every process (Python's own hash of bytes is seeded per process)."""
    raw = input_ids.tobytes()
    ends = np.cumsum(lengths) * input_ids.itemsize
    starts = ends - np.asarray(lengths) * input_ids.itemsize
    return np.array([int.from_bytes(hashlib.blake2b(raw[a:b], digest_size=8).digest(), "little", signed=True)
                     for a, b in zip(starts.tolist(), ends.tolist())], dtype=np.int64)


def collate(table, *, num_neg, max_seq_length, eos_id, rng=None, vocab_size=None, per_batch_negatives=False,
            doc_keys=False, negative_columns=None):
    """An Arrow table of one dataset's rows -> {input_ids [T], lengths [n], num_queries, num_neg}, and
    with `doc_keys` the sequences' sequence_keys as doc_keys [n] (the joint loss's same-text test).

    The n = bs x (2 + num_neg) sequences, in the order bs queries, bs positives, then each query's
    negatives in turn, are concatenated into flat `input_ids`; each is cut to max_seq_length with
    its last token forced to eos. Negatives are drawn from a row's first `negative_columns` columns
    (None: all). Vectorized: no per-token Python work. An id outside [0, vocab_size) is an error (a
    file tokenized with another tokenizer, or corrupt).
    """
    bs = table.num_rows
    negative_cols = sorted((c for c in table.column_names if c.startswith("negative_")),
                           key=lambda c: int(c.split("_")[1]))
    columns = ["query_input_ids", "passage_input_ids"] + negative_cols
    # All candidate sequences column by column: sequence (c, r) sits at c * bs + r.
    candidates = pa.concat_arrays([table.column(c).combine_chunks().cast(pa.list_(pa.int32())) for c in columns])
    rows = np.arange(bs)
    picks = pick_negatives(bs, min(len(negative_cols), negative_columns or len(negative_cols)), num_neg, rng,
                           per_batch_negatives)
    order = np.concatenate([rows, bs + rows, ((2 + picks) * bs + rows[:, None]).ravel()])
    sequences = candidates.take(pa.array(order))
    full = np.asarray(pc.list_value_length(sequences), dtype=np.int64)
    flat = np.asarray(sequences.flatten())
    lengths = np.minimum(full, max_seq_length)
    out_ends = np.cumsum(lengths)
    keep = np.arange(out_ends[-1]) + np.repeat(np.cumsum(full) - full - (out_ends - lengths), lengths)
    input_ids = flat[keep].astype(np.int64)
    lo, hi = (input_ids.min(), input_ids.max()) if len(input_ids) else (0, 0)
    if lo < 0 or (vocab_size and hi >= vocab_size):
        raise UserError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size or '...'}): "
                        "was the file tokenized with the model's tokenizer (tokenize_data_qwen.py --model_path)?")
    input_ids[out_ends - 1] = eos_id
    out = {"input_ids": torch.from_numpy(input_ids), "lengths": torch.from_numpy(lengths),
           "num_queries": bs, "num_neg": num_neg}
    if doc_keys:
        out["doc_keys"] = torch.from_numpy(sequence_keys(input_ids, lengths))
    return out


class DatasetBatches:
    """One process's batches of one dataset split, each a pure function of (seed, epoch, batch index).

    Any batch of any epoch is rebuilt without replaying the ones before it, so a resumed run
    continues exactly where it stopped at no cost. Training: rows shuffled by (seed, stream, epoch),
    negatives sampled by (seed, stream, epoch, batch); validation: rows in order with their first
    negatives, or with random_validation_negatives negatives sampled by (seed, stream, batch). The
    epoch's batches are dealt round-robin to the `world` processes; with several, a last partial
    batch is filled up, and batches added until every process has as many, from the rows at the
    start of the epoch, as accelerate's even_batches does for the published loaders (rows_in): every
    batch is full and every process runs the same number of steps (one process with a batch fewer
    would leave the others waiting in a collective forever).
    """

    def __init__(self, split, *, batch_size, num_neg, max_seq_length, eos_id, train, seed=0, stream=0,
                 rank=0, world=1, name="", vocab_size=None, per_batch_negatives=False,
                 random_validation_negatives=False, doc_keys=False, negative_columns=None):
        self.rows, self.name = rows_of(split), name
        self.batch_size, self.train, self.rank, self.world = batch_size, train, rank, world
        self.random_validation_negatives = random_validation_negatives
        self.entropy = [seed, stream]
        self.collate = partial(collate, num_neg=num_neg, max_seq_length=max_seq_length, eos_id=eos_id,
                               vocab_size=vocab_size, per_batch_negatives=per_batch_negatives, doc_keys=doc_keys,
                               negative_columns=negative_columns)
        self.num_batches = -(-len(self.rows) // batch_size)
        self.epoch, self.order = 0, None

    def __len__(self):
        return -(-self.num_batches // self.world)

    def set_epoch(self, epoch):
        self.epoch, self.order = epoch, None

    def batch(self, j):
        """This process's batch j of the current epoch."""
        if self.order is None:
            n = len(self.rows)
            self.order = (np.random.default_rng([*self.entropy, self.epoch, 0]).permutation(n) if self.train
                          else np.arange(n))
        g = j * self.world + self.rank  # its index among all processes' batches
        if self.train:
            rng = np.random.default_rng([*self.entropy, self.epoch, 1, g])
        else:  # the same negatives at every validation, so that successive losses compare
            rng = np.random.default_rng([*self.entropy, 2, g]) if self.random_validation_negatives else None
        try:
            return self.collate(self.rows.__getitems__(self.rows_in(g)), rng=rng)
        except UserError as err:
            raise UserError(f"{self.name}: {err}") from None

    def rows_in(self, g):
        """The rows (positions in the epoch's order) of global batch g. With one process the last
        batch may be partial. With several, accelerate's BatchSamplerShard (even_batches): the rows of
        the first `world` batches, repeated to at least world x batch_size, fill the last batch up to
        full size and then make the added batches, in order."""
        bs = self.batch_size
        rows = self.order[g * bs: (g + 1) * bs]
        if self.world == 1 or len(rows) == bs:
            return rows
        start = self.order[: self.world * bs]
        start = np.tile(start, -(-self.world * bs // len(start)))
        short = (-len(self.order)) % bs  # the last batch's missing rows
        if g == self.num_batches - 1:
            return np.concatenate([rows, start[:short]])
        offset = short + (g - self.num_batches) * bs
        return start[offset: offset + bs]

    def iter_from(self, start):
        return (self.batch(j) for j in range(start, len(self)))

    def __iter__(self):
        return self.iter_from(0)


class MultiDatasetLoader:
    """Homogeneous batches from one DatasetBatches per dataset.

    Each epoch, the next batch's dataset is drawn at random with probability proportional to its
    number of batches, seeded by (seed, epoch) so that every process draws the same sequence; an
    exhausted dataset leaves the draw; the epoch ends when all are exhausted. Yields (name, batch),
    from position `start` of the epoch (a resumed run starts mid-epoch).
    """

    def __init__(self, loaders, seed=0, published_draw=False):
        self.loaders = dict(loaders)
        self.seed, self.published_draw = seed, published_draw
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start
        for loader in self.loaders.values():
            loader.set_epoch(epoch)

    def __len__(self):
        return sum(len(loader) for loader in self.loaders.values())

    def draw_order(self):
        """The dataset name of every batch of this epoch, in order."""
        if self.published_draw:
            return self.published_draw_order()
        rng = random.Random(f"{self.seed}-{self.epoch}")
        left = {name: len(loader) for name, loader in self.loaders.items() if len(loader)}
        order = []
        while left:
            names = list(left)
            name = rng.choices(names, weights=[len(self.loaders[n]) for n in names])[0]
            order.append(name)
            left[name] -= 1
            if not left[name]:
                del left[name]
        return order

    def published_draw_order(self):
        """The published MultiLoader's order: random.Random(epoch), whatever the seed, weights fixed at
        each dataset's batch count; a draw of an exhausted dataset only removes it from the draw."""
        rng = random.Random(self.epoch)
        names = [name for name, loader in self.loaders.items() if len(loader)]
        weights = [len(self.loaders[name]) for name in names]
        left, order = dict(zip(names, weights)), []
        while names:
            name = rng.choices(names, weights=weights)[0]
            if left[name]:
                order.append(name)
                left[name] -= 1
            else:
                weights.pop(names.index(name))
                names.remove(name)
        return order

    def __iter__(self):
        order = self.draw_order()
        done = Counter(order[: self.start])
        iterators = {name: loader.iter_from(done[name]) for name, loader in self.loaders.items()}
        for name in order[self.start:]:
            yield name, next(iterators[name])


def check_datasets(cfg, dataset_types, data_path=None, special_tokens=False):
    """[(name, path, task_type, token columns)] for every file in data_path (default train_data_path),
    checked up front (names, task types, columns, the tokenization rule of the backbone's kind:
    `special_tokens` for encoders) so that every process fails at once on bad input."""
    out = []
    for name, path in find_datasets(data_path or cfg.train_data_path):
        task = task_type_of(name, dataset_types, path)
        check_tokenization_rule(path, special_tokens)
        out.append((name, path, task, token_columns(path, num_negatives_needed(task, cfg), negatives_key(task, cfg))))
    return out


def make_loader(split, task, cfg, eos_id, *, train, stream=0, rank=0, world=1, name="", vocab_size=None):
    """One process's batches of a dataset split: shuffled with sampled negatives for training, in
    order with the first negatives for validation. `stream` tells datasets apart in the seeding;
    `name` labels errors."""
    return DatasetBatches(split, batch_size=cfg.train_batch_size, num_neg=num_negatives_needed(task, cfg),
                          max_seq_length=cfg.max_seq_length, eos_id=eos_id, train=train, seed=cfg.seed,
                          stream=stream, rank=rank, world=world, name=name, vocab_size=vocab_size,
                          per_batch_negatives=cfg.negative_sampling == "per_batch",
                          random_validation_negatives=cfg.validation_negatives == "random",
                          doc_keys=cfg.contrastive_loss == "joint", negative_columns=cfg.negative_columns)
