"""Pre-tokenize F2LLM training data (--layout v1: F2LLM's published output; v2: a query file plus a corpus
per dataset; published_v2: F2LLM-v2's published output).

Reads every `*.parquet` of --input_dir (columns `query`, `passage`, `negative_1` ... `negative_n`).
Each text: no special tokens, cut to max_seq_length - 1 tokens, eos appended. Passages and
negatives are deduplicated first, so each unique text is tokenized once, in batches: in this process
or, once a file brings at least --pool_min_chars characters of distinct text, over a pool of --num_proc
worker processes. Output per input file NAME.parquet:
- v1: the same file in --output_dir with int-list columns `query_input_ids`, `passage_input_ids`,
  `negative_{i}_input_ids` added.
- v2 (F2LLM-v2's disk-efficient idea, with integer ids): the corpus `corpus/NAME.parquet` of the
  unique passages and negatives (`doc_id` = row position, `input_ids`), written first, then the query
  file `NAME.parquet` with `query_input_ids` and ids into the corpus `passage_id`, `negative_{i}_id`.
- published_v2 (the files F2LLM-v2's published tokenizer writes): the corpus `NAME_corpus.parquet`
  of the unique passages and negatives (`input_ids`, `doc_id` = the string "NAME_{i}"), written
  first, then `NAME_query.parquet` with `query_input_ids` and, under the published names
  `passage_input_ids`, `negative_{i}_input_ids`, the string doc_ids of the corpus rows (the text
  columns dropped). The published README concatenates the `*_corpus.parquet` files into one
  `corpus.parquet`; training reads either, so none is written here.
The published F2LLM-v2 run is `--layout published_v2 --max_seq_length 2048 --max_rows_per_dataset
80000` (--sample_seed 42, the default); its default special tokens add none for Qwen3, as here.

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
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re

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
# Where the pool pays off: on 2 cores this process tokenizes ~0.7-1.1M characters/s (F2LLM-like passages) and
# 2 workers tokenize no faster, while starting them takes 8.5-14 s (2026-11-30, load average 3-3.6); below
# ~10M characters (~10,000 passages) their start alone takes longer than the whole job here.
POOL_MIN_CHARS = 10_000_000
RECORD_KEY = b"f2llm_tokenize"  # parquet schema metadata: what an output file was made from
LAYOUTS = ("v1", "v2", "published_v2")
RECORD_VERSION = 1  # bump when this script's output for the same input and settings changes
TEMP_FILE = re.compile(r".+\.parquet\.tmp-(\d+)")  # write_atomic's temp files (the number is a pid)


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


def check_utf8(table, columns, path):
    """Parquet readers do not validate UTF-8: a file written with bytes that are not UTF-8 in a
    string column reads without error and would fail later, deep in Arrow's string kernels."""
    for name in columns:
        offset, bad_rows = 0, []
        for chunk in table.column(name).chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                for i, raw in enumerate(chunk.cast(pa.large_binary()).to_pylist()):  # no validation on this cast
                    try:
                        raw is None or raw.decode("utf-8")
                    except UnicodeDecodeError:
                        bad_rows.append(offset + i)
            offset += len(chunk)
        if bad_rows:
            raise UserError(f"{path}: column '{name}' has {len(bad_rows)} text(s) that are not valid UTF-8 "
                            f"(rows {rows_shown(bad_rows)}); write the file with UTF-8 strings and run again")


def check_texts(table, columns, path):
    """Text that is not UTF-8, null, empty or whitespace-only is an error: nothing is dropped silently."""
    check_utf8(table, columns, path)
    problems = []
    for name in columns:
        col = table.column(name)
        bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
        bad_rows = pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist()
        if bad_rows:
            problems.append(f"'{name}' {len(bad_rows)} (rows {rows_shown(bad_rows)})")
    if problems:
        raise UserError(f"{path}: null or empty texts in column {'; '.join(problems)}; "
                        f"fill or remove those rows and run again")


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
    loaded, until one call brings at least min_chars characters of distinct text; from then on over a
    pool of num_proc workers. On small inputs the pool costs more than it saves: each spawned worker
    imports torch and transformers and loads the tokenizer first (see POOL_MIN_CHARS)."""

    def __init__(self, tokenizer, model_path, max_seq_length, num_proc, min_chars=POOL_MIN_CHARS):
        _worker_state.update(tokenizer=tokenizer, max_seq_length=max_seq_length)  # this process's calls
        self.pool_args, self.pool = (model_path, max_seq_length, num_proc), None
        self.min_chars = min_chars if num_proc > 1 else math.inf

    def imap(self, fn, chunks):
        if self.pool is None and (chars := sum(len(text) for chunk in chunks for text in chunk)) >= self.min_chars:
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


def tokenize_unique(texts, pool, desc):
    """Tokenize a list of distinct texts through `pool` (a Pool or Workers; None: in this process)."""
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
    arrays = []  # each chunk to Arrow at once: Python's int lists take ~10x the memory of int32 ids
    with tqdm(total=len(texts), desc=desc, unit="text") as bar:
        for chunk_ids in results:
            arrays.append(pa.array(chunk_ids, type=pa.list_(pa.int32())))
            bar.update(len(chunk_ids))
    return pa.concat_arrays(arrays or [pa.array([], type=pa.list_(pa.int32()))])


def tokenize_texts(table, group, pool, label):
    """The distinct texts of the `group` columns, each tokenized once: (token id lists, {column: each
    row's index into them})."""
    # string and large_string columns may mix in one file: compare them as large_string
    texts = {name: table.column(name).cast(pa.large_string()) for name in group}
    unique = pc.unique(pa.chunked_array([c for col in texts.values() for c in col.chunks], type=pa.large_string()))
    token_ids = tokenize_unique(unique.to_pylist(), pool, label)
    return token_ids, {name: pc.index_in(texts[name], value_set=unique) for name in group}


def tokenize_table(table, columns, pool, desc):
    """v1: add `{column}_input_ids` for each text column; each distinct text is tokenized once."""
    for group, label in ((columns[:1], f"{desc} queries"), (columns[1:], f"{desc} passages+negatives")):
        token_ids, index = tokenize_texts(table, group, pool, label)
        for name in group:
            table = table.append_column(f"{name}_input_ids", token_ids.take(index[name]))
    return table


def tokenize_v2(table, columns, pool, desc):
    """v2: (query table, corpus). The corpus holds each distinct passage / negative text once, as
    (doc_id = row position, input_ids); the query table `query_input_ids` and, for each passage and
    negative column, `{column}_id` into the corpus."""
    query_ids, query_index = tokenize_texts(table, columns[:1], pool, f"{desc} queries")
    docs, doc_index = tokenize_texts(table, columns[1:], pool, f"{desc} passages+negatives")
    corpus = pa.table({"doc_id": pa.array(np.arange(len(docs)), pa.int64()), "input_ids": docs})
    queries = pa.table({"query_input_ids": query_ids.take(query_index["query"]),
                        **{f"{name}_id": doc_index[name].cast(pa.int64()) for name in columns[1:]}})
    return queries, corpus


def tokenize_published_v2(table, columns, pool, name):
    """published_v2: (query table, corpus) in the published F2LLM-v2 format. The corpus holds each
    distinct passage / negative text once, as (input_ids, doc_id = "NAME_{i}", i in the order of the
    distinct texts): the name makes the ids unique across datasets, so that the corpora can be
    concatenated. The query table has `query_input_ids` and, for each passage and negative column,
    `{column}_input_ids` holding doc_id strings (the published names, although they are not tokens)."""
    query_ids, query_index = tokenize_texts(table, columns[:1], pool, f"{name} queries")
    docs, doc_index = tokenize_texts(table, columns[1:], pool, f"{name} passages+negatives")
    doc_ids = pa.array([f"{name}_{i}" for i in range(len(docs))], pa.string())
    corpus = pa.table({"input_ids": docs, "doc_id": doc_ids})
    queries = pa.table({"query_input_ids": query_ids.take(query_index["query"]),
                        **{f"{c}_input_ids": doc_ids.take(doc_index[c]) for c in columns[1:]}})
    return queries, corpus


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
    whose footer cannot be read is left to read_input, whose error says more about it."""
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


def write_atomic(table, path):
    """Write to `path.tmp-PID`, then rename: `path` is either the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows(table))  # bounded: see row_group_rows
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err}") from err
        raise


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


def read_input(path):
    """The raw table of an input file; a file that cannot be read is a UserError that says why."""
    try:
        table = pq.read_table(path)
        _ = table.schema.names  # decodes the names: a corrupt footer can hold bytes that are not UTF-8
        return table
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: a column name is not valid UTF-8 ({err.reason} at byte {err.start}); "
                        "the file is corrupt or was written by a broken tool") from None
    except (pa.ArrowException, OSError) as err:
        try:
            names = pq.read_schema(path).names
        except Exception:  # not readable at all: report read_table's error
            names = []
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once; "
                            "give every column its own name") from None
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None


def with_record(table, record):
    """The table with `record` in its schema metadata (other metadata kept, an older record replaced)."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), RECORD_KEY: json.dumps(record).encode()})


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
            table = read_input(path)
            if table.num_rows == 0:  # emptied since check_not_empty
                raise empty_input_error(path)
            columns = text_columns(table.schema, path)
            check_texts(table, columns, path)
            table = table.drop_columns([c for c in table.column_names if c.endswith("_input_ids")])
            if rows is not None:  # checked in full first, so that errors name the input's own rows
                if table.num_rows != num_rows:
                    raise UserError(f"{path}: changed while being read ({num_rows} rows in its footer, "
                                    f"{table.num_rows} read); run again")
                table = table.take(rows)
            if args.layout == "v1":
                write_atomic(with_record(tokenize_table(table, columns, workers, name), record), out_path)
            else:  # the corpus first: a query file never exists without its corpus
                make = tokenize_v2 if args.layout == "v2" else tokenize_published_v2
                queries, corpus_table = make(table, columns, workers, name)
                write_atomic(with_record(corpus_table, record), corpus)
                write_atomic(with_record(queries, record), out_path)
            done += 1
    finally:
        workers.close()
    print(f"tokenized {done} file(s), skipped {skipped} already tokenized, into {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
