"""Pre-tokenize F2LLM training data (--layout v1: F2LLM's published output; v2: a query file plus a corpus
per dataset; published_v2: F2LLM-v2's published output).

Reads every `*.parquet` of --input_dir (columns `query`, `passage`, `negative_1` ... `negative_n`).
Each text: no special tokens, cut to max_seq_length - 1 tokens, eos appended. Queries, and passages
and negatives together, are deduplicated, so each distinct text is tokenized once, in batches: in this
process or, once a file's queries (or its passages and negatives) bring at least --pool_min_chars
characters of distinct text, over a pool of --num_proc worker processes. The distinct passages and
negatives are numbered in order of first occurrence, reading the `passage` column's rows first, then
`negative_1`'s, and so on. Output per input file NAME.parquet:
- v1: the same file in --output_dir with int-list columns `query_input_ids`, `passage_input_ids`,
  `negative_{i}_input_ids` added.
- v2 (F2LLM-v2's disk-efficient idea, with integer ids): the corpus `corpus/NAME.parquet` of the
  unique passages and negatives (`doc_id` = row position = their number, `input_ids`), written first,
  then the query file `NAME.parquet` with `query_input_ids` and ids into the corpus `passage_id`,
  `negative_{i}_id`.
- published_v2 (the files F2LLM-v2's published tokenizer writes): the corpus `NAME_corpus.parquet`
  of the unique passages and negatives (`input_ids`, `doc_id` = the string "NAME_{i}", i their number),
  written first, then `NAME_query.parquet` with `query_input_ids` and, under the published names
  `passage_input_ids`, `negative_{i}_input_ids`, the string doc_ids of the corpus rows (the text
  columns dropped). The published README concatenates the `*_corpus.parquet` files into one
  `corpus.parquet`; training reads either, so none is written here.
The published F2LLM-v2 run is `--layout published_v2 --max_seq_length 2048 --max_rows_per_dataset
80000` (--sample_seed 42, the default); its default special tokens add none for Qwen3, as here.

Memory is bounded by --chunk_rows, not by the size of the file. The input is read one column at a
time in batches of --chunk_rows rows (v1's output and a --max_rows_per_dataset sample, which need
whole rows, in batches of --chunk_rows / columns rows; an input of at most --chunk_rows cells is read
once, whole), a first pass only checking the texts, so that a bad file is refused before anything is
written. The distinct texts are numbered as they come and tokenized in rounds of about --chunk_rows:
a round's texts are looked up as themselves, those of earlier rounds by a 16-byte hash (blake2b of
their UTF-8 bytes), the texts not kept. The token ids go to an unnamed temporary file in the output
folder (those of a single round stay in memory), memory-mapped to build the output, which is written
row group by row group (about data.ROW_GROUP_BYTES each). What still grows with the file: the hashes
and their numbers, 24 bytes per distinct text (~50 MB for 2M distinct passages), and the number of
each row's text in each text column, 8 bytes a cell (~210 MB per million rows of 26 texts), plus 24
bytes per row drawn by --max_rows_per_dataset. On disk the temporary file holds the token ids of the
distinct texts (with --max_rows_per_dataset also a copy of the rows drawn); the system deletes it
when the file is done or the process ends, even when it is killed.

--max_rows_per_dataset N keeps N rows of each file that has more, drawn as the published v2 script
draws them: it seeds numpy once (transformers.set_seed(42)) and calls pandas' `df.sample(n=N)` on each
larger file in sorted order, that is `choice(num_rows, N, replace=False)` on numpy's global
RandomState, rows taken in the order drawn. Here one `np.random.RandomState(--sample_seed)` draws
for every larger input in sorted order, files skipped as already tokenized included (their row
counts come from the parquet footers, their data is not read), so a re-run after an interruption
keeps the same rows. A file's rows thus also depend on the row counts of the larger files before it.

Re-running is cheap and safe. Each output file is written atomically (a temp file
`NAME.parquet.tmp-PID`, then a rename) and records in its parquet schema metadata (key
`f2llm_tokenize`) what it was made from: the input file's size and modification time (`st_size`,
`st_mtime_ns`; for a folder of parquet parts, over all its files), max_seq_length, a fingerprint of
the tokenizer, the layout and, for a file cut by --max_rows_per_dataset, the rows kept (`sample`:
max_rows, seed and a short sha256 of the drawn row indices; absent when all rows are kept, so files
written without the flag still match); a corpus holds the same record as its query file. A later run
skips every output whose record matches, so after an interrupted job the same command finishes only
the missing files; an output without a record, or with a different one, or a v2 / published_v2 query
file whose corpus is missing or has another record, is tokenized again (one line says why), and
--overwrite tokenizes everything again. Size plus mtime rather than a hash of the input because it
costs one stat() where a hash reads every file in full; the price: an input rewritten with the same
size within the file system's timestamp resolution, or with its mtime set back, goes unnoticed (use
--overwrite after such edits). An in-place run (output file == input file) always tokenizes again,
since the input's stamp then is the output's own (v2 and published_v2 cannot run in place: their
query files hold no texts; nor can --max_rows_per_dataset: the rows not kept would be lost). Temp
files left by a killed run are removed at start.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import re
import tempfile
from collections import namedtuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from data import corpus_path, row_group_rows, rows_shown, tokenize
from errors import UserError, exit_on_user_error
from model import load_tokenizer

CHUNK = 1000  # texts per worker task: large enough for batched fast tokenization
# Rows per read batch of one column, and distinct texts per tokenization round: ~100 MB of F2LLM-like passages,
# and 100 worker tasks, so that a pool rarely waits for the round's last task.
CHUNK_ROWS = 100_000
# Where the pool pays off: on 2 cores this process tokenizes ~0.7-1.1M characters/s (F2LLM-like passages) and
# 2 workers tokenize no faster, while starting them takes 8.5-14 s (2026-11-30, load average 3-3.6); below
# ~10M characters (~10,000 passages) their start alone takes longer than the whole job here.
POOL_MIN_CHARS = 10_000_000
RECORD_KEY = b"f2llm_tokenize"  # parquet schema metadata: what an output file was made from
LAYOUTS = ("v1", "v2", "published_v2")
RECORD_VERSION = 1  # bump when this script's output for the same input and settings changes
TEMP_FILE = re.compile(r".+\.parquet\.tmp-(\d+)")  # write_atomic's temp files (the number is a pid)
TOKENS = pa.list_(pa.int32())
# Pages are read through a 1 MiB buffer (as plain_files reads): by default the reader holds a row group's whole
# column chunk (pyarrow writes up to 1,048,576 rows in a group), and the scan pre-buffers it.
SCAN = {"batch_readahead": 1, "fragment_readahead": 1, "fragment_scan_options": ds.ParquetFragmentScanOptions(
    use_buffered_stream=True, buffer_size=2**20, pre_buffer=False)}


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


def check_columns(columns, path):
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
    """check_columns on a table in memory."""
    check_columns(((name, table.column(name).chunks) for name in columns), path)


_worker_state = {}  # the tokenizer _tokenize_chunk uses: a pool worker's (_init_worker), or main()'s (Workers)


def _init_worker(model_path, max_seq_length, threads=True):
    if not threads:  # pool workers already fill the cores: no tokenizer threads on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["tokenizer"] = load_tokenizer(model_path)
    _worker_state["max_seq_length"] = max_seq_length


def make_pool(model_path, max_seq_length, num_proc):
    """num_proc worker processes that each load the tokenizer once."""
    return multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker,
                                                     initargs=(model_path, max_seq_length, False))


class Workers:
    """Where texts are tokenized (an `imap` like a Pool's): in this process, with the tokenizer main()
    loaded, until the calls for one file's queries (or its passages and negatives) bring at least min_chars
    characters of distinct text; from then on over a pool of num_proc workers. On small inputs the pool costs
    more than it saves: each spawned worker imports torch and transformers and loads the tokenizer first (see
    POOL_MIN_CHARS)."""

    def __init__(self, tokenizer, model_path, max_seq_length, num_proc, min_chars=POOL_MIN_CHARS):
        _worker_state.update(tokenizer=tokenizer, max_seq_length=max_seq_length)  # this process's calls
        self.pool_args, self.pool = (model_path, max_seq_length, num_proc), None
        self.min_chars = min_chars if num_proc > 1 else math.inf

    def imap(self, fn, chunks, before=0):
        """`before`: the characters of distinct text that earlier calls for the same group (a file's queries,
        or its passages and negatives, which come in rounds) brought."""
        if self.pool is None and (chars := before + sum(len(t) for chunk in chunks for t in chunk)) >= self.min_chars:
            print(f"starting {self.pool_args[2]} tokenizer worker processes ({chars:,} characters of distinct "
                  f"text to tokenize, at least --pool_min_chars {self.min_chars:,})", flush=True)
            self.pool = make_pool(*self.pool_args)
        return map(fn, chunks) if self.pool is None else self.pool.imap(fn, chunks)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()  # every result is in, or the run failed: waiting for the workers to exit took ~3 s
            self.pool.join()


def _tokenize_chunk(texts):
    return tokenize(_worker_state["tokenizer"], texts, _worker_state["max_seq_length"])


def tokenize_unique(texts, pool, bar=None, before=0):
    """Tokenize a list of distinct texts through `pool` (Workers, a Pool, or None: in this process), counted
    on the progress bar `bar`; `before`: see Workers.imap."""
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    if isinstance(pool, Workers):
        results = pool.imap(_tokenize_chunk, chunks, before)
    else:
        results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
    arrays = []  # each chunk to Arrow at once: Python's int lists take ~10x the memory of int32 ids
    for chunk_ids in results:
        arrays.append(pa.array(chunk_ids, type=TOKENS))
        if bar is not None:
            bar.update(len(chunk_ids))
    return pa.concat_arrays(arrays or [pa.array([], type=TOKENS)])


class Scratch:
    """Record batches appended to an unnamed temporary file in `folder` (None: the system's temp folder),
    then memory-mapped: what it holds stays out of this process's memory. The system deletes the file
    once it is unmapped or the process ends, even by SIGKILL, so a killed run leaves none behind. A
    scratch of one batch (a small input's) keeps it in memory, where it was made, and makes no file."""

    def __init__(self, folder, schema):
        self.folder, self.schema = folder, schema
        self.parts, self.lengths, self.file = [], [], None  # parts: the batches held; lengths: those in the file

    def error(self, err):
        return UserError(f"cannot write a temporary file in {self.folder or tempfile.gettempdir()}: {err}")

    def append(self, batch):
        self.parts.append(batch)
        if len(self.parts) > 1 or self.file is not None:
            self.spill()

    def spill(self):
        """Move the batches held to the file (opened the first time)."""
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.folder)
                self.writer = pa.ipc.new_file(self.file, self.schema)
            for batch in self.parts:
                self.writer.write_batch(batch)
        except OSError as err:  # disk full
            raise self.error(err) from None
        self.lengths += [batch.num_rows for batch in self.parts]
        self.parts = []

    def finish(self):
        """Stop appending; from now on read."""
        if self.file is None:
            self.starts = np.cumsum([0] + [batch.num_rows for batch in self.parts])
            return
        self.writer.close()
        self.file.flush()
        mapped = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.file.close()  # the map keeps the file
        reader = pa.ipc.open_file(pa.py_buffer(mapped))
        self.parts = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + self.lengths)

    def batches(self):
        """(position of its first row, record batch) of each batch appended, in order."""
        return zip(self.starts.tolist(), self.parts)

    def take(self, positions, column=0):
        """The values of `column` at `positions` (an int64 array), in that order. Taken batch by batch: a take
        on the whole column concatenates it in memory first on older pyarrow."""
        if len(self.parts) == 1:
            return self.parts[0].column(column).take(positions)
        where = np.searchsorted(self.starts, positions, side="right") - 1
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(len(self.parts) + 1))
        pieces = [part.column(column).take(positions[order[lo:hi]] - start)
                  for part, start, lo, hi in zip(self.parts, self.starts, bounds, bounds[1:]) if hi > lo]
        values = pa.concat_arrays(pieces) if pieces else pa.array([], self.schema.field(column).type)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return values.take(back)


HASH = "S16"  # numpy compares and sorts these bytewise, all 16 bytes (trailing zero bytes included)


def digest(text):
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Tokens:
    """The distinct texts of a group of columns, numbered from 0 in order of first occurrence, each tokenized
    once: in rounds of `round_texts` new texts as they come, their ids appended to a Scratch (row = number).
    A round's texts are held until they are tokenized, so they are looked up as themselves; once done, by a
    16-byte hash (blake2b of the UTF-8 bytes) in a sorted array: memory grows by 24 bytes per distinct text,
    not by the texts (a dict of hashes took ~130). A group of one round (a small file's) hashes nothing."""

    def __init__(self, pool, desc, folder, round_texts):
        self.pool, self.round_texts = pool, round_texts
        self.round, self.count, self.chars = {}, 0, 0  # round: text -> number
        self.hashes, self.numbers = np.empty(0, HASH), np.empty(0, np.int64)  # earlier rounds, sorted by hash
        self.bar = tqdm(desc=desc, unit="text")
        self.scratch = Scratch(folder, pa.schema([("input_ids", TOKENS)]))

    def add(self, texts):
        """The number of each text of a string array."""
        # Arrow finds the array's distinct texts, in order of first occurrence (the numbers keep that order),
        # and each row's among them: one Python step per distinct text, not per row.
        encoded = texts.dictionary_encode()
        distinct = encoded.dictionary.to_pylist()
        numbers = [self.number(text, done) for text, done in zip(distinct, self.earlier(distinct).tolist())]
        if len(self.round) >= self.round_texts:
            self.tokenize_round()
            keys = np.array([digest(text) for text in self.round], HASH)
            order = np.argsort(keys)
            at = np.searchsorted(self.hashes, keys[order])
            self.hashes = np.insert(self.hashes, at, keys[order])
            self.numbers = np.insert(self.numbers, at, np.fromiter(self.round.values(), np.int64)[order])
            self.round = {}
        return np.array(numbers, np.int64)[encoded.indices.to_numpy()]

    def earlier(self, texts):
        """The number of each text an earlier round gave, -1 for the others."""
        if not len(self.hashes):
            return np.full(len(texts), -1, np.int64)
        keys = np.array([digest(text) for text in texts], HASH)
        at = np.minimum(np.searchsorted(self.hashes, keys), len(self.hashes) - 1)
        return np.where(self.hashes[at] == keys, self.numbers[at], -1)

    def number(self, text, done):
        number = self.round.get(text, done)
        if number < 0:
            number = self.round[text] = self.count
            self.count += 1
        return number

    def tokenize_round(self):
        texts = list(self.round)
        self.scratch.append(pa.record_batch([tokenize_unique(texts, self.pool, self.bar, self.chars)],
                                            schema=self.scratch.schema))
        self.chars += sum(map(len, texts))

    def finish(self):
        if self.round:
            self.tokenize_round()
        self.bar.close()
        self.round = self.hashes = self.numbers = None  # the output needs the numbers given, not the lookup: free it
        self.scratch.finish()

    def take(self, numbers):
        """The token ids of the texts numbered `numbers`."""
        return self.scratch.take(numbers)

    def batches(self):
        """(number of its first text, token id lists) in order of the numbers."""
        return ((start, batch.column(0)) for start, batch in self.scratch.batches())


def tokenize_groups(source, columns, pool, desc, folder):
    """(Tokens of the distinct queries, Tokens of the distinct passages and negatives, {text column: the
    number of each row's text}): the queries alone, then the passage and negative columns in order."""
    index, groups = {}, []
    for group, label in ((columns[:1], "queries"), (columns[1:], "passages+negatives")):
        tokens = Tokens(pool, f"{desc} {label}", folder, source.chunk_rows)
        for name in group:
            index[name] = np.concatenate([np.empty(0, np.int64)] + [tokens.add(texts) for texts in source.column(name)])
        tokens.finish()
        groups.append(tokens)
    return groups[0], groups[1], index


def tokenize_table(table, columns, pool, desc):
    """v1 in memory: the table with `{column}_input_ids` added for each text column."""
    source = TableRows(table, CHUNK_ROWS)
    queries, docs, index = tokenize_groups(source, columns, pool, desc, None)
    output = v1_output(source, columns, queries, docs, index)
    return pa.concat_tables([output.schema.empty_table(), *output.tables])


def output_paths(output_dir, name, layout):
    """(the output file, its corpus or None) for the input NAME.parquet; the output file is the one
    a skip is decided on (v2 and published_v2: the query file, written after its corpus)."""
    if layout == "published_v2":
        return os.path.join(output_dir, f"{name}_query.parquet"), os.path.join(output_dir, f"{name}_corpus.parquet")
    out_path = os.path.join(output_dir, f"{name}.parquet")
    return out_path, (corpus_path(out_path) if layout == "v2" else None)


def count_rows(path):
    """The rows of an input file (or folder of parquet parts), from the parquet footers alone: a file
    skipped as already tokenized still advances the sampling stream, but its data is not read."""
    try:
        return ds.dataset(path, format="parquet").count_rows()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None


def empty_input_error(path):
    """The error for an input file with no rows: its output would be an empty dataset, which training
    refuses only when it starts, after every other file was tokenized."""
    return UserError(f"{path}: 0 rows; remove the file or fill it")


def check_not_empty(files):
    """Every input has rows, from the parquet footers alone, checked before anything is written. A file
    whose footer cannot be read is left to open_input, whose error says more about it."""
    for path in files:
        try:
            num_rows = count_rows(path)
        except UserError:
            continue
        if num_rows == 0:
            raise empty_input_error(path)


def draw_rows(num_rows, max_rows, rs):
    """The row indices kept of a file with num_rows rows: None (all, in order, rs not advanced) when
    num_rows <= max_rows, else `rs.choice(num_rows, max_rows, replace=False)`, in the order drawn,
    which is what pandas' `df.sample(n=max_rows)` draws from numpy's global RandomState."""
    if num_rows <= max_rows:
        return None
    return rs.choice(num_rows, max_rows, replace=False)


def sample_record(rows, max_rows, seed):
    """The record's "sample" entry of a file cut to `rows`: a short sha256 of the indices, since
    they also depend on the row counts of the earlier files, which max_rows and seed do not show."""
    digest = hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()[:16]
    return {"max_rows": max_rows, "seed": seed, "rows": digest}


def unreadable(path, err):
    return UserError(f"{path}: not a readable parquet file ({(str(err).splitlines() or [type(err).__name__])[0]})")


@contextlib.contextmanager
def reading(path):
    """A read error (a corrupt page, a file gone) as the UserError that names path."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, err) from None


def input_rows(dataset, path, chunk_rows):
    """The rows of an input: TableRows if it holds at most chunk_rows cells (it fits that bound whole, and
    one read costs less than a scan per column, ~0.5 ms each: more than a small file takes to tokenize),
    else DatasetRows."""
    with reading(path):
        num_rows = dataset.count_rows()
        if num_rows * len(dataset.schema) > chunk_rows:
            return DatasetRows(dataset, path, chunk_rows, num_rows)
        table = dataset.to_table(**SCAN)
    if table.num_rows != num_rows:
        raise changed_error(path, num_rows, table.num_rows)
    return TableRows(table, chunk_rows)


def changed_error(path, expected, read):
    return UserError(f"{path}: {read:,} rows read where its footer counts {expected:,}; the file changed while "
                     "being read, or it is corrupt")


class Rows:
    """Rows to tokenize, in output order: `batches(names)` gives them as record batches of those columns,
    `column(name)` the string arrays of one."""

    def column(self, name):
        return (batch.column(0) for batch in self.batches([name]))


class TableRows(Rows):
    """Rows in memory (a small input, a tokenize_table call), in the table's own chunks."""

    def __init__(self, table, chunk_rows):
        self.table, self.chunk_rows, self.schema, self.num_rows = table, chunk_rows, table.schema, table.num_rows

    def column(self, name):
        return self.table.column(name).chunks

    def batches(self, names):
        return self.table.select(names).to_batches()

    def sample(self, rows, names, folder):
        """The rows drawn, in the order drawn."""
        return TableRows(self.table.select(names).take(rows), self.chunk_rows)


class DatasetRows(Rows):
    """The rows of an input (a pyarrow dataset), in file order, read in batches of --chunk_rows rows of one
    column, or as many cells of several. A read error (a corrupt page) is a UserError, and so is a pass
    that does not give the rows the footers count."""

    def __init__(self, dataset, path, chunk_rows, num_rows):
        self.dataset, self.path, self.chunk_rows, self.num_rows = dataset, path, chunk_rows, num_rows
        self.schema = dataset.schema
        with reading(path):
            self.files = plain_files(dataset)

    def batches(self, names):
        done = 0
        for batch in self._scan(names):
            done += batch.num_rows
            if done > self.num_rows:
                break
            yield batch
        if done != self.num_rows:
            raise changed_error(self.path, self.num_rows, done)

    def _scan(self, names):
        rows = max(1, self.chunk_rows // len(names))
        with reading(self.path):
            if self.files is None:
                yield from self.dataset.to_batches(columns=names, batch_size=rows, **SCAN)
                return
            for path in self.files:
                with pq.ParquetFile(path, buffer_size=2**20, pre_buffer=False) as file:
                    yield from file.iter_batches(batch_size=rows, columns=names)

    def sample(self, rows, names, folder):
        """The rows drawn, in the order drawn (SampleRows)."""
        return SampleRows(self, names, rows, folder)


def plain_files(dataset):
    """The dataset's files, to be read a batch at a time, if each holds its rows as they are (its schema the
    dataset's: no partition columns, no types to unify); else None, for the dataset's scan, which can read
    ~1 GB ahead of what is taken from it, whatever its batch_readahead."""
    fragments = list(dataset.get_fragments())
    if any(not fragment.physical_schema.equals(dataset.schema) for fragment in fragments):
        return None
    return [fragment.path for fragment in fragments]


class SampleRows(Rows):
    """The rows drawn by --max_rows_per_dataset from a DatasetRows, in the order drawn, `names` only. One
    pass over the input copies them, in file order, to a Scratch, from which each batch gathers its rows."""

    def __init__(self, source, names, rows, folder):
        self.chunk_rows, self.schema, self.num_rows = source.chunk_rows, source.schema, len(rows)
        in_file_order = np.sort(rows)
        self.positions = np.searchsorted(in_file_order, rows)  # each drawn row's row in the scratch
        self.scratch = Scratch(folder, pa.schema([source.schema.field(name) for name in names]))
        start = 0
        for batch in source.batches(names):
            lo, hi = np.searchsorted(in_file_order, [start, start + batch.num_rows])
            if hi > lo:
                picked = pa.RecordBatch.from_arrays(batch.columns, schema=self.scratch.schema)
                self.scratch.append(picked.take(in_file_order[lo:hi] - start))
            start += batch.num_rows
        self.scratch.finish()

    def batches(self, names):
        step = max(1, self.chunk_rows // len(names))
        for start in range(0, self.num_rows, step):
            positions = self.positions[start : start + step]
            yield pa.RecordBatch.from_arrays([self.scratch.take(positions, name) for name in names], names=names)


def open_input(path):
    """An input file (or folder of parquet parts) as the dataset pq.read_table reads, its footers read; a
    file that cannot be read is a UserError that says why."""
    # a folder of parts as pq.read_table reads it: key=value folders (Spark's partitions) give columns
    partitioning = ds.HivePartitioning.discover(infer_dictionary=True) if os.path.isdir(path) else None
    try:
        dataset = ds.dataset(path, format="parquet", partitioning=partitioning)
        _ = dataset.schema.names  # decodes the names: a corrupt footer can hold bytes that are not UTF-8
        return dataset
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: a column name is not valid UTF-8 ({err.reason} at byte {err.start}); "
                        "the file is corrupt or was written by a broken tool") from None
    except (pa.ArrowException, OSError) as err:
        try:
            names = pq.read_schema(path).names
        except Exception:  # not readable at all: report the dataset's error
            names = []
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once; "
                            "give every column its own name") from None
        raise unreadable(path, err) from None


Output = namedtuple("Output", "schema tables")  # a file to write: its schema, and its rows as tables in order


def with_metadata(schema, record):
    """The schema with `record` in its metadata (other metadata kept, an older record replaced)."""
    return schema.with_metadata({**(schema.metadata or {}), RECORD_KEY: json.dumps(record).encode()})


def with_record(table, record):
    return table.replace_schema_metadata(with_metadata(table.schema, record).metadata)


def stamped(output, record):
    return Output(with_metadata(output.schema, record), output.tables)


def kept_fields(schema):
    """v1 keeps every input column but the token columns of an earlier run."""
    return [field for field in schema if not field.name.endswith("_input_ids")]


def v1_output(source, columns, queries, docs, index):
    """v1: the input's columns, then `{column}_input_ids` for each text column."""
    kept = kept_fields(source.schema)
    schema = pa.schema(kept + [pa.field(f"{name}_input_ids", TOKENS) for name in columns], source.schema.metadata)

    def tables():
        start = 0
        for batch in source.batches([field.name for field in kept]):
            rows = slice(start, start + batch.num_rows)
            ids = [queries.take(index[columns[0]][rows])] + [docs.take(index[name][rows]) for name in columns[1:]]
            yield pa.Table.from_arrays(batch.columns + ids, schema=schema)
            start = rows.stop

    return Output(schema, tables())


def doc_ids(layout, name):
    """(type, the function from numbers to ids) of a corpus's doc_id: v2 the number itself, published_v2
    the string "NAME_{number}"."""
    if layout == "v2":
        return pa.int64(), lambda numbers: pa.array(numbers, pa.int64())
    prefix = pa.scalar(f"{name}_")
    return pa.string(), lambda numbers: pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def corpus_output(docs, layout, name):
    """The corpus of v2 (doc_id, input_ids) or published_v2 (input_ids, doc_id): the distinct passages and
    negatives in order of their numbers."""
    id_type, ids = doc_ids(layout, name)
    fields = [pa.field("doc_id", id_type), pa.field("input_ids", TOKENS)]
    if layout == "published_v2":
        fields.reverse()
    schema = pa.schema(fields)

    def tables():
        for start, tokens in docs.batches():
            columns = {"doc_id": ids(np.arange(start, start + len(tokens))), "input_ids": tokens}
            yield pa.Table.from_arrays([columns[field.name] for field in fields], schema=schema)

    return Output(schema, tables())


def query_output(queries, index, columns, layout, name, rows):
    """The query file of v2 (`query_input_ids`, `{column}_id`) or published_v2 (`query_input_ids`,
    `{column}_input_ids`: doc_ids under the published names), `rows` rows a table."""
    id_type, ids = doc_ids(layout, name)
    suffix = "_id" if layout == "v2" else "_input_ids"
    schema = pa.schema([pa.field("query_input_ids", TOKENS)] + [pa.field(c + suffix, id_type) for c in columns[1:]])

    def tables():
        for start in range(0, len(index[columns[0]]), rows):
            part = slice(start, start + rows)
            arrays = [queries.take(index[columns[0]][part])] + [ids(index[c][part]) for c in columns[1:]]
            yield pa.Table.from_arrays(arrays, schema=schema)

    return Output(schema, tables())


def write_atomic(output, path):
    """Write to `path.tmp-PID`, then rename: `path` is either the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(tmp, output.schema) as writer:
            write_row_groups(writer, output.tables)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err}") from err
        raise


def write_row_groups(writer, tables):
    """The tables, in order, in row groups of as many rows as row_group_rows gives for the first: bounded
    (see row_group_rows), and all of a size but the last."""
    group_rows, pending, pending_rows = None, [], 0
    for table in tables:
        if not table.num_rows:
            continue
        group_rows = group_rows or row_group_rows(table)
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= group_rows:
            joined, full = pa.concat_tables(pending), pending_rows - pending_rows % group_rows
            writer.write_table(joined.slice(0, full), row_group_size=group_rows)
            pending, pending_rows = [joined.slice(full)], pending_rows - full
    if pending_rows:
        writer.write_table(pa.concat_tables(pending), row_group_size=group_rows)


def tokenizer_fingerprint(tokenizer):
    """sha256 of the tokenizer's full definition (fast tokenizers: the tokenizer.json content, without
    its truncation / padding state, which calls change) and of its eos token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow tokenizer: its class and vocabulary
        spec = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]
    text = json.dumps([spec, tokenizer.eos_token, tokenizer.eos_token_id], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_stamp(path):
    """Size and mtime_ns of the input file; for a folder `NAME.parquet` of parquet parts (as Spark
    writes them), of all the files in it: total size, newest mtime (the folder's own included, which
    changes when a part is added or removed) and their number."""
    try:
        stat = os.stat(path)
    except OSError as err:  # a dangling link, a file removed since the listing
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if not os.path.isdir(path):
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    size, mtime_ns, files = 0, stat.st_mtime_ns, 0
    for folder, _, names in os.walk(path):
        mtime_ns = max(mtime_ns, os.stat(folder).st_mtime_ns)
        for name in names:
            part = os.stat(os.path.join(folder, name))
            size, mtime_ns, files = size + part.st_size, max(mtime_ns, part.st_mtime_ns), files + 1
    return {"size": size, "mtime_ns": mtime_ns, "files": files}


def make_record(input_path, max_seq_length, fingerprint, layout):
    """What an output is made from: the input's stamp (size, mtime_ns) and the settings. A file cut by
    --max_rows_per_dataset adds "sample" (sample_record); a file kept whole has none, so that its
    record is the one it had before the flag existed."""
    return {"version": RECORD_VERSION, "input": input_stamp(input_path), "max_seq_length": max_seq_length,
            "tokenizer": fingerprint, "layout": layout}


def read_record(path):
    """The record stored in an output file, or None if it has none or cannot be read."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[RECORD_KEY])
    except Exception:  # no record, not a parquet file, a folder, ...: pyarrow raises several types
        return None


def why_tokenize(input_path, output_path, record, overwrite):
    """None if output_path (and for v2 / published_v2 its corpus) already holds the tokenization
    `record` describes; else why it is (re)made ("" for a new file)."""
    if not os.path.exists(output_path):
        return ""
    if overwrite:
        return "--overwrite"
    if os.path.exists(input_path) and os.path.samefile(input_path, output_path):
        return "in place (the input is the output: its stamp cannot tell whether the texts changed)"
    have = read_record(output_path)
    if have is None:
        return "the existing output has no tokenization record (an older run or another tool wrote it)"
    have.setdefault("layout", "v1")  # records from before --layout existed describe v1 outputs
    if have == record:
        return why_corpus(output_path, record)
    if have.get("version") != record["version"]:
        return "the existing output was written by another version of this script"
    if have["layout"] != record["layout"]:
        return f"--layout changed ({have['layout']} -> {record['layout']})"
    if have.get("max_seq_length") != record["max_seq_length"]:
        return f"max_seq_length changed ({have.get('max_seq_length')} -> {record['max_seq_length']})"
    if have.get("tokenizer") != record["tokenizer"]:
        return "the tokenizer changed"
    if have.get("input") != record["input"]:
        return "the input file changed (size or modification time) since it was tokenized"
    if have.get("sample") != record.get("sample"):
        return why_sample(have.get("sample"), record.get("sample"))
    return "the existing output's tokenization record does not match this run's"


def why_sample(have, want):
    """Why the rows kept differ, the input and the other settings being the same."""
    def kept(sample):
        return "all rows" if sample is None else f"{sample['max_rows']} rows, seed {sample['seed']}"

    if have is not None and want is not None and (have["max_rows"], have["seed"]) == (want["max_rows"], want["seed"]):
        return ("the rows drawn by --max_rows_per_dataset changed: the row count of an earlier input file "
                "changed (each file's draw continues one random stream over the files in sorted order)")
    return f"--max_rows_per_dataset / --sample_seed changed the rows kept ({kept(have)} -> {kept(want)})"


def corpus_of(output_path, layout):
    """The corpus of a v2 or published_v2 query file; None for v1."""
    if layout == "published_v2":
        return output_path[: -len("_query.parquet")] + "_corpus.parquet"
    return corpus_path(output_path) if layout == "v2" else None


def why_corpus(output_path, record):
    """None unless the output is a v2 / published_v2 query file whose corpus is missing or has
    another record."""
    corpus = corpus_of(output_path, record["layout"])
    if corpus is None:
        return None
    if not os.path.exists(corpus):
        return f"its corpus {corpus} is missing"
    if read_record(corpus) != record:
        return f"its corpus {corpus} is not from the same input and settings"
    return None


def remove_stale_temp_files(output_dir):
    """Delete `*.parquet.tmp-PID` files of runs that are gone (killed): the pid is not running, or
    is ours (a reused pid). A temp file of a run still alive on this machine is left alone."""
    for name in sorted(os.listdir(output_dir)):
        match = TEMP_FILE.fullmatch(name)
        path = os.path.join(output_dir, name)
        if not match or not os.path.isfile(path):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _running(pid):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        print(f"removed {name}: a temp file left by an interrupted run", flush=True)


def _running(pid):
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def tokenize_file(path, name, targets, record, sample, workers, args):
    """Check, tokenize and write one input file. targets: (output file, its corpus or None); sample: (the
    rows drawn by --max_rows_per_dataset, the row count they were drawn from), or None for every row."""
    source = input_rows(open_input(path), path, args.chunk_rows)
    if source.num_rows == 0:  # emptied since check_not_empty
        raise empty_input_error(path)
    columns = text_columns(source.schema, path)
    check_columns(((column, source.column(column)) for column in columns), path)
    out_path, corpus = targets
    folder = os.path.dirname(out_path)
    if sample is not None:  # checked in full first, so that errors name the input's own rows
        rows, num_rows = sample
        if source.num_rows != num_rows:
            raise UserError(f"{path}: changed while being read ({num_rows} rows in its footer, "
                            f"{source.num_rows} read); run again")
        needed = [field.name for field in kept_fields(source.schema)] if args.layout == "v1" else columns
        source = source.sample(rows, needed, folder)
    queries, docs, index = tokenize_groups(source, columns, workers, name, folder)
    if args.layout == "v1":
        write_atomic(stamped(v1_output(source, columns, queries, docs, index), record), out_path)
    else:  # the corpus first: a query file never exists without its corpus
        write_atomic(stamped(corpus_output(docs, args.layout, name), record), corpus)
        write_atomic(stamped(query_output(queries, index, columns, args.layout, name, args.chunk_rows), record),
                     out_path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="folder with the backbone's tokenizer")
    p.add_argument("--input_dir", required=True, help="folder of raw *.parquet files")
    p.add_argument("--output_dir", required=True, help="where the tokenized files go")
    p.add_argument("--max_seq_length", type=int, default=1024, help="tokens per text, eos included")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer worker processes")
    p.add_argument("--pool_min_chars", type=int, default=POOL_MIN_CHARS, metavar="N",
                   help="start the worker processes only once a file's queries or documents hold at least N "
                        "characters of distinct text; smaller inputs are tokenized in this process, where they "
                        f"take less time than starting the workers (default {POOL_MIN_CHARS:,}; 0: always the workers)")
    p.add_argument("--layout", choices=LAYOUTS, default="v1",
                   help="v1: token columns added to each file (F2LLM's published output); v2: a query file of "
                        "integer ids into a per-dataset corpus file corpus/NAME.parquet (smaller on disk); "
                        "published_v2: F2LLM-v2's published output, NAME_query.parquet with string doc ids into "
                        "NAME_corpus.parquet (the published v2 run: --layout published_v2 --max_seq_length 2048 "
                        "--max_rows_per_dataset 80000)")
    p.add_argument("--max_rows_per_dataset", type=int, default=None, metavar="N",
                   help="keep N rows, drawn at random, of each input file that has more (the published v2 run: "
                        "80000); default: keep every row")
    p.add_argument("--sample_seed", type=int, default=42,
                   help="seed of the one numpy RandomState that draws the rows for --max_rows_per_dataset over "
                        "the files in sorted order, as the published v2 script does with seed 42 (default 42)")
    p.add_argument("--chunk_rows", type=int, default=CHUNK_ROWS, metavar="N",
                   help="rows per read batch of one column, and distinct texts per tokenization round: what bounds "
                        "the memory (reads of several columns at once take N / columns rows); the hashes of the "
                        "distinct texts (24 bytes each) and 8 bytes per text cell still grow with the file "
                        f"(default {CHUNK_ROWS:,})")
    p.add_argument("--overwrite", action="store_true",
                   help="tokenize every file again, even those already tokenized with the same input and settings")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2 (one token of text plus eos)")
    if args.max_rows_per_dataset is not None and args.max_rows_per_dataset < 2:
        raise UserError(f"--max_rows_per_dataset must be at least 2 (got {args.max_rows_per_dataset}); "
                        "leave it out to keep every row")
    if args.chunk_rows < 1:
        raise UserError(f"--chunk_rows must be at least 1 (got {args.chunk_rows})")
    if not 0 <= args.sample_seed < 2**32:
        raise UserError(f"--sample_seed must be between 0 and {2**32 - 1} (a numpy RandomState seed), "
                        f"got {args.sample_seed}")
    if not os.path.isdir(args.input_dir):
        raise UserError(f"input folder {args.input_dir} not found: pass --input_dir with the raw parquet files")
    files = sorted(glob.glob(os.path.join(args.input_dir, "*.parquet")))
    if not files:
        raise UserError(f"no *.parquet files in {args.input_dir}")
    check_not_empty(files)
    tokenizer = load_tokenizer(args.model_path)  # fail here, once, rather than in every worker
    fingerprint = tokenizer_fingerprint(tokenizer)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {args.output_dir}: {err.strerror}") from None
    in_place = os.path.samefile(args.input_dir, args.output_dir)
    if in_place and args.layout == "v2":
        raise UserError("--layout v2 cannot write into --input_dir: its query files hold no texts and would "
                        "replace the raw files; pass another --output_dir")
    if in_place and args.layout == "published_v2":
        raise UserError("--layout published_v2 cannot write into --input_dir: its NAME_query.parquet and "
                        "NAME_corpus.parquet files would be read as raw files by the next run; pass another "
                        "--output_dir")
    if in_place and args.max_rows_per_dataset is not None:
        raise UserError("--max_rows_per_dataset cannot write into --input_dir: the files cut to the rows kept "
                        "would replace the raw ones; pass another --output_dir")
    if args.layout == "v2":
        try:
            os.makedirs(os.path.join(args.output_dir, "corpus"), exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the corpus folder in {args.output_dir}: {err.strerror}") from None
        remove_stale_temp_files(os.path.join(args.output_dir, "corpus"))
    remove_stale_temp_files(args.output_dir)
    inputs = {os.path.realpath(path): path for path in files}
    # one stream for all files, as the published script's global RandomState; none without the flag
    rs = np.random.RandomState(args.sample_seed) if args.max_rows_per_dataset is not None else None
    workers, done, skipped = Workers(tokenizer, args.model_path, args.max_seq_length, args.num_proc,
                                     args.pool_min_chars), 0, 0
    try:
        for path in files:
            name = os.path.basename(path)[: -len(".parquet")]
            out_path, corpus = output_paths(args.output_dir, name, args.layout)
            if args.layout != "v1":  # v1 may replace its own input (in place); no other layout may
                for target in (corpus, out_path):
                    if os.path.realpath(target) in inputs:
                        raise UserError(f"{target}: writing it would replace the input file "
                                        f"{inputs[os.path.realpath(target)]}; pass another --output_dir")
            record = make_record(path, args.max_seq_length, fingerprint, args.layout)  # stamp taken before reading
            num_rows = rows = None
            if rs is not None:  # every file draws (skipped ones too), so each file's rows match the full run's
                num_rows = count_rows(path)
                rows = draw_rows(num_rows, args.max_rows_per_dataset, rs)
            if rows is not None:
                record["sample"] = sample_record(rows, args.max_rows_per_dataset, args.sample_seed)
            reason = why_tokenize(path, out_path, record, args.overwrite)
            if reason is None:
                print(f"skip {name}: already tokenized (same input file, max_seq_length and tokenizer)", flush=True)
                skipped += 1
                continue
            if reason:
                print(f"retokenize {name}: {reason}", flush=True)
            sample = None if rows is None else (rows, num_rows)
            tokenize_file(path, name, (out_path, corpus), record, sample, workers, args)
            done += 1
    finally:
        workers.close()
    print(f"tokenized {done} file(s), skipped {skipped} already tokenized, into {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
