"""The file work that tokenizing, mining and checkpointing share.

Atomic writes: a file is written to NAME.tmp-PID, then renamed, so that NAME is always the old
file or the whole new one; a killed writer leaves its temp file, which the next run removes once
that pid is gone (pid_alive). Parquet outputs are written in row groups of about ROW_GROUP_BYTES,
which bounds what a reader holds at once. An output remembers what it was made from: a JSON record in its
parquet schema metadata, holding among others the input's stamp (size and mtime: one stat(), where
a hash would read the whole input). Inputs are parquet files or folders of parts, opened here so that
a broken one is one line that says why, never a traceback.

What the texts inside an input must be (columns query, passage, negative_i; UTF-8, not blank) is a
rule of the data format, not of files: data.py checks it (text_columns, check_texts), beside its
rules for the tokenized columns.
"""
import contextlib
import hashlib
import json
import os
import re
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from errors import UserError

ROW_GROUP_BYTES = 64 * 2**20

Output = namedtuple("Output", "schema tables")  # a parquet file to write: its schema, and its rows as tables in order


def pid_alive(pid):
    """Whether a process `pid` runs on this machine (ours included)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path):
    """The temp path (`path.tmp-PID`) to write `path` through: renamed to `path` when the block ends
    well, removed when it fails. An OSError (a full disk) is a UserError."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err}") from err
        raise


def write_atomic(output, path):
    """Write an Output as the parquet file `path`, atomically."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, output.schema) as writer:
        write_row_groups(writer, output.tables)


def row_group_rows(table):
    """Rows per parquet row group for about ROW_GROUP_BYTES of the table: data.read_dataset's conversion
    holds a whole row group in memory (~4x its size: 1.4 GB for a group of 330 MB of token ids), and
    pyarrow's default group is the whole table up to 1,048,576 rows."""
    return max(1, ROW_GROUP_BYTES * table.num_rows // max(table.nbytes, 1))


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


def remove_stale_temp_files(folder, suffix=".parquet"):
    """Delete the temp files `*{suffix}.tmp-PID` in `folder` of writers that are gone (killed): the pid
    is not running, or is ours (a reused pid). A temp file of a writer still alive on this machine is
    left alone."""
    pattern = re.compile(rf".+{re.escape(suffix)}\.tmp-(\d+)")
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        path = os.path.join(folder, name)
        if not match or not os.path.isfile(path):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        print(f"removed {name}: a temp file left by an interrupted run", flush=True)


def input_stamp(path):
    """Size and mtime_ns of an input file; for a folder `NAME.parquet` of parquet parts (as Spark
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


def stored_record(path, key):
    """The record stored under `key` (bytes) in a parquet file's schema metadata, or None if it has none
    or cannot be read."""
    try:
        return json.loads((pq.read_schema(path).metadata or {})[key])
    except Exception:  # no record, not a parquet file, a folder, ...: pyarrow raises several types
        return None


def record_metadata(metadata, key, record):
    """Schema metadata with `record` under `key` (the other entries kept, an older record replaced)."""
    return {**(metadata or {}), key: json.dumps(record).encode()}


def unreadable(path, err):
    return UserError(f"{path}: not a readable parquet file ({(str(err).splitlines() or [type(err).__name__])[0]})")


@contextlib.contextmanager
def reading(path):
    """A read error (a corrupt page, a file gone) as the UserError that names path."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, err) from None


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


def read_input(path):
    """The whole table of an input file (or folder of parquet parts)."""
    dataset = open_input(path)
    with reading(path):
        return dataset.to_table()


def file_digest(path, chunk=16 * 2**20):
    """blake2b (128 bits) of a file's bytes: hashlib releases the GIL on each chunk, so threads hash
    several files at disk speed."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_digests(paths, threads=8):
    """{path: file_digest(path)}, hashed by a few threads at once."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return dict(zip(paths, pool.map(file_digest, paths)))


def sampled_digest(path, blocks=16, block=64 * 2**10):
    """A cheap fingerprint of a large file: blake2b of its size, its last 1 MB (a parquet file's
    footer: row counts, column sizes, statistics) and `blocks` blocks spread over the rest. Any
    change of size or footer, and most edits, change it; a full hash would read the whole data at
    every start."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset in [size * i // blocks for i in range(blocks)] + [max(0, size - 2**20)]:
            f.seek(offset)
            digest.update(f.read(block if offset < size - 2**20 else 2**20))
    return digest.hexdigest()
