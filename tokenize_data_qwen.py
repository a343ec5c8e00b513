"""Pre-tokenize raw F2LLM data (parquet files of query, passage, negative_1 ... negative_n texts) for training.

    python tokenize_data_qwen.py --model_path BACKBONE --input_dir RAW --output_dir OUT [--layout v1|v2|published_v2]
        [--max_seq_length 1024] [--max_rows_per_dataset N] [--sample_seed 42] [--num_proc N]
        [--pool_min_chars N] [--chunk_rows N] [--overwrite]

Each text is cut to max_seq_length - 1 tokens and gets eos; each distinct text is tokenized once.
--layout v1 adds token columns to each file (F2LLM's published output), v2 writes a query file of ids
into a corpus per dataset, published_v2 F2LLM-v2's published files. Outputs record what they were made
from, and a re-run skips those already made from the same input and settings. From Python:
tokenize_folder(). The rules, formats, records, resume behaviour and memory: docs/tokenize_data.md.
"""
import argparse
import glob
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import signal
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from data import TOKENIZE_RECORD, check_text_chunks, corpus_path, text_columns, tokenize
from errors import UserError, exit_on_user_error
from files import (Output, input_stamp, open_input, reading, record_metadata, remove_stale_temp_files, stored_record,
                   unreadable, write_atomic)
from model import load_tokenizer, tokenizer_rule

CHUNK = 1000  # texts per worker task: large enough for batched fast tokenization
# Rows per read batch of one column, and distinct texts per tokenization round: ~100 MB of F2LLM-like passages,
# and 100 worker tasks, so that a pool rarely waits for the round's last task.
CHUNK_ROWS = 100_000
# Where the pool pays off: on 2 cores this process tokenizes ~0.7-1.1M characters/s (F2LLM-like passages) and
# 2 workers tokenize no faster, while starting them takes 8.5-14 s (2026-11-30, load average 3-3.6); below
# ~10M characters (~10,000 passages) their start alone takes longer than the whole job here.
POOL_MIN_CHARS = 10_000_000
RECORD_KEY = TOKENIZE_RECORD  # parquet schema metadata: what an output file was made from
LAYOUTS = ("v1", "v2", "published_v2")
RECORD_VERSION = 1  # bump when this script's output for the same input and settings changes
TOKENS = pa.list_(pa.int32())
# Pages are read through a 1 MiB buffer (as plain_files reads): by default the reader holds a row group's whole
# column chunk (pyarrow writes up to 1,048,576 rows in a group), and the scan pre-buffers it.
SCAN = {"batch_readahead": 1, "fragment_readahead": 1, "fragment_scan_options": ds.ParquetFragmentScanOptions(
    use_buffered_stream=True, buffer_size=2**20, pre_buffer=False)}


_worker_state = {}  # the tokenizer tokenize_chunk uses: a pool worker's (init_worker), or tokenize_folder's (Workers)


def init_worker(model_path, max_seq_length, threads=True, special_tokens=False):
    if not threads:  # pool workers already fill the cores: no tokenizer threads on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(tokenizer=load_tokenizer(model_path, special_tokens=special_tokens),
                         max_seq_length=max_seq_length, special_tokens=special_tokens)


def make_pool(model_path, max_seq_length, num_proc, special_tokens=False):
    """num_proc worker processes that each load the tokenizer once. They ignore SIGINT from their start
    (an ignored signal stays ignored across exec, and Python then sets no KeyboardInterrupt handler), so
    that a Ctrl-C at the terminal, which signals the whole process group, interrupts this process only: it
    terminates the pool (Workers.close) and prints one line, instead of every worker printing a
    KeyboardInterrupt traceback. (A Ctrl-C in the milliseconds the workers take to fork is lost.)"""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the workers take this process's handling
        before = None
    try:
        return multiprocessing.get_context("spawn").Pool(num_proc, initializer=init_worker,
                                                         initargs=(model_path, max_seq_length, False, special_tokens))
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


class Workers:
    """Where texts are tokenized (an `imap` like a Pool's): in this process, with the tokenizer tokenize_folder
    loaded, until the calls for one file's queries (or its passages and negatives) bring at least min_chars
    characters of distinct text; from then on over a pool of num_proc workers. On small inputs the pool costs
    more than it saves: each spawned worker imports torch and transformers and loads the tokenizer first (see
    POOL_MIN_CHARS)."""

    def __init__(self, tokenizer, model_path, max_seq_length, num_proc, min_chars=POOL_MIN_CHARS, special_tokens=False):
        # this process's calls
        _worker_state.update(tokenizer=tokenizer, max_seq_length=max_seq_length, special_tokens=special_tokens)
        self.pool_args, self.pool = (model_path, max_seq_length, num_proc, special_tokens), None
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


def tokenize_chunk(texts):
    return tokenize(_worker_state["tokenizer"], texts, _worker_state["max_seq_length"],
                    _worker_state.get("special_tokens", False))


def tokenize_unique(texts, pool, bar=None, before=0):
    """Tokenize a list of distinct texts through `pool` (Workers, a Pool, or None: in this process), counted
    on the progress bar `bar`; `before`: see Workers.imap."""
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    if isinstance(pool, Workers):
        results = pool.imap(tokenize_chunk, chunks, before)
    else:
        results = pool.imap(tokenize_chunk, chunks) if pool else map(tokenize_chunk, chunks)
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
        raise unreadable(path, err) from None


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


def make_record(input_path, max_seq_length, fingerprint, layout, special_tokens=False):
    """What an output is made from: the input's stamp (size, mtime_ns) and the settings. A file cut by
    --max_rows_per_dataset adds "sample" (sample_record), and a file tokenized for an encoder, with the
    tokenizer's special tokens, "special_tokens": true (data.check_tokenization_rule reads it); the
    others have neither, so that a decoder's record is the one it had before encoders existed."""
    record = {"version": RECORD_VERSION, "input": input_stamp(input_path), "max_seq_length": max_seq_length,
              "tokenizer": fingerprint, "layout": layout}
    return {**record, "special_tokens": True} if special_tokens else record


def read_record(path):
    """The record stored in an output file, or None if it has none or cannot be read."""
    return stored_record(path, RECORD_KEY)


def with_record(table, record):
    return table.replace_schema_metadata(record_metadata(table.schema.metadata, RECORD_KEY, record))


def stamped(output, record):
    return Output(output.schema.with_metadata(record_metadata(output.schema.metadata, RECORD_KEY, record)),
                  output.tables)


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


def tokenize_file(path, name, targets, record, sample, workers, chunk_rows):
    """Check, tokenize and write one input file. targets: (output file, its corpus or None); sample: (the
    rows drawn by --max_rows_per_dataset, the row count they were drawn from), or None for every row."""
    layout = record["layout"]
    source = input_rows(open_input(path), path, chunk_rows)
    if source.num_rows == 0:  # emptied since check_not_empty
        raise empty_input_error(path)
    columns = text_columns(source.schema, path)
    check_text_chunks(((column, source.column(column)) for column in columns), path)
    out_path, corpus = targets
    folder = os.path.dirname(out_path)
    if sample is not None:  # checked in full first, so that errors name the input's own rows
        rows, num_rows = sample
        if source.num_rows != num_rows:
            raise UserError(f"{path}: changed while being read ({num_rows} rows in its footer, "
                            f"{source.num_rows} read); run again")
        needed = [field.name for field in kept_fields(source.schema)] if layout == "v1" else columns
        source = source.sample(rows, needed, folder)
    queries, docs, index = tokenize_groups(source, columns, workers, name, folder)
    if layout == "v1":
        write_atomic(stamped(v1_output(source, columns, queries, docs, index), record), out_path)
    else:  # the corpus first: a query file never exists without its corpus
        write_atomic(stamped(corpus_output(docs, layout, name), record), corpus)
        write_atomic(stamped(query_output(queries, index, columns, layout, name, chunk_rows), record), out_path)


# ---- the public function ---------------------------------------------------------------------------

def check_settings(max_seq_length, layout, max_rows_per_dataset, sample_seed, chunk_rows):
    """The settings' own limits, before anything is read."""
    if max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2 (one token of text plus eos)")
    if max_rows_per_dataset is not None and max_rows_per_dataset < 2:
        raise UserError(f"--max_rows_per_dataset must be at least 2 (got {max_rows_per_dataset}); "
                        "leave it out to keep every row")
    if chunk_rows < 1:
        raise UserError(f"--chunk_rows must be at least 1 (got {chunk_rows})")
    if not 0 <= sample_seed < 2**32:
        raise UserError(f"--sample_seed must be between 0 and {2**32 - 1} (a numpy RandomState seed), "
                        f"got {sample_seed}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")


def input_files(input_dir):
    """The `*.parquet` of input_dir, sorted, each holding rows."""
    if not os.path.isdir(input_dir):
        raise UserError(f"input folder {input_dir} not found: pass --input_dir with the raw parquet files")
    files = sorted(glob.glob(os.path.join(input_dir, "*.parquet")))
    if not files:
        raise UserError(f"no *.parquet files in {input_dir}")
    check_not_empty(files)
    return files


def prepare_output(input_dir, output_dir, layout, max_rows_per_dataset):
    """Create the output folder (and v2's corpus folder) and clear the temp files of killed runs; refuse
    to write into input_dir what would replace the raw files."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {output_dir}: {err.strerror}") from None
    in_place = os.path.samefile(input_dir, output_dir)
    if in_place and layout == "v2":
        raise UserError("--layout v2 cannot write into --input_dir: its query files hold no texts and would "
                        "replace the raw files; pass another --output_dir")
    if in_place and layout == "published_v2":
        raise UserError("--layout published_v2 cannot write into --input_dir: its NAME_query.parquet and "
                        "NAME_corpus.parquet files would be read as raw files by the next run; pass another "
                        "--output_dir")
    if in_place and max_rows_per_dataset is not None:
        raise UserError("--max_rows_per_dataset cannot write into --input_dir: the files cut to the rows kept "
                        "would replace the raw ones; pass another --output_dir")
    if layout == "v2":
        try:
            os.makedirs(os.path.join(output_dir, "corpus"), exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the corpus folder in {output_dir}: {err.strerror}") from None
        remove_stale_temp_files(os.path.join(output_dir, "corpus"))
    remove_stale_temp_files(output_dir)


def tokenize_folder(model_path, input_dir, output_dir, *, max_seq_length=1024, layout="v1", max_rows_per_dataset=None,
                    sample_seed=42, num_proc=None, pool_min_chars=POOL_MIN_CHARS, chunk_rows=CHUNK_ROWS,
                    overwrite=False):
    """Tokenize every `*.parquet` of input_dir into output_dir with the tokenizer of model_path, skipping
    the outputs already made from the same input and settings. The keyword arguments are the command
    line's flags, with its defaults (num_proc None: one per core). Returns (files tokenized, files
    skipped). Bad settings or input are a UserError that says what to fix (a file's texts are all checked
    before its output is written)."""
    check_settings(max_seq_length, layout, max_rows_per_dataset, sample_seed, chunk_rows)
    files = input_files(input_dir)
    special_tokens = tokenizer_rule(model_path)
    tokenizer = load_tokenizer(model_path, special_tokens=special_tokens)  # fail here, once, not in every worker
    fingerprint = tokenizer_fingerprint(tokenizer)
    prepare_output(input_dir, output_dir, layout, max_rows_per_dataset)
    inputs = {os.path.realpath(path): path for path in files}
    # one stream for all files, as the published script's global RandomState; none without the flag
    rs = np.random.RandomState(sample_seed) if max_rows_per_dataset is not None else None
    workers = Workers(tokenizer, model_path, max_seq_length, os.cpu_count() if num_proc is None else num_proc,
                      pool_min_chars, special_tokens)
    done = skipped = 0
    try:
        for path in files:
            name = os.path.basename(path)[: -len(".parquet")]
            out_path, corpus = output_paths(output_dir, name, layout)
            if layout != "v1":  # v1 may replace its own input (in place); no other layout may
                for target in (corpus, out_path):
                    if os.path.realpath(target) in inputs:
                        raise UserError(f"{target}: writing it would replace the input file "
                                        f"{inputs[os.path.realpath(target)]}; pass another --output_dir")
            record = make_record(path, max_seq_length, fingerprint, layout, special_tokens)  # stamp before reading
            num_rows = rows = None
            if rs is not None:  # every file draws (skipped ones too), so each file's rows match the full run's
                num_rows = count_rows(path)
                rows = draw_rows(num_rows, max_rows_per_dataset, rs)
            if rows is not None:
                record["sample"] = sample_record(rows, max_rows_per_dataset, sample_seed)
            reason = why_tokenize(path, out_path, record, overwrite)
            if reason is None:
                print(f"skip {name}: already tokenized (same input file, max_seq_length and tokenizer)", flush=True)
                skipped += 1
                continue
            if reason:
                print(f"retokenize {name}: {reason}", flush=True)
            sample = None if rows is None else (rows, num_rows)
            tokenize_file(path, name, (out_path, corpus), record, sample, workers, chunk_rows)
            done += 1
    finally:
        workers.close()
    print(f"tokenized {done} file(s), skipped {skipped} already tokenized, into {output_dir}", flush=True)
    return done, skipped


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv=None):
    """The flags given, by tokenize_folder's names: those left out take its defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    p.add_argument("--model_path", required=True, help="folder with the backbone's tokenizer")
    p.add_argument("--input_dir", required=True, help="folder of raw *.parquet files")
    p.add_argument("--output_dir", required=True, help="where the tokenized files go")
    p.add_argument("--max_seq_length", type=int,
                   help="tokens per text, the eos (decoders) or special tokens (encoders) included")
    p.add_argument("--num_proc", type=int, help="tokenizer worker processes")
    p.add_argument("--pool_min_chars", type=int, metavar="N",
                   help="start the worker processes only once a file's queries or documents hold at least N "
                        "characters of distinct text; smaller inputs are tokenized in this process, where they "
                        f"take less time than starting the workers (default {POOL_MIN_CHARS:,}; 0: always the workers)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="v1: token columns added to each file (F2LLM's published output); v2: a query file of "
                        "integer ids into a per-dataset corpus file corpus/NAME.parquet (smaller on disk); "
                        "published_v2: F2LLM-v2's published output, NAME_query.parquet with string doc ids into "
                        "NAME_corpus.parquet (the published v2 run: --layout published_v2 --max_seq_length 2048 "
                        "--max_rows_per_dataset 80000)")
    p.add_argument("--max_rows_per_dataset", type=int, metavar="N",
                   help="keep N rows, drawn at random, of each input file that has more (the published v2 run: "
                        "80000); default: keep every row")
    p.add_argument("--sample_seed", type=int,
                   help="seed of the one numpy RandomState that draws the rows for --max_rows_per_dataset over "
                        "the files in sorted order, as the published v2 script does with seed 42 (default 42)")
    p.add_argument("--chunk_rows", type=int, metavar="N",
                   help="rows per read batch of one column, and distinct texts per tokenization round: what bounds "
                        "the memory (reads of several columns at once take N / columns rows); the hashes of the "
                        "distinct texts (24 bytes each) and 8 bytes per text cell still grow with the file "
                        f"(default {CHUNK_ROWS:,})")
    p.add_argument("--overwrite", action="store_true",
                   help="tokenize every file again, even those already tokenized with the same input and settings")
    return p.parse_args(argv)


@exit_on_user_error(interrupted="interrupted: the files already tokenized are complete and nothing half-written is "
                                 "left; run the same command again to continue (finished files are skipped)")
def main(argv=None):
    tokenize_folder(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
