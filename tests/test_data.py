"""data.py: collate of one homogeneous batch, the multi-dataset loader, and loaders over real splits."""
import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_DIR, assert_user_error, call_main, write_config

import config
import data
import run
from model import load_tokenizer

EOS = 2
TOKENS = pa.list_(pa.int32())


# ---- hand-built rows ----------------------------------------------------------------------------

def seq(tag, n):
    """A sequence of n tokens identified by `tag`: n - 1 distinctive tokens then eos."""
    return [tag * 100 + i for i in range(n - 1)] + [EOS]


def q_tag(r):
    return 1000 + r


def p_tag(r):
    return 2000 + r


def n_tag(r, j):  # j: 1-based negative number
    return 3000 + 50 * r + j


def make_rows(bs, num_negatives, length=lambda kind, r, j: 2 + (3 * r + 5 * j + kind) % 5, reverse_cols=False):
    rows = []
    for r in range(bs):
        row = {"query_input_ids": seq(q_tag(r), length(0, r, 0)),
               "passage_input_ids": seq(p_tag(r), length(1, r, 0))}
        negs = list(range(1, num_negatives + 1))
        for j in (reversed(negs) if reverse_cols else negs):
            row[f"negative_{j}_input_ids"] = seq(n_tag(r, j), length(2, r, j))
        rows.append(row)
    return rows


def to_table(rows):
    """Rows as the Arrow table of a batch: list<int32> token columns, in the rows' column order."""
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, TOKENS) for c in rows[0]]))


def collate(rows, **kw):
    return data.collate(to_table(rows), **kw)


def real_sequences(batch):
    """The token lists of a collated batch, cut out of the flat input_ids by the lengths."""
    out, start = [], 0
    for n in batch["lengths"].tolist():
        out.append(batch["input_ids"][start : start + n].tolist())
        start += n
    assert start == len(batch["input_ids"]), "the flat input_ids hold exactly the sequences, nothing else"
    return out


def tag_of(tokens):
    return tokens[0] // 100


def negative_tags(batch, row):
    bs, k = batch["num_queries"], batch["num_neg"]
    seqs = real_sequences(batch)
    return [tag_of(s) for s in seqs[2 * bs + row * k : 2 * bs + (row + 1) * k]]


def check_flat(batch):
    ids, lengths = batch["input_ids"], batch["lengths"]
    assert ids.dtype == torch.long and ids.dim() == 1, "flat int64 token ids"
    assert lengths.dim() == 1 and not lengths.dtype.is_floating_point
    assert (lengths > 0).all()
    assert len(ids) == int(lengths.sum()), "no padding: the sequences concatenated"


# ---- collate -------------------------------------------------------------------------------------

def test_collate_order_lengths_and_flat_concatenation():
    bs, k = 4, 3
    rows = make_rows(bs, num_negatives=5)
    batch = collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, rng=None)

    expected = ([r["query_input_ids"] for r in rows] + [r["passage_input_ids"] for r in rows]
                + [rows[r][f"negative_{j}_input_ids"] for r in range(bs) for j in range(1, k + 1)])
    assert len(batch["lengths"]) == bs * (2 + k)
    assert real_sequences(batch) == expected
    assert batch["input_ids"].tolist() == [t for s in expected for t in s]
    assert batch["lengths"].tolist() == [len(s) for s in expected]
    assert len(set(batch["lengths"].tolist())) > 1, "the test needs sequences of different lengths"
    check_flat(batch)
    assert batch["num_queries"] == bs and batch["num_neg"] == k
    assert set(batch) == {"input_ids", "lengths", "num_queries", "num_neg"}, "no padding, no pad id"


def test_collate_cuts_long_sequences_and_forces_eos():
    max_len = 5
    lengths = {(0, 0): 9, (0, 1): 5, (1, 0): 3, (1, 1): 12}  # (row, kind) for query (0) / passage (1)

    def length(kind, r, j):
        return lengths.get((r, kind), 4 + j)  # negatives: 5 (exact), 6 (cut)

    rows = make_rows(2, num_negatives=2, length=length)
    table = to_table(rows)
    batch = data.collate(table, num_neg=2, max_seq_length=max_len, eos_id=EOS, rng=None)
    originals = ([r["query_input_ids"] for r in rows] + [r["passage_input_ids"] for r in rows]
                 + [rows[r][f"negative_{j}_input_ids"] for r in range(2) for j in (1, 2)])
    got = real_sequences(batch)
    cut = 0
    for original, s in zip(originals, got):
        if len(original) > max_len:
            cut += 1
            assert s == original[: max_len - 1] + [EOS], (original, s)
            assert original[max_len - 1] != EOS
        else:
            assert s == original, "a sequence within max_seq_length is unchanged"
    assert cut == 4
    assert batch["lengths"].max() == max_len
    assert batch["lengths"].tolist() == [min(len(o), max_len) for o in originals]
    assert all(s[-1] == EOS for s in got)
    check_flat(batch)
    # The caller's table is not modified.
    assert table.equals(to_table(rows)) and table.to_pylist()[0]["query_input_ids"] == seq(q_tag(0), 9)


def test_collate_forces_eos_on_a_sequence_without_one():
    rows = [{"query_input_ids": [11, 12, 13], "passage_input_ids": [21], "negative_1_input_ids": [31, 32]}]
    batch = collate(rows, num_neg=1, max_seq_length=10, eos_id=EOS)
    assert real_sequences(batch) == [[11, 12, EOS], [EOS], [31, EOS]]


def test_collate_without_rng_takes_the_first_negatives_in_numeric_column_order():
    # 12 negatives: negative_10 .. negative_12 sort before negative_2 as strings; column order reversed.
    bs, k = 3, 11
    rows = make_rows(bs, num_negatives=12, reverse_cols=True)
    assert to_table(rows).column_names[2] == "negative_12_input_ids"
    batch = collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, rng=None)
    for r in range(bs):
        assert negative_tags(batch, r) == [n_tag(r, j) for j in range(1, k + 1)]
    again = collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, rng=None)
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_collate_samples_negatives_without_replacement_from_the_own_row():
    bs, k, available = 3, 4, 6
    rows = make_rows(bs, num_negatives=available)
    table = to_table(rows)
    rng = np.random.default_rng(1234)
    seen = collections.defaultdict(set)
    orders = set()
    for _ in range(300):
        batch = data.collate(table, num_neg=k, max_seq_length=100, eos_id=EOS, rng=rng)
        assert len(batch["lengths"]) == bs * (2 + k)
        seqs = real_sequences(batch)
        # Queries and positives are never sampled.
        assert [tag_of(s) for s in seqs[:2 * bs]] == [q_tag(r) for r in range(bs)] + [p_tag(r) for r in range(bs)]
        for r in range(bs):
            tags = negative_tags(batch, r)
            own = {n_tag(r, j) for j in range(1, available + 1)}
            assert len(tags) == k and len(set(tags)) == k, f"row {r}: repeated negative {tags}"
            assert set(tags) <= own, f"row {r} got another row's negatives: {tags}"
            seen[r] |= set(tags)
            orders.add(tuple(tags))
        for s, n in zip(seqs, batch["lengths"].tolist()):  # the sequences themselves are intact
            assert s == seq(tag_of(s), n)
    for r in range(bs):
        assert seen[r] == {n_tag(r, j) for j in range(1, available + 1)}, "every negative is drawn sometimes"
    assert len(orders) > 50, "negatives are really sampled, not a fixed choice"


def test_pick_negatives():
    assert data.pick_negatives(3, 5, 2, None).tolist() == [[0, 1], [0, 1], [0, 1]]
    rng = np.random.default_rng(0)
    counts = np.zeros((4, 6))
    for _ in range(500):
        picks = data.pick_negatives(4, 6, 3, rng)
        assert picks.shape == (4, 3)
        for row in picks:
            assert len(set(row.tolist())) == 3 and row.min() >= 0 and row.max() < 6
        np.add.at(counts, (np.arange(4)[:, None], picks), 1)
    # Each of the 6 is drawn with probability 1/2 per row: 250 of 500 expected (sd ~11).
    assert np.abs(counts - 250).max() < 60, counts
    # Rows draw independently of each other.
    picks = data.pick_negatives(200, 6, 3, np.random.default_rng(1))
    assert len({tuple(p) for p in picks.tolist()}) > 30
    # All of them, in a random order.
    assert sorted(data.pick_negatives(1, 4, 4, np.random.default_rng(2))[0].tolist()) == [0, 1, 2, 3]


def test_pick_negatives_per_batch_is_the_published_draw():
    """The published collate_fn: one random.sample of k columns per batch, used by every row; k = 1
    always takes negative_1."""
    rng = np.random.default_rng(0)
    draws = set()
    for _ in range(300):
        picks = data.pick_negatives(5, 24, 7, rng, per_batch=True)
        assert picks.shape == (5, 7) and (picks == picks[0]).all(), "every row the same columns"
        assert len(set(picks[0].tolist())) == 7 and picks.min() >= 0 and picks.max() < 24
        draws.add(tuple(picks[0].tolist()))
    assert len(draws) == 300, "a new draw per batch"
    assert data.pick_negatives(5, 24, 1, rng, per_batch=True).tolist() == [[0]] * 5
    assert data.pick_negatives(5, 24, 3, None, per_batch=True).tolist() == [[0, 1, 2]] * 5  # validation


def test_random_validation_negatives(tiny, tokenized):
    """validation_negatives "random": validation batches draw their negatives (not each row's first
    k), the same ones at every validation; "first" keeps negatives 1..k."""
    split = in_memory_split(40)
    first = data.make_loader(split, "retrieval", make_cfg(tiny, tokenized, "unused"), eos_id=EOS, train=False)
    assert all(row == [1, 2, 3] for j in range(len(first)) for row in negative_picks(first.batch(j)))
    cfg = make_cfg(tiny, tokenized, "unused", validation_negatives="random")
    drawn = data.make_loader(split, "retrieval", cfg, eos_id=EOS, train=False)
    picks = [negative_picks(drawn.batch(j)) for j in range(len(drawn))]
    assert any(row != [1, 2, 3] for batch in picks for row in batch)
    drawn.set_epoch(1)
    assert [negative_picks(drawn.batch(j)) for j in range(len(drawn))] == picks, "the same at every validation"
    assert row_ids(drawn.batch(0)) == [0, 1, 2, 3], "rows stay in order"


def test_per_batch_negatives_reach_the_training_batches(tiny, tokenized):
    """negative_sampling "per_batch" through make_loader: every row of a batch has the negatives of
    the same columns, and the columns change from batch to batch."""
    cfg = make_cfg(tiny, tokenized, "unused", negative_sampling="per_batch")
    loader = data.make_loader(in_memory_split(40), "retrieval", cfg, eos_id=EOS, train=True)
    loader.set_epoch(0)
    picks = [negative_picks(loader.batch(j)) for j in range(len(loader))]
    assert all(all(row == batch[0] for row in batch) for batch in picks), picks
    assert len({tuple(batch[0]) for batch in picks}) > 1


def test_collate_same_seed_same_batch_and_different_seeds_differ():
    rows = make_rows(4, num_negatives=10)

    def run(seed):
        return collate(rows, num_neg=5, max_seq_length=100, eos_id=EOS, rng=np.random.default_rng(seed))

    a, b = run(7), run(7)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["lengths"], b["lengths"])
    assert any(real_sequences(run(s)) != real_sequences(a) for s in (8, 9, 10))


def test_num_negatives_needed_per_task_type():
    """classification 1; retrieval num_hard_neg; clustering num_hard_neg_clustering unless it is -1."""
    def needed(task, **kw):
        cfg = config.Config(model_path="m", train_data_path="d", num_hard_neg=7, **kw)
        return data.num_negatives_needed(task, cfg), data.negatives_key(task, cfg)

    assert needed("classification") == needed("classification", num_hard_neg_clustering=9) == (1, None)
    assert needed("retrieval") == needed("retrieval", num_hard_neg_clustering=9) == (7, "num_hard_neg")
    assert needed("clustering") == (7, "num_hard_neg")  # -1: the published v1 behaviour
    assert needed("clustering", num_hard_neg_clustering=9) == (9, "num_hard_neg_clustering")
    assert needed("clustering", num_hard_neg_clustering=0) == (0, "num_hard_neg_clustering")


def test_collate_one_negative_for_classification():
    bs = 5
    rows = make_rows(bs, num_negatives=1)
    batch = collate(rows, num_neg=1, max_seq_length=100,
                    eos_id=EOS, rng=np.random.default_rng(0))
    assert len(batch["lengths"]) == bs * 3 and batch["num_neg"] == 1
    assert [negative_tags(batch, r) for r in range(bs)] == [[n_tag(r, 1)] for r in range(bs)]


def test_collate_without_negatives():
    rows = make_rows(3, num_negatives=4)
    batch = collate(rows, num_neg=0, max_seq_length=100, eos_id=EOS, rng=np.random.default_rng(0))
    assert len(batch["lengths"]) == 6 and batch["num_neg"] == 0
    assert real_sequences(batch) == [r["query_input_ids"] for r in rows] + [r["passage_input_ids"] for r in rows]


def test_collate_accepts_chunked_sliced_and_int64_tables():
    rows = make_rows(6, num_negatives=3)
    expected = collate(rows[1:5], num_neg=2, max_seq_length=4, eos_id=EOS)
    table = to_table(rows)
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 1), table.slice(3)]).slice(1, 4)
    assert chunked.column(0).num_chunks > 1
    wide = table.cast(pa.schema([(c, pa.list_(pa.int64())) for c in table.column_names])).slice(1, 4)
    for t in (chunked, wide):
        got = data.collate(t, num_neg=2, max_seq_length=4, eos_id=EOS)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["lengths"], expected["lengths"])
        assert got["num_queries"] == 4


# ---- ArrowRows -----------------------------------------------------------------------------------

def test_arrow_rows_fetches_tables():
    import datasets

    rows = make_rows(5, num_negatives=2)
    split = datasets.Dataset(to_table(rows))
    ds = data.ArrowRows(split)
    assert len(ds) == 5
    got = ds.__getitems__([3, 0, 4])
    assert isinstance(got, pa.Table)
    assert got.to_pylist() == [rows[3], rows[0], rows[4]]
    assert ds[2].to_pylist() == [rows[2]]


# ---- MultiDatasetLoader --------------------------------------------------------------------------

class Batches:
    """A list of batches with the interface MultiDatasetLoader needs (set_epoch, __len__, iter_from);
    records the epochs set and the positions iterated from."""

    def __init__(self, items):
        self.items, self.epochs, self.starts = list(items), [], []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.items)

    def iter_from(self, start):
        self.starts.append(start)
        return iter(self.items[start:])


def tagged(sizes):
    return {name: Batches((name, i) for i in range(n)) for name, n in sizes.items()}


SIZES = {"alpha": 30, "beta": 10, "gamma": 60}


def test_multi_loader_homogeneous_and_every_batch_once_per_epoch_in_order():
    loader = data.MultiDatasetLoader(tagged(SIZES), seed=3)
    assert len(loader) == 100
    for epoch in range(4):
        loader.set_epoch(epoch)
        items = list(loader)
        assert len(items) == len(loader)
        per_dataset = collections.defaultdict(list)
        for name, batch in items:
            assert batch[0] == name, "a batch is yielded with the name of its own dataset"
            per_dataset[name].append(batch[1])
        assert dict(per_dataset) == {name: list(range(n)) for name, n in SIZES.items()}
        assert [name for name, _ in items] == loader.draw_order()
        # Interleaved, not one dataset after the other.
        switches = sum(a[0] != b[0] for a, b in zip(items, items[1:]))
        assert switches > 10


def test_multi_loader_order_is_seeded_by_seed_and_epoch():
    a = data.MultiDatasetLoader(tagged(SIZES), seed=0)
    b = data.MultiDatasetLoader(tagged(SIZES), seed=0)
    orders = []
    for epoch in range(5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        order = [name for name, _ in a]
        assert order == [name for name, _ in a], "same epoch, same order"
        assert order == [name for name, _ in b], "two instances with the same seed and epoch agree"
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 5, "each epoch draws a different order"
    other = data.MultiDatasetLoader(tagged(SIZES), seed=1)
    assert [name for name, _ in other] != orders[0]


def test_multi_loader_order_is_the_same_in_separate_processes():
    """Processes stay in step: the draw must not depend on per-process state such as hash seeds.
    One other process (imports cost seconds) with a hash seed other than this process's."""
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    script = ("import json, sys; sys.path.insert(0, {repo!r}); import data\n"
              "class Sized(list):\n    def set_epoch(self, epoch): pass\n"
              "loader = data.MultiDatasetLoader({{n: Sized([0] * k) for n, k in {sizes!r}.items()}}, seed=5)\n"
              "loader.set_epoch(2)\n"
              "print(json.dumps([hash('alpha'), loader.draw_order()]))\n").format(repo=REPO_DIR, sizes=SIZES)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert proc.returncode == 0, proc.stderr
    other_hash, other_order = json.loads(proc.stdout.strip().splitlines()[-1])
    assert other_hash != hash("alpha"), "the other process must hash strings differently"
    here = data.MultiDatasetLoader(tagged(SIZES), seed=5)
    here.set_epoch(2)
    assert other_order == here.draw_order()


def test_multi_loader_draw_is_proportional_to_batch_counts():
    loader = data.MultiDatasetLoader(tagged(SIZES), seed=0)
    epochs = 3000
    firsts = collections.Counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        firsts[loader.draw_order()[0]] += 1
    total = sum(SIZES.values())
    expected = {name: epochs * n / total for name, n in SIZES.items()}
    chi2 = sum((firsts[name] - e) ** 2 / e for name, e in expected.items())
    # 2 degrees of freedom: P(chi2 > 13.8) = 0.001 under the right distribution; uniform weights give ~1000.
    assert chi2 < 13.8, (firsts, expected)
    for name in SIZES:
        assert abs(firsts[name] / epochs - SIZES[name] / total) < 0.03, firsts


def published_multiloader_order(sizes, epoch):
    """The published MultiLoader, verbatim but for batches: random.Random(epoch); every draw
    rng.choices(names, weights=batch counts); a StopIteration removes the dataset."""
    rng = random.Random(epoch)
    iters = {name: iter(range(n)) for name, n in sizes.items()}
    names, weights = list(iters), [sizes[name] for name in iters]
    order = []
    while names:
        name = rng.choices(names, weights=weights)[0]
        try:
            next(iters[name])
            order.append(name)
        except StopIteration:
            idx = names.index(name)
            names.pop(idx)
            weights.pop(idx)
    return order


def test_multi_loader_published_draw_is_the_published_multiloader():
    for seed in (0, 7):
        loader = data.MultiDatasetLoader(tagged(SIZES), seed=seed, published_draw=True)
        for epoch in range(4):
            loader.set_epoch(epoch)
            assert [name for name, _ in loader] == published_multiloader_order(SIZES, epoch)
    ours = data.MultiDatasetLoader(tagged(SIZES), seed=0)
    ours.set_epoch(0)
    assert ours.draw_order() != published_multiloader_order(SIZES, 0)


def test_multi_loader_skips_empty_datasets():
    loaders = tagged({"a": 3, "empty": 0, "b": 2})
    loader = data.MultiDatasetLoader(loaders, seed=0)
    assert len(loader) == 5
    for epoch in range(10):
        loader.set_epoch(epoch)
        names = [name for name, _ in loader]
        assert sorted(names) == ["a", "a", "a", "b", "b"]
    assert list(data.MultiDatasetLoader(tagged({"x": 0, "y": 0}))) == []
    assert len(data.MultiDatasetLoader({})) == 0 and list(data.MultiDatasetLoader({})) == []


class EpochAware:
    """A sized iterable of batches that records set_epoch calls and reshuffles by epoch."""

    def __init__(self, name, n):
        self.name, self.n, self.epochs = name, n, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def iter_from(self, start):
        epoch = self.epochs[-1] if self.epochs else None
        return iter([(self.name, i, epoch) for i in range(start, self.n)])


def test_multi_loader_forwards_set_epoch():
    aware, other = EpochAware("aware", 4), EpochAware("other", 3)
    loader = data.MultiDatasetLoader({"aware": aware, "other": other}, seed=0)
    loader.set_epoch(3)
    loader.set_epoch(4)
    assert aware.epochs == other.epochs == [3, 4]
    assert loader.epoch == 4
    items = [batch for _, batch in loader]
    assert len(items) == 7
    assert [b for b in items if b[0] == "aware"] == [("aware", i, 4) for i in range(4)]
    assert [b for b in items if b[0] == "other"] == [("other", i, 4) for i in range(3)]


def test_multi_loader_set_epoch_start_resumes_mid_epoch_without_replaying():
    for epoch in (0, 1, 5):
        full_loader = data.MultiDatasetLoader(tagged(SIZES), seed=2)
        full_loader.set_epoch(epoch)
        full = list(full_loader)
        assert len(full) == 100
        for start in (0, 1, 17, 50, 99, 100):
            loaders = tagged(SIZES)
            loader = data.MultiDatasetLoader(loaders, seed=2)
            loader.set_epoch(epoch, start=start)
            assert list(loader) == full[start:], (epoch, start)
            # Each dataset is asked for its batches from the number already used, not from 0.
            done = collections.Counter(name for name, _ in full[:start])
            assert {name: b.starts for name, b in loaders.items()} == {name: [done[name]] for name in SIZES}
            assert all(b.epochs == [epoch] for b in loaders.values())
            # The next epoch starts at its beginning again.
            loader.set_epoch(epoch + 1)
            full_loader.set_epoch(epoch + 1)
            assert list(loader) == list(full_loader)
            full_loader.set_epoch(epoch)
    # Iterating again without set_epoch repeats the same (resumed) epoch: epochs do not advance by themselves.
    loader = data.MultiDatasetLoader(tagged(SIZES), seed=2)
    loader.set_epoch(1, start=40)
    assert list(loader) == list(loader) and len(list(loader)) == 60


# ---- DatasetBatches: sharding over processes, pure batches, resumption -----------------------------

def in_memory_split(num_rows, num_negatives=6):
    """A split of num_rows hand-built rows (row r's query is tagged q_tag(r)), as load_splits gives it."""
    import datasets

    return datasets.Dataset(to_table(make_rows(num_rows, num_negatives)))


def batches_of(split, *, bs=4, k=3, train=True, seed=0, stream=0, rank=0, world=1, max_seq_length=100):
    return data.DatasetBatches(split, batch_size=bs, num_neg=k, max_seq_length=max_seq_length, eos_id=EOS,
                               train=train, seed=seed, stream=stream, rank=rank, world=world)


def row_ids(batch):
    """The split rows of a batch, from its query tags."""
    return [tag_of(s) - q_tag(0) for s in real_sequences(batch)[: batch["num_queries"]]]


def negative_picks(batch):
    """Each row's picked negatives, as 1-based negative numbers."""
    return [[t - n_tag(r, 0) for t in negative_tags(batch, i)] for i, r in enumerate(row_ids(batch))]


def check_rows_intact(batch):
    """Each query comes with its own positive and its own negatives, the sequences uncut."""
    rows, n = row_ids(batch), batch["num_queries"]
    seqs = real_sequences(batch)
    assert [tag_of(s) for s in seqs[n: 2 * n]] == [p_tag(r) for r in rows]
    for i, r in enumerate(rows):
        assert all(1 <= j <= 6 for j in negative_picks(batch)[i]), negative_picks(batch)
        assert len(set(negative_tags(batch, i))) == batch["num_neg"]
    for s in seqs:
        assert s == seq(tag_of(s), len(s))


def ceil(a, b):
    return -(-a // b)


def same_batch(a, b):
    return (torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["lengths"], b["lengths"])
            and a["num_queries"] == b["num_queries"] and a["num_neg"] == b["num_neg"])


def same_batches(xs, ys):
    xs, ys = list(xs), list(ys)
    return len(xs) == len(ys) and all(same_batch(a, b) for a, b in zip(xs, ys))


@pytest.mark.parametrize("num_rows,world", [(23, 2), (23, 3), (27, 2), (27, 3), (30, 3), (37, 2)])
def test_dataset_batches_shard_an_epoch_over_processes(num_rows, world):
    bs = 4
    assert num_rows % (bs * world), "the test wants a row count that does not divide evenly"
    split = in_memory_split(num_rows)
    num_batches = ceil(num_rows, bs)
    single = batches_of(split, bs=bs, seed=7, stream=1)
    assert len(single) == num_batches
    epoch_order = list(single)  # the epoch's global batches, in order
    assert sorted(r for b in epoch_order for r in row_ids(b)) == list(range(num_rows))
    assert [b["num_queries"] for b in epoch_order] == [bs] * (num_batches - 1) + [num_rows - bs * (num_batches - 1)]
    assert epoch_order[-1]["num_queries"] < bs, "the last batch is partial"
    for b in epoch_order:
        check_rows_intact(b)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        epoch_order = list(single)
        per_rank = []
        for rank in range(world):
            shard = batches_of(split, bs=bs, seed=7, stream=1, rank=rank, world=world)
            shard.set_epoch(epoch)
            per_rank.append(list(shard))
            assert len(shard) == len(per_rank[-1]) == ceil(num_batches, world), "every process: the same count"
        # Round robin: step j of process `rank` is global batch j * world + rank. As accelerate's
        # even_batches: every batch full, the last partial one and the added ones filled with the
        # rows of the epoch's first `world` batches, in order.
        dealt = [per_rank[rank][j] for j in range(len(per_rank[0])) for rank in range(world)]
        assert len(dealt) == num_batches + (-num_batches) % world
        assert {b["num_queries"] for b in dealt} == {bs}
        assert same_batches(dealt[: num_batches - 1], epoch_order[:-1])
        rows = [r for b in epoch_order for r in row_ids(b)]
        start = rows[: world * bs]
        fill = (start * (world * bs // len(start) + 1))[: len(dealt) * bs - num_rows]
        assert [r for b in dealt for r in row_ids(b)] == rows + fill


def test_dataset_batches_with_fewer_rows_than_processes_times_batch_size():
    for num_rows, world in ((3, 3), (5, 3), (2, 4), (7, 2)):
        split = in_memory_split(num_rows)
        epoch_order = list(batches_of(split, bs=4))
        shards = [list(batches_of(split, bs=4, rank=rank, world=world)) for rank in range(world)]
        assert all(len(s) == 1 for s in shards), (num_rows, world)
        rows = [r for b in epoch_order for r in row_ids(b)]
        cycled = rows * (4 * world)
        for rank, (b,) in enumerate(shards):  # the rows, repeated as often as needed, dealt 4 at a time
            assert b["num_queries"] == 4 and row_ids(b) == cycled[4 * rank: 4 * rank + 4], (num_rows, world, rank)
        assert {r for (b,) in shards for r in row_ids(b)} == set(range(num_rows))
    (only,) = batches_of(in_memory_split(3), bs=4, world=2, rank=1)
    assert only["num_queries"] == 4 and sorted(set(row_ids(only))) == [0, 1, 2]


def test_dataset_batches_are_a_pure_function_of_epoch_and_index():
    split = in_memory_split(29)
    for world in (1, 2):
        for rank in range(world):
            reference = {}
            walker = batches_of(split, seed=3, stream=2, rank=rank, world=world)
            for epoch in range(3):
                walker.set_epoch(epoch)
                for j, b in enumerate(walker):
                    reference[epoch, j] = b
            assert len(reference) == 3 * len(walker)
            keys = list(reference)
            random.Random(world * 10 + rank).shuffle(keys)
            reused = batches_of(split, seed=3, stream=2, rank=rank, world=world)
            for epoch, j in keys:
                fresh = batches_of(split, seed=3, stream=2, rank=rank, world=world)
                fresh.set_epoch(epoch)
                assert same_batch(fresh.batch(j), reference[epoch, j]), (world, rank, epoch, j)
                reused.set_epoch(epoch)  # one instance hopping between epochs and batches in any order
                assert same_batch(reused.batch(j), reference[epoch, j]), (world, rank, epoch, j)
            # Epochs differ from each other (otherwise the above proves little).
            assert not same_batch(reference[0, 0], reference[1, 0])
            assert len({tuple(reference[e, j]["input_ids"].tolist()) for e, j in keys}) == len(keys)


def test_dataset_batches_do_not_advance_by_iterating_and_reshuffle_by_set_epoch():
    split = in_memory_split(25)
    loader = batches_of(split, seed=1)
    first = list(loader)
    assert same_batches(loader, first), "iterating again without set_epoch: the same epoch"
    loader.set_epoch(1)
    second = list(loader)
    assert [row_ids(b) for b in second] != [row_ids(b) for b in first], "another epoch, another shuffle"
    assert sorted(r for b in second for r in row_ids(b)) == list(range(25))
    assert [r for b in first for r in row_ids(b)] != list(range(25)), "training rows are shuffled"
    loader.set_epoch(0)
    assert same_batches(loader, first), "back to epoch 0: its batches again"


def test_dataset_batches_iter_from_is_the_tail_of_the_epoch():
    split = in_memory_split(30)
    for world, rank in ((1, 0), (3, 2)):
        loader = batches_of(split, seed=4, rank=rank, world=world)
        for epoch in (0, 2):
            loader.set_epoch(epoch)
            full = list(loader)
            for start in range(len(full) + 1):
                fresh = batches_of(split, seed=4, rank=rank, world=world)
                fresh.set_epoch(epoch)
                built = []
                fresh.batch = lambda j, build=fresh.batch: built.append(j) or build(j)
                assert same_batches(fresh.iter_from(start), full[start:]), (world, epoch, start)
                assert built == list(range(start, len(full))), "the skipped batches are not built"


def test_multi_loader_over_dataset_batches_resumes_at_any_position():
    sizes = {"alpha": 21, "beta": 9, "gamma": 14}
    splits = {name: in_memory_split(n) for name, n in sizes.items()}

    def multi(rank=0, world=1):
        loaders = {name: batches_of(split, bs=3, seed=6, stream=i, rank=rank, world=world)
                   for i, (name, split) in enumerate(splits.items())}
        built = collections.Counter()
        for name, loader in loaders.items():
            loader.batch = lambda j, build=loader.batch, name=name: built.update([name]) or build(j)
        return data.MultiDatasetLoader(loaders, seed=6), built

    for world, rank in ((1, 0), (2, 1)):
        reference, _ = multi(rank, world)
        epochs = []
        for epoch in (0, 1):
            reference.set_epoch(epoch)
            epochs.append(list(reference))
            assert len(epochs[-1]) == len(reference) == sum(ceil(ceil(n, 3), world) for n in sizes.values())
        length = len(epochs[0])
        assert [name for name, _ in epochs[0]] != [name for name, _ in epochs[1]]
        for epoch, full in enumerate(epochs):
            for start in sorted({0, 1, 2, length // 2, length - 1, length}):
                loader, built = multi(rank, world)
                loader.set_epoch(epoch, start=start)
                tail = list(loader)
                assert [name for name, _ in tail] == [name for name, _ in full[start:]], (world, epoch, start)
                assert all(same_batch(a, b) for (_, a), (_, b) in zip(tail, full[start:]))
                assert sum(built.values()) == length - start, "no batch before `start` is built"
                # Across the epoch boundary: the next epoch in full.
                if epoch == 0:
                    loader.set_epoch(1)
                    after = list(loader)
                    assert [name for name, _ in after] == [name for name, _ in epochs[1]]
                    assert all(same_batch(a, b) for (_, a), (_, b) in zip(after, epochs[1]))


def test_negatives_depend_on_the_global_batch_index_not_the_rank():
    split = in_memory_split(26)  # 7 batches of 4 (the last of 2)
    for epoch in (0, 3):
        single = batches_of(split, seed=9, stream=4)
        single.set_epoch(epoch)
        global_batches = list(single)
        for world in (2, 3):
            for rank in range(world):
                shard = batches_of(split, seed=9, stream=4, rank=rank, world=world)
                shard.set_epoch(epoch)
                for j, b in enumerate(shard):
                    g = j * world + rank
                    if g >= len(global_batches):  # added by even_batches from the epoch's first rows
                        continue
                    n = global_batches[g]["num_queries"]  # the last one, filled up, starts as the partial one
                    assert row_ids(b)[:n] == row_ids(global_batches[g])
                    assert negative_picks(b)[:n] == negative_picks(global_batches[g]), (epoch, world, rank, j)
        picks = [p for b in global_batches for p in negative_picks(b)]
        assert any(p != [1, 2, 3] for p in picks), "training samples its negatives"
        assert len({tuple(p) for p in picks}) > 10, "drawn afresh for each row, not one choice per batch"
    # Another epoch samples afresh: other negatives for the same row, and not the same picks by batch
    # position either (negatives seeded by the batch index alone would repeat them on other rows).
    by_row, by_position = [], []
    for epoch in (0, 1):
        single.set_epoch(epoch)
        by_row.append({r: p for b in single for r, p in zip(row_ids(b), negative_picks(b))})
        by_position.append([negative_picks(b) for b in single])
    assert by_row[0] != by_row[1]
    assert by_position[0] != by_position[1]


def test_streams_and_seeds_shuffle_and_sample_differently():
    split = in_memory_split(24)

    def epoch_of(**kw):
        batches = list(batches_of(split, **kw))
        return [row_ids(b) for b in batches], [negative_picks(b) for b in batches], batches

    base_rows, base_picks, base = epoch_of(seed=0, stream=0)
    assert same_batches(epoch_of(seed=0, stream=0)[2], base), "same seed and stream: the same batches"
    for kw in ({"seed": 0, "stream": 1}, {"seed": 0, "stream": 2}, {"seed": 1, "stream": 0}):
        rows, picks, _ = epoch_of(**kw)
        assert rows != base_rows, kw
        # Negatives of the same rows differ too (compared row by row, whatever batch the row is in).
        by_row = {r: p for rs, ps in zip(rows, picks) for r, p in zip(rs, ps)}
        base_by_row = {r: p for rs, ps in zip(base_rows, base_picks) for r, p in zip(rs, ps)}
        assert by_row != base_by_row, kw
    # Two datasets of the same size under different streams do not draw the same permutation.
    assert epoch_of(seed=5, stream=0)[0] != epoch_of(seed=5, stream=1)[0]


def test_validation_batches_are_in_order_with_the_first_negatives_every_epoch():
    split = in_memory_split(14)
    for world in (1, 2, 3):
        for rank in range(world):
            first = None
            for epoch in (0, 1, 4):
                for stream in (0, 3):
                    loader = batches_of(split, train=False, seed=epoch + 11, stream=stream, rank=rank, world=world)
                    loader.set_epoch(epoch)
                    batches = list(loader)
                    if first is None:
                        first = batches
                    assert same_batches(batches, first), (world, rank, epoch, stream)
            # Global batch g holds rows 4g .. 4g+3 in order, round robin over the processes; with several,
            # the rows go on from the start past row 13 (accelerate's even_batches: every batch full).
            rows = list(range(14)) + list(range(14)) if world > 1 else list(range(14))
            for j, b in enumerate(first):
                g = j * world + rank
                assert row_ids(b) == rows[4 * g: 4 * g + 4]
                assert negative_picks(b) == [[1, 2, 3]] * len(row_ids(b))
            assert len(first) == ceil(4, world)


def test_make_loader_takes_seed_and_sizes_from_the_config():
    split = in_memory_split(19)
    cfg = config.Config(model_path="m", train_data_path="d", train_batch_size=3, num_hard_neg=4, max_seq_length=4,
                        seed=12)
    got = data.make_loader(split, "retrieval", cfg, EOS, train=True, stream=2, rank=1, world=2)
    expected = batches_of(split, bs=3, k=4, seed=12, stream=2, rank=1, world=2, max_seq_length=4)
    assert len(got) == len(expected) == 4
    for epoch in (0, 1):
        got.set_epoch(epoch)
        expected.set_epoch(epoch)
        assert same_batches(got, expected)
    assert not same_batches(got, batches_of(split, bs=3, k=4, seed=0, stream=2, rank=1, world=2,
                                            max_seq_length=4))
    b = next(iter(got))
    assert b["num_neg"] == 4 and int(b["lengths"].max()) == 4
    one = next(iter(data.make_loader(split, "classification", cfg, EOS, train=False)))
    assert one["num_neg"] == 1 and one["num_queries"] == 3
    with pytest.raises(TypeError):
        data.make_loader(split, "retrieval", cfg, EOS, seed=0, train=True)


# ---- make_loader over a real tokenized split ------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(f"{tiny}/backbone")


def make_cfg(tiny, tokenized, cache_dir, **kw):
    values = dict(model_path=f"{tiny}/backbone", train_data_path=tokenized, cache_dir=str(cache_dir),
                  train_batch_size=4, num_hard_neg=3, max_seq_length=64)
    values.update(kw)
    return config.Config(**values)


def file_rows(path, columns):
    return [tuple(tuple(row[c]) for c in columns) for row in pq.read_table(path, columns=columns).to_pylist()]


def split_rows(split, columns):
    return [tuple(tuple(row[c]) for c in columns) for row in split]


def test_splits_are_disjoint_cover_the_file_and_are_seeded(tiny, tokenized, tmp_path):
    path = os.path.join(tokenized, "msmarco.parquet")
    columns = data.token_columns(path, 3)
    assert columns[:2] == ["query_input_ids", "passage_input_ids"]
    assert columns[2:] == [f"negative_{i}_input_ids" for i in range(1, 11)]
    everything = file_rows(path, columns)
    assert len(set(everything)) == len(everything) == 60

    cfg = make_cfg(tiny, tokenized, tmp_path / "cache1", validation_fraction=0.2)
    train, valid = data.load_splits(path, columns, cfg)
    train_rows, valid_rows = split_rows(train, columns), split_rows(valid, columns)
    assert len(valid_rows) == 12 and len(train_rows) == 48
    assert not set(train_rows) & set(valid_rows)
    assert collections.Counter(train_rows + valid_rows) == collections.Counter(everything)
    assert train_rows != everything[:48], "the split is shuffled"

    # Same split on a second load, from the cache and from a fresh cache.
    for cache in ("cache1", "cache2"):
        train2, valid2 = data.load_splits(path, columns, make_cfg(tiny, tokenized, tmp_path / cache,
                                                                  validation_fraction=0.2))
        assert split_rows(train2, columns) == train_rows and split_rows(valid2, columns) == valid_rows

    # Default fraction (0.01): one validation row out of 60.
    train3, valid3 = data.load_splits(path, columns, make_cfg(tiny, tokenized, tmp_path / "cache3"))
    assert len(valid3) == 1 and len(train3) == 59


def test_read_dataset_scans_without_pre_buffering_and_reuses_its_cache(tokenized, tmp_path, monkeypatch):
    """Arrow's pre_buffer would keep every row group of the file in memory while datasets converts it:
    read_dataset turns it off where datasets has the option. The option is part of the cache key, which
    must stay the same from read to read: a second read reuses the cache files, unchanged."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import ParquetConfig

    calls = []
    original = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    path = os.path.join(tokenized, "msmarco.parquet")
    first = data.read_dataset(path, str(tmp_path))
    stamps = {f["filename"]: os.stat(f["filename"]).st_mtime_ns for f in first.cache_files}
    second = data.read_dataset(path, str(tmp_path))
    assert {f["filename"]: os.stat(f["filename"]).st_mtime_ns for f in second.cache_files} == stamps
    assert second.data.table.equals(pq.read_table(path))
    if "fragment_scan_options" in ParquetConfig.__dataclass_fields__:
        assert all(kwargs["fragment_scan_options"].pre_buffer is False for kwargs in calls)
    else:
        assert all("fragment_scan_options" not in kwargs for kwargs in calls)


def check_loader_batches(loader, split, columns, k, tok, bs, max_seq_length=64, picks=None):
    """Every batch: bs*(2+k) flat sequences, eos last, each query with its own positive and negatives
    from the split. Returns the queries in loader order; `picks` gets {query: picked negatives}."""
    by_query = {tuple(row["query_input_ids"]): row for row in split}
    queries = []
    for batch in loader:
        n = batch["num_queries"]
        assert n <= bs and batch["num_neg"] == k
        assert len(batch["lengths"]) == n * (2 + k)
        check_flat(batch)
        assert max(batch["lengths"].tolist()) <= max_seq_length
        seqs = real_sequences(batch)
        assert all(s[-1] == tok.eos_token_id for s in seqs)
        for r in range(n):
            row = by_query[tuple(seqs[r])]
            negs = [tuple(row[c]) for c in columns[2:]]
            assert seqs[n + r] == row["passage_input_ids"], "query r's own positive, uncut (tokenized at 64)"
            picked = [tuple(s) for s in seqs[2 * n + r * k : 2 * n + (r + 1) * k]]
            assert set(picked) <= set(negs) and len(set(picked)) == k
            queries.append(tuple(seqs[r]))
            if picks is not None:
                picks[tuple(seqs[r])] = [negs.index(n) + 1 for n in picked]
    return queries


def test_make_loader_train_and_validation(tiny, tokenized, tmp_path, tok):
    path = os.path.join(tokenized, "msmarco.parquet")
    columns = data.token_columns(path, 3)
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", validation_fraction=0.2, seed=0)
    train, valid = data.load_splits(path, columns, cfg)

    loader = data.make_loader(train, "retrieval", cfg, tok.eos_token_id, train=True)
    assert len(loader) == 12
    picks1, picks2 = {}, {}
    queries = check_loader_batches(loader, train, columns, 3, tok, 4, picks=picks1)
    assert sorted(queries) == sorted(tuple(q) for q in train["query_input_ids"]), "each train row once an epoch"
    assert queries != [tuple(q) for q in train["query_input_ids"]], "training batches are shuffled"
    # Training samples negatives from all 10 (not always negative_1..3), afresh in the next epoch.
    assert any(max(p) > 3 for p in picks1.values()), picks1
    assert check_loader_batches(loader, train, columns, 3, tok, 4) == queries, "iterating again: the same epoch"
    loader.set_epoch(1)
    queries2 = check_loader_batches(loader, train, columns, 3, tok, 4, picks=picks2)
    assert sorted(queries2) == sorted(queries)
    assert queries2 != queries, "the next epoch is shuffled differently"
    assert picks2 != picks1, "the next epoch draws other negatives"
    other_cfg = make_cfg(tiny, tokenized, tmp_path / "cache", validation_fraction=0.2, seed=1)
    other_seed = data.make_loader(train, "retrieval", other_cfg, tok.eos_token_id, train=True)
    assert check_loader_batches(other_seed, train, columns, 3, tok, 4) != queries

    # Same seed -> same batches.
    first = list(data.make_loader(train, "retrieval", cfg, tok.eos_token_id, train=True))
    second = list(data.make_loader(train, "retrieval", cfg, tok.eos_token_id, train=True))
    assert len(first) == len(second) == 12
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["lengths"], b["lengths"])

    # Validation: in order, with the first k negatives, the same every pass.
    vloader = data.make_loader(valid, "retrieval", cfg, tok.eos_token_id, train=False)
    vpicks = {}
    vqueries = check_loader_batches(vloader, valid, columns, 3, tok, 4, picks=vpicks)
    assert vqueries == [tuple(q) for q in valid["query_input_ids"]]
    assert all(p == [1, 2, 3] for p in vpicks.values()) and len(vpicks) == len(valid)
    first_batch = next(iter(vloader))
    n = first_batch["num_queries"]
    seqs = real_sequences(first_batch)
    for r in range(n):
        row = valid[r]
        assert seqs[2 * n + r * 3 : 2 * n + (r + 1) * 3] == [row[f"negative_{j}_input_ids"] for j in (1, 2, 3)]
    assert torch.equal(next(iter(vloader))["input_ids"], first_batch["input_ids"])


def test_make_loader_cuts_to_max_seq_length(tiny, tokenized, tmp_path, tok):
    path = os.path.join(tokenized, "banking77.parquet")
    columns = data.token_columns(path, 3)
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", max_seq_length=6, seed=1)
    train, _ = data.load_splits(path, columns, cfg)
    loader = data.make_loader(train, "clustering", cfg, tok.eos_token_id, train=True)
    cut = 0
    for batch in loader:
        assert len(batch["lengths"]) == batch["num_queries"] * 5
        assert int(batch["lengths"].max()) <= 6
        check_flat(batch)
        assert all(s[-1] == tok.eos_token_id for s in real_sequences(batch))
        cut += int((batch["lengths"] == 6).sum())
    assert cut > 0


def test_make_loader_classification_uses_one_negative(tiny, tokenized, tmp_path, tok):
    path = os.path.join(tokenized, "imdb.parquet")
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", num_hard_neg=7)
    k = data.num_negatives_needed("classification", cfg)
    columns = data.token_columns(path, k)
    assert columns == ["query_input_ids", "passage_input_ids", "negative_1_input_ids"]
    train, _ = data.load_splits(path, columns, cfg)
    loader = data.make_loader(train, "classification", cfg, tok.eos_token_id, train=True)
    batches = list(loader)
    assert len(batches) == len(loader) == (len(train) + 3) // 4
    for batch in batches[:-1]:
        assert len(batch["lengths"]) == 4 * (2 + 1) and batch["num_neg"] == 1
    queries = check_loader_batches(batches, train, columns, 1, tok, 4)
    assert len(queries) == len(train)


# ---- num_hard_neg_clustering ---------------------------------------------------------------------

def test_clustering_batches_take_num_hard_neg_clustering(tiny, tokenized, tmp_path, tok):
    """check_datasets -> load_splits -> make_loader: clustering batches carry num_hard_neg_clustering
    negatives per query (drawn from the row's own), retrieval keeps num_hard_neg."""
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", num_hard_neg=3, num_hard_neg_clustering=5)
    checked = {name: (path, task, columns) for name, path, task, columns in
               data.check_datasets(cfg, {"banking77": "clustering", "msmarco": "retrieval", "imdb": "classification",
                                         "natural_questions": "retrieval"})}
    for name, k in (("banking77", 5), ("msmarco", 3)):
        path, task, columns = checked[name]
        assert len(columns) == 2 + 10  # every negative column is kept to sample from
        train, _ = data.load_splits(path, columns, cfg)
        loader = data.make_loader(train, task, cfg, tok.eos_token_id, train=True)
        queries = check_loader_batches(loader, train, columns, k, tok, 4)
        assert len(queries) == len(train)


def test_too_few_negatives_for_clustering_names_the_key(tiny, tokenized, tmp_path):
    values = dict(model_path=f"{tiny}/backbone", train_data_path=tokenized, cache_dir=str(tmp_path / "cache"),
                  num_hard_neg=3, num_hard_neg_clustering=11)
    proc = call_main(run.main, ["--config", write_config(tmp_path / "c.json", **values), "--prepare_only"])
    line = assert_user_error(proc, os.path.join(tokenized, "banking77.parquet"), "10 hard negatives", "11",
                             "lower num_hard_neg_clustering")
    assert "lower num_hard_neg " not in line
