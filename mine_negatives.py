"""Mine hard negatives for (query, passage) pairs with an embedding model: F2LLM training files out.

    python mine_negatives.py --model CHECKPOINT --input_dir RAW --output_dir OUT [--num_negatives 24]
        [--corpus extra.parquet] [--skip_top K] [--max_rank R] [--positive_margin M] [--sampling top|random]
        [--seed S] [--on_short fill_random|drop] [--batch_size B] [--chunk_size C] [--max_seq_length L]
        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--overwrite]

Each row's candidates are the file's distinct passages and the texts of --corpus, ranked by the model's
cosine score after its exclusions (the query's own positives and text); its negatives come from the
window [skip_top, max_rank), minus those scoring above the positive margin, top or sampled, and short
rows are filled or dropped. Embeddings and rankings are kept in chunks on disk, so a killed run resumes,
also under accelerate launch; outputs record what they were mined from, and a re-run skips those
already mined. From Python: mine(). The rules, formats, records, resume behaviour and processes:
docs/mine_negatives.md.
"""
import argparse
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from data import check_text_type, check_texts, rows_shown
from distributed import Processes
from errors import UserError, exit_on_user_error
from files import (Output, atomic_path, input_stamp, open_input, read_input, record_metadata, remove_stale_temp_files,
                   stored_record, write_atomic)
from model import check_model_folder, pick_dtype, st_settings

RECORD_KEY = b"f2llm_mine"  # parquet schema metadata: what an output was mined from
RECORD_VERSION = 2  # bump when the output for the same inputs and settings changes
WORK_DIR = ".mine_work"
STORE_DTYPE = np.float16
CHUNK_SIZE = 8192  # texts per embedding file: the work a kill can lose per process
QUERY_BLOCK = 1024  # queries per matrix product: a 1024 x CHUNK_SIZE score block is 32 MB (+64 MB of keys)
ROW_BLOCK = 65536  # rows selected at a time: bounds the [rows, max_rank] arrays
FILL_FLOATS = 2**25  # the candidate vectors fill_short gathers at a time (128 MB)
NO_KEY = torch.iinfo(torch.int64).min  # an excluded or missing candidate: below every real key
LOW_32 = 0xFFFFFFFF
KILL_AFTER = "F2LLM_MINE_KILL_AFTER"  # tests: SIGKILL this process after it wrote that many work files
SAMPLE_STREAM, FILL_STREAM, CHECK_STREAM = 0, 1, 2
SEPARATION_ROWS = 4096  # rows whose positive is compared with a random text (Separation)
MIN_GAP, MIN_AHEAD = 0.05, 0.8  # below either, the model does not separate positives from the rest
PROMPTS = {"query": "query", "document": "document"}  # our checkpoints' prompt names
WINDOW_FLAGS = "--skip_top, --max_rank, --positive_margin"
SAMPLINGS, ON_SHORT, DEVICES = ("top", "random"), ("fill_random", "drop"), ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The selection rules (see docs/mine_negatives.md); the defaults are the command line's."""
    num_negatives: int = 24
    skip_top: int = 0
    max_rank: int = 100
    positive_margin: float | None = 0.95
    sampling: str = "top"
    seed: int = 0
    on_short: str = "fill_random"


# ---- corpus, queries and exclusions --------------------------------------------------------------

@dataclasses.dataclass
class Pairs:
    """A file's rows as ids: `qid` into the distinct queries, `pid` into the corpus; per distinct query q,
    excluded[offsets[q]:offsets[q + 1]] are the corpus ids it may never get, sorted."""
    corpus: pa.Array
    queries: pa.Array
    qid: np.ndarray
    pid: np.ndarray
    offsets: np.ndarray
    excluded: np.ndarray

    def excluded_of(self, q):
        return self.excluded[self.offsets[q] : self.offsets[q + 1]]


def build_pairs(table, extra=None):
    """The corpus (distinct passages in order of first appearance, then the texts of `extra` not among
    them), the distinct queries and each query's exclusions: every passage of its rows, its own text."""
    query = table.column("query").cast(pa.large_string())
    passage = table.column("passage").cast(pa.large_string())
    corpus = pc.unique(passage)
    if extra is not None and len(extra):
        extra = pc.unique(extra.cast(pa.large_string()))
        corpus = pa.concat_arrays([corpus, extra.filter(pc.invert(pc.is_in(extra, value_set=corpus)))])
    queries = pc.unique(query)
    qid = np.asarray(pc.index_in(query, value_set=queries).to_numpy(), np.int64)
    pid = np.asarray(pc.index_in(passage, value_set=corpus).to_numpy(), np.int64)
    own = np.asarray(pc.fill_null(pc.index_in(queries, value_set=corpus), -1).to_numpy(), np.int64)  # -1: none
    n = len(corpus)
    has_own = np.flatnonzero(own >= 0)
    codes = np.unique(np.concatenate([qid * n + pid, has_own * n + own[has_own]]))
    offsets = np.searchsorted(codes // n, np.arange(len(queries) + 1)).astype(np.int64)
    return Pairs(corpus, queries, qid, pid, offsets, codes % n)


def owners(offsets):
    """The query of each excluded id, from CSR offsets."""
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def check_enough_texts(pairs, num_negatives, path):
    """Every query must have n corpus texts left once its exclusions are out, or no rule could give it
    n negatives: an error before any embedding."""
    n = len(pairs.corpus)
    if n < num_negatives + 1:
        raise UserError(f"{path}: its corpus has {n} distinct text(s), fewer than --num_negatives + 1 = "
                        f"{num_negatives + 1} (a positive and {num_negatives} negatives); add texts with --corpus "
                        "or lower --num_negatives")
    left = n - np.diff(pairs.offsets)
    poor = np.flatnonzero(left[pairs.qid] < num_negatives)
    if len(poor):
        raise UserError(f"{path}: {len(poor)} row(s) (rows {rows_shown(poor.tolist())}) have a query whose "
                        f"positives and own text leave fewer than {num_negatives} of the {n} corpus texts; add "
                        "texts with --corpus or lower --num_negatives")


# ---- ranking: exact top-k in a total order ---------------------------------------------------------

def order_keys(scores, ids):
    """int64 keys of float32 scores of corpus texts `ids` (an int64 tensor of the same shape, or one that
    broadcasts): ordered as (score, then the lower corpus position first), so that topk over keys is a
    total order."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return bits * 2**32 + (LOW_32 - ids)


def decode_keys(keys):
    """(corpus ids, scores) of keys; NO_KEY gives id -1 and score -inf."""
    keys = np.asarray(keys, np.int64)
    valid = keys != NO_KEY
    ids = np.where(valid, LOW_32 - (keys & LOW_32), -1)
    high = keys >> 32
    scores = np.where(high < 0, high ^ 0x7FFFFFFF, high).astype(np.int32).view(np.float32)
    return ids, np.where(valid, scores, np.float32(-np.inf))


class Vectors:
    """Embedding chunks (arrays or memory maps) seen as one matrix."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self):
        return int(self.starts[-1])

    def rows(self, ids):
        """float32 [len(ids), d]."""
        ids = np.asarray(ids, np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.chunks[0].shape[1]), np.float32)
        for c in np.unique(which):
            at = np.flatnonzero(which == c)
            out[at] = self.chunks[c][ids[at] - self.starts[c]]
        return out

    def scores(self, vectors):
        """float32 scores [len(vectors), len(self)] of query vectors against every row."""
        return np.concatenate([vectors @ np.asarray(c, np.float32).T for c in self.chunks], 1)


def rank(query_vectors, corpus, offsets, excluded, k, device="cpu", block=QUERY_BLOCK):
    """Keys [q, k] of each query's k best corpus texts, best first, its excluded ids (CSR offsets,
    excluded: corpus ids) left out; NO_KEY where fewer than k remain.

    A block's k + 1 best float scores settle its k best texts unless the k-th and the (k + 1)-th tie:
    only the k winners are keyed (and merged with the best so far), and only a row with a tie at that
    boundary has its whole block keyed, so that the lower corpus position wins as the order says."""
    device = torch.device(device)
    queries = on_device(query_vectors, device)
    best = torch.full((len(queries), k), NO_KEY, dtype=torch.int64, device=device)
    owner = owners(offsets)
    for start, chunk in zip(corpus.starts, corpus.chunks):
        docs = on_device(chunk, device)
        inside = (excluded >= start) & (excluded < start + len(chunk))
        rows, cols = owner[inside], excluded[inside] - start
        for b in range(0, len(queries), block):
            scores = queries[b : b + block] @ docs.T
            here = (rows >= b) & (rows < b + block)
            scores[torch.as_tensor(rows[here] - b, device=device), torch.as_tensor(cols[here], device=device)] = -np.inf
            top = scores.topk(min(k + 1, scores.shape[1]), dim=1)
            keys = order_keys(top.values[:, :k], top.indices[:, :k] + int(start))
            keys[top.values[:, :k] == -np.inf] = NO_KEY
            if top.values.shape[1] > k:
                tied = torch.nonzero((top.values[:, k] == top.values[:, k - 1]) & (top.values[:, k] > -np.inf))[:, 0]
                if len(tied):
                    some = scores[tied]
                    full = order_keys(some, torch.arange(int(start), int(start) + some.shape[1], device=device))
                    full[some == -np.inf] = NO_KEY
                    keys[tied] = full.topk(k, dim=1).values
            best[b : b + block] = torch.cat([best[b : b + block], keys], 1).topk(k, dim=1).values
    return best.cpu().numpy()


def on_device(array, device):
    """float32 on `device` of an array or memory map, sent in its own dtype (float16: half the transfer)."""
    return torch.from_numpy(np.array(array)).to(device).float()  # a copy: a memory map is read-only


# ---- selection -----------------------------------------------------------------------------------

def margin_threshold(positive, margin):
    """The highest score a negative may have: pos - (1 - M) |pos| (M x pos for a positive score)."""
    positive = np.asarray(positive, np.float64)
    return positive - (1.0 - margin) * np.abs(positive)


def file_key(name):
    """A 64-bit number of a file name, for the per-row seeds."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def row_rng(settings, key, row, stream):
    return np.random.default_rng([settings.seed, key, int(row), stream])


@dataclasses.dataclass
class Mined:
    """negatives [rows, n] corpus ids (-1: none, in dropped rows); short: the rows that had fewer than n
    in the window; relaxed: fills that had to take a text the window or the margin had ruled out."""
    negatives: np.ndarray
    short: np.ndarray
    relaxed: int = 0
    separation: "Separation" = None


@dataclasses.dataclass
class Separation:
    """How well the model tells a row's positive from a random corpus text, on a sample of rows: the
    median scores of each, and the share of rows whose positive scored higher. It does not change
    what is mined (its own random stream)."""
    positive: float
    random: float
    ahead: float

    @property
    def weak(self):
        return self.positive - self.random < MIN_GAP or self.ahead < MIN_AHEAD


def separation(pairs, positives, queries, corpus, settings, key):
    """Separation of a file's rows (positives: their positive scores)."""
    rng = np.random.default_rng([settings.seed, key, CHECK_STREAM])
    rows = np.sort(rng.permutation(len(pairs.qid))[:SEPARATION_ROWS])
    drawn = rng.integers(len(corpus), size=len(rows))
    keep = drawn != pairs.pid[rows]  # the positive itself is no random text
    rows, drawn = rows[keep], drawn[keep]
    if not len(rows):
        return None
    scores = draw_scores(queries.rows(pairs.qid[rows]), drawn, corpus)
    return Separation(float(np.median(positives[rows])), float(np.median(scores)),
                      float((positives[rows] > scores).mean()))


def select(ids, scores, positive, settings, key, rows):
    """The window's negatives of a block of rows: (ids [b, n], -1 past the row's count; counts [b]).
    ids / scores: the rows' ranked candidates (decode_keys), rows: their row numbers."""
    n = settings.num_negatives
    ids, scores = ids[:, settings.skip_top :], scores[:, settings.skip_top :]
    ok = ids >= 0
    if settings.positive_margin is not None:
        ok &= scores <= margin_threshold(positive, settings.positive_margin)[:, None]
    if settings.sampling == "random":
        ok = ok.copy()
        for i in np.flatnonzero(ok.sum(1) > n):
            where = np.flatnonzero(ok[i])
            ok[i] = False
            ok[i, np.sort(row_rng(settings, key, rows[i], SAMPLE_STREAM).choice(where, n, replace=False))] = True
    order = np.argsort(~ok, axis=1, kind="stable")[:, :n]  # the kept ones first, in rank order
    chosen = np.take_along_axis(ids, order, 1)
    chosen[~np.take_along_axis(ok, order, 1)] = -1
    if chosen.shape[1] < n:
        chosen = np.pad(chosen, ((0, 0), (0, n - chosen.shape[1])), constant_values=-1)
    return chosen, np.minimum(ok.sum(1), n)


def draw_scores(vectors, ids, corpus):
    """float32 scores of query vectors [m, d] against corpus ids [m], each summed as a positive's
    score is (the same value whatever m)."""
    return (corpus.rows(ids) * vectors).sum(1)


def keep_below(ok, draws, vectors, thresholds, corpus):
    """ok &= (score <= the row's threshold), scoring only the draws still ok."""
    r, c = np.nonzero(ok)
    ok[r, c] = draw_scores(vectors[r], draws[r, c], corpus) <= thresholds[r]


def fill(need, forbidden, ruled_out, vector, threshold, corpus, rng, scores):
    """`need` random corpus ids for a short row: none of `forbidden` (exclusions and the row's
    negatives), of `ruled_out` (the skipped top) or above `threshold` (None: no margin). Draws at
    random first; where that keeps missing, takes a random sample of the allowed texts by `scores`
    (the row's query against the whole corpus). Returns (ids, relaxed): relaxed ids come, lowest
    score first, from ruled-out or above-threshold texts when nothing else is left."""
    size, blocked = len(corpus), np.array(sorted(forbidden | set(ruled_out)), np.int64)
    draws = rng.integers(size, size=4 * need + 32)
    draws = draws[np.sort(np.unique(draws, return_index=True)[1])]  # each id once, in the order drawn
    draws = draws[~np.isin(draws, blocked)]
    if threshold is not None:
        draws = draws[draw_scores(np.broadcast_to(vector, (len(draws), len(vector))), draws, corpus) <= threshold]
    picked = draws[:need].tolist()
    if len(picked) == need:
        return picked, 0
    allowed = np.ones(size, bool)
    allowed[blocked] = allowed[picked] = False
    if threshold is not None:
        allowed &= scores <= threshold
    picked += rng.permutation(np.flatnonzero(allowed))[: need - len(picked)].tolist()
    if len(picked) == need:
        return picked, 0
    left = np.ones(size, bool)
    left[list(forbidden) + picked] = False
    rest = np.flatnonzero(left)
    rest = rest[np.lexsort((rest, scores[rest]))][: need - len(picked)].tolist()
    return picked + rest, len(rest)


def fill_short(short, negatives, counts, skipped, thresholds, pairs, queries, corpus, settings, key):
    """Fill the short rows' negatives in place as fill does, with the same result: the first draws of
    a block of rows are checked at once, and only the rows whose draws run out go through fill, with
    their scores against the whole corpus computed for a few rows at a time. thresholds: float64 per
    short row, or None. Returns the number of relaxed fills."""
    n, size, relaxed = settings.num_negatives, len(corpus), 0
    excluded = owners(pairs.offsets) * size + pairs.excluded  # (query, corpus id) codes, sorted
    width = 4 * n + 32
    per_block = max(1, FILL_FLOATS // (width * corpus.chunks[0].shape[1]))
    per_scores = max(1, FILL_FLOATS // size)  # late rows scored against the whole corpus at a time
    for b in range(0, len(short), per_block):
        rows = short[b : b + per_block]
        need, qid = n - counts[rows], pairs.qid[rows]
        draws = np.full((len(rows), width), -1, np.int64)
        for i, (row, k) in enumerate(zip(rows.tolist(), need.tolist())):
            draws[i, : 4 * k + 32] = row_rng(settings, key, row, FILL_STREAM).integers(size, size=4 * k + 32)
        order = np.argsort(draws, axis=1, kind="stable")  # a repeated id: its first draw first
        ranked = np.take_along_axis(draws, order, 1)
        repeat = np.zeros(draws.shape, bool)
        np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], 1)
        ok = (draws >= 0) & ~repeat
        codes = qid[:, None] * size + draws
        at = np.minimum(np.searchsorted(excluded, codes), max(len(excluded) - 1, 0))
        if len(excluded):
            ok &= excluded[at] != codes
        taken = np.concatenate([negatives[rows], skipped[rows]], 1)  # -1: none, never drawn
        ok &= ~(draws[:, :, None] == taken[:, None, :]).any(2)
        vectors = queries.rows(qid)
        if thresholds is not None:  # the first draws of every row, the rest only where those fall short
            first, limit = min(width, 2 * n + 8), thresholds[b : b + per_block]
            keep_below(ok[:, :first], draws[:, :first], vectors, limit, corpus)
            lacking = np.flatnonzero(ok[:, :first].sum(1) < need)
            rest = ok[lacking, first:]
            keep_below(rest, draws[lacking, first:], vectors[lacking], limit[lacking], corpus)
            ok[lacking, first:] = rest
        take = ok & (np.cumsum(ok, 1) <= need[:, None])
        done = take.sum(1) == need
        block = negatives[rows[done]]
        block[np.arange(n) >= counts[rows[done]][:, None]] = draws[done][take[done]]
        negatives[rows[done]] = block
        late = np.flatnonzero(~done)
        for a in range(0, len(late), per_scores):
            some = late[a : a + per_scores]
            for i, scores in zip(some.tolist(), corpus.scores(vectors[some])):
                row = int(rows[i])
                have = negatives[row, : counts[row]].tolist()
                extra, more = fill(n - len(have), set(pairs.excluded_of(qid[i]).tolist()) | set(have),
                                   [j for j in skipped[row].tolist() if j >= 0], vectors[i],
                                   None if thresholds is None else thresholds[b + i], corpus,
                                   row_rng(settings, key, row, FILL_STREAM), scores)
                negatives[row, len(have) :] = extra
                relaxed += more
    return relaxed


def select_negatives(keys_of, pairs, queries, corpus, settings, name, progress=None):
    """Every row's negatives (Mined) from ranked candidates: keys_of(qids) -> keys [len, max_rank]
    (rank); queries / corpus: Vectors of the distinct queries and of the corpus."""
    rows, n, key = len(pairs.qid), settings.num_negatives, file_key(name)
    negatives, counts = np.full((rows, n), -1, np.int64), np.zeros(rows, np.int64)
    positives = np.empty(rows, np.float32)
    skipped = np.empty((rows, settings.skip_top), np.int64)  # what a fill must not take
    for r in range(0, rows, ROW_BLOCK):
        qid, pid = pairs.qid[r : r + ROW_BLOCK], pairs.pid[r : r + ROW_BLOCK]
        ids, scores = decode_keys(keys_of(qid))
        block = slice(r, r + len(qid))
        positives[block] = (queries.rows(qid) * corpus.rows(pid)).sum(1)
        skipped[block] = ids[:, : settings.skip_top]
        negatives[block], counts[block] = select(ids, scores, positives[block], settings, key, np.arange(r, block.stop))
        if progress:
            progress.update(len(qid))
    short = np.flatnonzero(counts < n)
    relaxed = 0
    if settings.on_short == "fill_random" and len(short):
        thresholds = None
        if settings.positive_margin is not None:
            thresholds = margin_threshold(positives[short], settings.positive_margin)
        relaxed = fill_short(short, negatives, counts, skipped, thresholds, pairs, queries, corpus, settings, key)
    return Mined(negatives, short, relaxed, separation(pairs, positives, queries, corpus, settings, key))


# ---- records: what an output was mined from --------------------------------------------------------

def model_fingerprint(path):
    """sha256 over the model folder's files (top level): name, size, and the content of small files
    or the first and last MiB of large ones (weights): cheap, and it survives a copy, unlike mtimes."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= 4 * 2**20:
                digest.update(f.read())
            else:
                digest.update(f.read(2**20))
                f.seek(size - 2**20)
                digest.update(f.read())
    return digest.hexdigest()


def make_record(input_path, corpus_stamp, model, settings):
    """What an output is mined from: the input's stamp (size, mtime_ns), --corpus', the model (its
    fingerprint, max_seq_length, dtype, prompts) and the selection settings."""
    return {"version": RECORD_VERSION, "input": input_stamp(input_path), "corpus": corpus_stamp, "model": model,
            "settings": dataclasses.asdict(settings)}


def read_record(path):
    """The record stored in an output file, or None if it has none or cannot be read."""
    return stored_record(path, RECORD_KEY)


def why_mine(input_path, output_path, record, overwrite):
    """None if output_path already holds what `record` describes; else why it is (re)made ("": new)."""
    if not os.path.exists(output_path):
        return ""
    if overwrite:
        return "--overwrite"
    have = read_record(output_path)
    if have is None:
        return "the existing output has no mining record (an older run or another tool wrote it)"
    if have == record:
        return None
    if have.get("version") != record["version"]:
        return "the existing output was written by another version of this script"
    if have.get("input") != record["input"]:
        return "the input file changed (size or modification time) since it was mined"
    if have.get("corpus") != record["corpus"]:
        return "--corpus changed"
    if have.get("model") != record["model"]:
        return "the model, its max_seq_length, dtype or prompts changed"
    old, new = have.get("settings") or {}, record["settings"]
    changed = [f"--{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v]
    return "changed: " + ", ".join(changed) if changed else "the existing output's record does not match this run's"


# ---- the work folder -------------------------------------------------------------------------------

class Work:
    """OUT/.mine_work/NAME: the embedding chunks and ranked query chunks of one file, each written
    atomically, and manifest.json, what they were made from."""

    def __init__(self, output_dir, name, chunk_size, num_corpus, num_queries):
        self.folder = os.path.join(output_dir, WORK_DIR, name)
        self.chunk_size = chunk_size
        self.total = {"corpus": num_corpus, "query": num_queries, "rank": num_queries}
        self.count = {kind: -(-total // chunk_size) for kind, total in self.total.items()}

    def size(self, kind, i):
        """Texts (or queries) in chunk i of `kind`."""
        return min(self.chunk_size, self.total[kind] - i * self.chunk_size)

    def path(self, kind, i):
        return os.path.join(self.folder, f"{kind}_{i:05d}.npy")

    def prepare(self, manifest):
        """Keep the chunks made from the same manifest; clear any others. Main process only."""
        file = os.path.join(self.folder, "manifest.json")
        if os.path.isdir(self.folder):
            try:
                with open(file) as f:
                    same = json.load(f) == manifest
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        remove_stale_temp_files(self.folder, suffix="")  # a killed run's partial files
        if not os.path.exists(file):
            with atomic_path(file) as tmp, open(tmp, "w") as f:
                json.dump(manifest, f)

    def done(self, kind, i):
        return os.path.exists(self.path(kind, i))

    def save(self, kind, i, array):
        with atomic_path(self.path(kind, i)) as tmp, open(tmp, "wb") as f:  # np.save(name) would add .npy to tmp
            np.save(f, array)
        _count_write()

    def load(self, kind):
        return [np.load(self.path(kind, i), mmap_mode="r") for i in range(self.count[kind])]

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))  # .mine_work, once empty
        except OSError:
            pass


_writes = [0]


def _count_write():
    limit = os.environ.get(KILL_AFTER)
    _writes[0] += 1
    if limit and _writes[0] >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill at a known point: what resume must survive


# ---- one file --------------------------------------------------------------------------------------

def check_pair_columns(schema, path):
    """query and passage as strings; no negative columns (they would mix with the mined ones)."""
    for name in ("query", "passage"):
        if name not in schema.names:
            raise UserError(f"{path}: no column '{name}'; mine_negatives.py needs (query, passage) pairs in "
                            "string columns query and passage")
        check_text_type(schema, name, path)
    negatives = [n for n in schema.names if re.fullmatch(r"negative_\d+", n)]
    if negatives:
        raise UserError(f"{path}: already has negative column(s) ({', '.join(negatives[:3])}"
                        f"{', ...' if len(negatives) > 3 else ''}); mine_negatives.py writes its own: drop them "
                        "from the file or point --input_dir at a folder of (query, passage) pairs")


def read_corpus(path):
    """The distinct texts of --corpus (column text, or passage), checked like the inputs' texts."""
    table = read_input(path)
    column = next((c for c in ("text", "passage") if c in table.column_names), None)
    if column is None:
        raise UserError(f"--corpus {path}: no column 'text' (nor 'passage'); put the extra texts in a string "
                        "column named text")
    check_text_type(table.schema, column, f"--corpus {path}")
    check_texts(table, [column], f"--corpus {path}")
    return pc.unique(table.column(column).cast(pa.large_string()))


def embed_chunks(work, jobs, encoder, sources, batch_size, bar):
    """Embed each (kind, chunk) of `jobs` not on disk yet and save it (float16)."""
    for kind, i in jobs:
        texts, prompt = sources[kind]
        if not work.done(kind, i):
            chunk = texts.slice(i * work.chunk_size, work.size(kind, i)).to_pylist()
            vectors = encoder.encode(chunk, prompt_name=prompt, batch_size=batch_size)
            if not np.isfinite(vectors).all():
                bad = (i * work.chunk_size + np.flatnonzero(~np.isfinite(vectors).all(1))).tolist()
                raise UserError(f"the model gave non-finite embeddings for {kind} text(s) {rows_shown(bad)}: "
                                "try --dtype float32")
            work.save(kind, i, vectors.astype(STORE_DTYPE))
        bar.update(work.size(kind, i))


def rank_chunks(work, units, pairs, k, device, bar):
    """Rank each query chunk of `units` not on disk yet against the whole corpus and save its keys."""
    corpus, queries = Vectors(work.load("corpus")), work.load("query")
    for u in units:
        if not work.done("rank", u):
            first = u * work.chunk_size
            offsets = pairs.offsets[first : first + work.size("rank", u) + 1]
            keys = rank(queries[u], corpus, offsets - offsets[0], pairs.excluded[offsets[0] : offsets[-1]], k, device)
            work.save("rank", u, keys)
        bar.update(work.size("rank", u))


def rank_lookup(work):
    """keys_of(qids) over the saved rank chunks (memory-mapped)."""
    chunks = work.load("rank")

    def keys_of(qids):
        qids = np.asarray(qids, np.int64)
        out = np.empty((len(qids), chunks[0].shape[1]), np.int64)
        unit = qids // work.chunk_size
        for u in np.unique(unit):
            at = np.flatnonzero(unit == u)
            out[at] = chunks[u][qids[at] - u * work.chunk_size]
        return out

    return keys_of


def output_table(table, pairs, mined, settings, record):
    """The input columns (short rows left out under --on_short drop), then negative_1 ... negative_n; the
    record in the schema metadata."""
    keep = np.ones(len(pairs.qid), bool)
    if settings.on_short == "drop":
        keep[mined.short] = False
    negatives = mined.negatives[keep]
    table = table.filter(pa.array(keep)) if not keep.all() else table
    typ = table.schema.field("passage").type
    for j in range(settings.num_negatives):
        parts = [pairs.corpus.take(pa.array(negatives[r : r + ROW_BLOCK, j])).cast(typ)
                 for r in range(0, len(negatives), ROW_BLOCK)]
        table = table.append_column(f"negative_{j + 1}", pa.chunked_array(parts, type=typ))
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"f2llm_")}
    if not keep.all():
        metadata.pop(b"pandas", None)  # its index would still count the dropped rows
    return table.replace_schema_metadata(record_metadata(metadata, RECORD_KEY, record))


def report_short(name, rows, mined, settings):
    report_separation(name, rows, mined, settings)
    if not len(mined.short):
        return
    what = ("filled with random corpus texts (--on_short fill_random)" if settings.on_short == "fill_random"
            else "dropped (--on_short drop)")
    print(f"{name}: {len(mined.short)} of {rows} row(s) had fewer than {settings.num_negatives} negatives in the "
          f"window (rows {rows_shown(mined.short.tolist())}): {what}", flush=True)
    if mined.relaxed:
        print(f"{name}: {mined.relaxed} fill(s) took a text that {WINDOW_FLAGS} had ruled out: the corpus had no "
              "other text left for those rows", flush=True)


def report_separation(name, rows, mined, settings):
    """One line when the model does not separate positives from random texts, or when most rows had
    to be filled with random texts: the negatives are then little better than random."""
    sep, filled = mined.separation, settings.on_short == "fill_random" and len(mined.short) > rows / 2
    if not (sep is not None and sep.weak or filled):
        return
    what = []
    if sep is not None and sep.weak:
        what.append(f"the model does not separate positives from other texts (median score of a positive "
                    f"{sep.positive:.3f}, of a random text {sep.random:.3f}; the positive scored higher in "
                    f"{sep.ahead:.0%} of rows)")
    if filled:
        what.append(f"{len(mined.short)} of {rows} rows were filled with random texts ({WINDOW_FLAGS} ruled out "
                    "most candidates)")
    print(f"{name}: {' and '.join(what)}, so these negatives are little better than random: mine with a trained "
          "embedder as --model, or with --positive_margin none, or train on the pairs alone first (config "
          '"num_hard_neg": 0, in-batch negatives only) and mine with that checkpoint', flush=True)


@dataclasses.dataclass
class Run:
    """What every file shares: the model and its record, the output folder, the settings, the processes,
    the extra corpus and, once a file needs it, the encoder."""
    model: str
    model_record: dict
    output_dir: str
    settings: Settings
    procs: Processes
    extra: pa.Array | None
    corpus_stamp: dict | None
    batch_size: int
    chunk_size: int
    max_seq_length: int | None
    dtype: str
    overwrite: bool

    @functools.cached_property
    def encoder(self):
        from model import load_encoder

        return load_encoder(self.model, device=self.procs.device, dtype=self.dtype, max_seq_length=self.max_seq_length)

    def prompt(self, kind):
        prompts = self.model_record["prompts"]
        return PROMPTS[kind] if prompts.get(kind) is not None else None

    def mine_file(self, path):
        """Mine one input file; True if it was mined, False if skipped (already done)."""
        procs = self.procs
        name = os.path.basename(path)[: -len(".parquet")]
        out_path = os.path.join(self.output_dir, f"{name}.parquet")
        record = make_record(path, self.corpus_stamp, self.model_record, self.settings)  # stamp taken before reading
        reason = procs.broadcast(why_mine(path, out_path, record, self.overwrite) if procs.main else None)
        if reason is None:
            if procs.main:
                print(f"skip {name}: already mined (same input, corpus, model and settings)", flush=True)
                Work(self.output_dir, name, 1, 0, 0).remove()  # a run killed after its write left it
            return False
        if reason and procs.main:
            print(f"mine {name} again: {reason}", flush=True)
        table, pairs = self.read_pairs(path, name)
        work = Work(self.output_dir, name, self.chunk_size, len(pairs.corpus), len(pairs.queries))
        if procs.main:
            work.prepare({"version": RECORD_VERSION, "input": record["input"], "corpus": record["corpus"],
                          "model": record["model"], "chunk_size": self.chunk_size, "max_rank": self.settings.max_rank,
                          "store": np.dtype(STORE_DTYPE).name, "texts": [len(pairs.corpus), len(pairs.queries)]})
        procs.barrier()
        self.embed(work, pairs, name)
        procs.barrier()
        units = procs.share(list(range(work.count["rank"])))
        with tqdm(total=sum(work.size("rank", u) for u in units), desc=f"{name} rank", unit="query",
                  disable=not procs.main) as bar:
            rank_chunks(work, units, pairs, self.settings.max_rank, procs.device, bar)
        procs.barrier()
        if procs.main:
            self.write(work, table, pairs, record, path, out_path)
        return True

    def read_pairs(self, path, name):
        """The input table, checked, and its Pairs; errors before any embedding."""
        table = read_input(path)
        if table.num_rows == 0:
            raise UserError(f"{path}: 0 rows; remove the file or fill it")
        check_pair_columns(table.schema, path)
        check_texts(table, ["query", "passage"], path)
        pairs = build_pairs(table, self.extra)
        check_enough_texts(pairs, self.settings.num_negatives, path)
        if self.procs.main:
            print(f"{name}: {table.num_rows} rows, {len(pairs.queries)} distinct queries, {len(pairs.corpus)} corpus "
                  "texts", flush=True)
        return table, pairs

    def embed(self, work, pairs, name):
        """This process's share of the corpus and query chunks; the model loads only if one is missing."""
        jobs = self.procs.share([(kind, i) for kind in ("corpus", "query") for i in range(work.count[kind])])
        sources = {"corpus": (pairs.corpus, self.prompt("document")), "query": (pairs.queries, self.prompt("query"))}
        with tqdm(total=sum(work.size(k, i) for k, i in jobs), desc=f"{name} embed", unit="text",
                  disable=not self.procs.main) as bar:
            encoder = self.encoder if any(not work.done(k, i) for k, i in jobs) else None
            embed_chunks(work, jobs, encoder, sources, self.batch_size, bar)

    def write(self, work, table, pairs, record, path, out_path):
        """Select every row's negatives and write the output (main process)."""
        settings, name = self.settings, os.path.basename(out_path)[: -len(".parquet")]
        with tqdm(total=table.num_rows, desc=f"{name} select", unit="row") as bar:
            mined = select_negatives(rank_lookup(work), pairs, Vectors(work.load("query")),
                                     Vectors(work.load("corpus")), settings, name, bar)
        report_short(name, table.num_rows, mined, settings)
        if settings.on_short == "drop" and len(mined.short) == table.num_rows:
            raise UserError(f"{path}: every row had fewer than {settings.num_negatives} negatives in the window, and "
                            f"--on_short drop would leave none: widen the window ({WINDOW_FLAGS}) or use "
                            "--on_short fill_random")
        out = output_table(table, pairs, mined, settings, record)
        write_atomic(Output(out.schema, [out]), out_path)
        work.remove()
        print(f"wrote {out_path}: {out.num_rows} rows x {settings.num_negatives} negatives", flush=True)


# ---- the public function ---------------------------------------------------------------------------

def check_options(settings, batch_size, chunk_size, max_seq_length, device):
    """The settings' own limits, before anything is read."""
    n = settings.num_negatives
    if n < 1:
        raise UserError("--num_negatives must be at least 1")
    if settings.skip_top < 0:
        raise UserError("--skip_top must be 0 or more")
    if settings.max_rank - settings.skip_top < n:
        raise UserError(f"the window --skip_top {settings.skip_top} .. --max_rank {settings.max_rank} holds "
                        f"{max(0, settings.max_rank - settings.skip_top)} candidates, fewer than --num_negatives {n}: "
                        "raise --max_rank or lower --skip_top")
    if settings.positive_margin is not None and not 0 < settings.positive_margin <= 1:
        raise UserError(f"--positive_margin must be in (0, 1] (or none), got {settings.positive_margin}")
    choices = {"--sampling": (settings.sampling, SAMPLINGS), "--on_short": (settings.on_short, ON_SHORT),
               "--device": (device or "cpu", DEVICES)}  # None: cuda if available
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{flag} {value}: choose one of {', '.join(allowed)}")
    if batch_size < 1 or chunk_size < 1:
        raise UserError("--batch_size and --chunk_size must be at least 1")
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2 (one token of text plus the end token)")
    if not 0 <= settings.seed < 2**63:
        raise UserError(f"--seed must be between 0 and {2**63 - 1}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is available; use --device cpu")


def input_files(input_dir, corpus):
    """The input files, each with the columns needed (read from the footers)."""
    if not os.path.isdir(input_dir):
        raise UserError(f"input folder {input_dir} not found: pass --input_dir with (query, passage) "
                        "parquet files")
    files = sorted(glob.glob(os.path.join(input_dir, "*.parquet")))
    if not files:
        raise UserError(f"no *.parquet files in {input_dir}")
    if corpus and os.path.realpath(corpus) in {os.path.realpath(f) for f in files}:
        raise UserError(f"--corpus {corpus} lies in --input_dir, where it would be mined as a dataset: move it "
                        "out of that folder")
    for path in files:  # the footers only: a wrong file stops the run before any work
        check_pair_columns(open_input(path).schema, path)
    return files


def model_record(model, max_seq_length, dtype):
    """The model part of the record: fingerprint, max_seq_length, dtype and the prompts used, all read
    from the folder without loading the weights (so that a run with nothing to do loads nothing)."""
    saved_length, prompts = st_settings(model)
    return {"fingerprint": model_fingerprint(model), "max_seq_length": max_seq_length or saved_length,
            "dtype": dtype, "prompts": {kind: prompts.get(name) for kind, name in PROMPTS.items()}}


def mine(model, input_dir, output_dir, *, settings=Settings(), corpus=None, batch_size=32, chunk_size=CHUNK_SIZE,
         max_seq_length=None, device=None, dtype="auto", overwrite=False):
    """Mine every `*.parquet` of input_dir into output_dir with the embedding model folder `model`,
    skipping the files already mined from the same inputs, model and settings. The keyword arguments are
    the command line's other flags, with its defaults (device None: cuda if available). Returns (files
    mined, files skipped). Bad settings or input are a UserError that says what to fix (a file's rows are
    all checked before its texts are embedded)."""
    check_options(settings, batch_size, chunk_size, max_seq_length, device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":  # pick_dtype looks at the machine, not at --device: bfloat16 is slow on a CPU
        dtype = "float32" if device == "cpu" else str(pick_dtype("auto")).removeprefix("torch.")
    check_model_folder(model, "--model")
    files = input_files(input_dir, corpus)
    extra, corpus_stamp = None, None
    if corpus:
        if not os.path.exists(corpus):
            raise UserError(f"--corpus {corpus} not found")
        corpus_stamp = input_stamp(corpus)
        extra = read_corpus(corpus)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {output_dir}: {err.strerror}") from None
    if os.path.samefile(input_dir, output_dir):
        raise UserError("--output_dir is --input_dir: the outputs (same names) would replace the inputs; pass another "
                        "--output_dir")
    procs = Processes(device)
    if procs.main:
        remove_stale_temp_files(output_dir)
    run = Run(model, model_record(model, max_seq_length, dtype), output_dir, settings, procs, extra, corpus_stamp,
              batch_size=batch_size, chunk_size=chunk_size, max_seq_length=max_seq_length, dtype=dtype,
              overwrite=overwrite)
    done = sum(run.mine_file(path) for path in files)
    procs.barrier()
    if procs.main:
        print(f"mined {done} file(s), skipped {len(files) - done} already mined, into {output_dir}", flush=True)
    return done, len(files) - done


# ---- command line ----------------------------------------------------------------------------------

def margin_value(text):
    """--positive_margin: a number in (0, 1], or none."""
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or none, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (or none), got {value}")
    return value


def parse_args(argv=None):
    """The flags given, by mine's names (the rules by Settings'): those left out take the defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    p.add_argument("--model", required=True, help="the embedding model: a checkpoint of ours or a backbone folder")
    p.add_argument("--input_dir", required=True, help="folder of *.parquet files with columns query, passage")
    p.add_argument("--output_dir", required=True, help="where NAME.parquet with negative_1 ... negative_n go")
    p.add_argument("--num_negatives", type=int, metavar="N", help="negatives per row (default 24)")
    p.add_argument("--corpus", help="a parquet file of extra candidate texts (column text, or passage), added to "
                                    "every input file's passages")
    p.add_argument("--skip_top", type=int, metavar="K", help="skip the K best candidates (default 0)")
    p.add_argument("--max_rank", type=int, metavar="R",
                   help="consider candidates ranked below R only (ranks count after the exclusions; default 100)")
    p.add_argument("--positive_margin", type=margin_value, metavar="M",
                   help="drop candidates scoring above M x the row's positive score (default 0.95; none: off)")
    p.add_argument("--sampling", choices=SAMPLINGS,
                   help="top: the best n of the window (default); random: a seeded random n of it")
    p.add_argument("--seed", type=int, help="seed of --sampling random and of the fills (default 0)")
    p.add_argument("--on_short", choices=ON_SHORT,
                   help="rows with fewer than n negatives in the window: fill them with random corpus texts "
                        "(default) or leave them out")
    p.add_argument("--batch_size", type=int, help="texts per forward pass (default 32)")
    p.add_argument("--chunk_size", type=int, help=f"texts per embedding file in the work folder (default {CHUNK_SIZE})")
    p.add_argument("--max_seq_length", type=int,
                   help="tokens per text, special tokens included (default: the checkpoint's)")
    p.add_argument("--device", choices=DEVICES, help="default: cuda if available")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the model's dtype (default auto: float32 on the CPU, bfloat16 on a GPU that has it)")
    p.add_argument("--overwrite", action="store_true", help="mine every file again, even those already mined")
    return p.parse_args(argv)


@exit_on_user_error(interrupted="interrupted: the finished files and work chunks are kept and nothing half-written is "
                                 "left; run the same command again to continue where it stopped")
def main(argv=None):
    args = vars(parse_args(argv))
    rules = {field.name: args.pop(field.name) for field in dataclasses.fields(Settings) if field.name in args}
    mine(**args, settings=Settings(**rules))


if __name__ == "__main__":
    main()
