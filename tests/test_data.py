"""data.py: collate of one homogeneous batch, the multi-dataset loader, and loaders over real splits."""
import collections
import json
import os
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_DIR

import config
import data
from model import load_tokenizer

EOS, PAD = 2, 0


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


def real_sequences(batch):
    """The unpadded token lists of a collated batch."""
    return [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(batch["lengths"])]


def tag_of(tokens):
    return tokens[0] // 100


def negative_tags(batch, row):
    bs, k = batch["num_queries"], batch["num_neg"]
    seqs = real_sequences(batch)
    return [tag_of(s) for s in seqs[2 * bs + row * k : 2 * bs + (row + 1) * k]]


def check_padding(batch, pad_id=PAD):
    ids, lengths = batch["input_ids"], batch["lengths"]
    assert ids.dtype == torch.long
    assert ids.shape[1] == int(lengths.max()), "padded to the longest sequence of the batch"
    for i, n in enumerate(lengths.tolist()):
        assert (ids[i, n:] == pad_id).all(), f"row {i} is not right-padded with pad_id after its length {n}"


# ---- collate -------------------------------------------------------------------------------------

def test_collate_order_lengths_and_right_padding():
    bs, k = 4, 3
    rows = make_rows(bs, num_negatives=5)
    batch = data.collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=None)

    expected = ([r["query_input_ids"] for r in rows] + [r["passage_input_ids"] for r in rows]
                + [rows[r][f"negative_{j}_input_ids"] for r in range(bs) for j in range(1, k + 1)])
    assert batch["input_ids"].shape[0] == bs * (2 + k)
    assert real_sequences(batch) == expected
    assert batch["lengths"].tolist() == [len(s) for s in expected]
    assert len(set(batch["lengths"].tolist())) > 1, "the test needs sequences of different lengths"
    check_padding(batch)
    assert batch["num_queries"] == bs and batch["num_neg"] == k


def test_collate_pads_with_the_given_pad_id():
    rows = make_rows(3, num_negatives=2)
    batch = data.collate(rows, num_neg=2, max_seq_length=100, eos_id=EOS, pad_id=77, rng=None)
    check_padding(batch, pad_id=77)
    assert (batch["input_ids"] == 77).any()


def test_collate_cuts_long_sequences_and_forces_eos():
    max_len = 5
    lengths = {(0, 0): 9, (0, 1): 5, (1, 0): 3, (1, 1): 12}  # (row, kind) for query (0) / passage (1)

    def length(kind, r, j):
        return lengths.get((r, kind), 4 + j)  # negatives: 5 (exact), 6 (cut)

    rows = make_rows(2, num_negatives=2, length=length)
    batch = data.collate(rows, num_neg=2, max_seq_length=max_len, eos_id=EOS, pad_id=PAD, rng=None)
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
    assert batch["lengths"].max() == max_len and batch["input_ids"].shape[1] == max_len
    assert all(s[-1] == EOS for s in got)
    check_padding(batch)
    # The caller's rows are not modified in place.
    assert rows[0]["query_input_ids"] == seq(q_tag(0), 9)


def test_collate_without_rng_takes_the_first_negatives_in_numeric_column_order():
    # 12 negatives: negative_10 .. negative_12 sort before negative_2 as strings; dict order reversed.
    bs, k = 3, 11
    rows = make_rows(bs, num_negatives=12, reverse_cols=True)
    batch = data.collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=None)
    for r in range(bs):
        assert negative_tags(batch, r) == [n_tag(r, j) for j in range(1, k + 1)]
    again = data.collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=None)
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_collate_samples_negatives_without_replacement_from_the_own_row():
    bs, k, available = 3, 4, 6
    rows = make_rows(bs, num_negatives=available)
    rng = random.Random(1234)
    seen = collections.defaultdict(set)
    orders = set()
    for _ in range(300):
        batch = data.collate(rows, num_neg=k, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=rng)
        assert batch["input_ids"].shape[0] == bs * (2 + k)
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


def test_collate_same_seed_same_batch_and_different_seeds_differ():
    rows = make_rows(4, num_negatives=10)

    def run(seed):
        return data.collate(rows, num_neg=5, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=random.Random(seed))

    a, b = run(7), run(7)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["lengths"], b["lengths"])
    assert any(real_sequences(run(s)) != real_sequences(a) for s in (8, 9, 10))


def test_collate_one_negative_for_classification():
    assert data.num_negatives_needed("classification", 7) == 1
    assert data.num_negatives_needed("retrieval", 7) == 7
    assert data.num_negatives_needed("clustering", 7) == 7
    bs = 5
    rows = make_rows(bs, num_negatives=1)
    batch = data.collate(rows, num_neg=data.num_negatives_needed("classification", 7), max_seq_length=100,
                         eos_id=EOS, pad_id=PAD, rng=random.Random(0))
    assert batch["input_ids"].shape[0] == bs * 3 and batch["num_neg"] == 1
    assert [negative_tags(batch, r) for r in range(bs)] == [[n_tag(r, 1)] for r in range(bs)]


def test_collate_without_negatives():
    rows = make_rows(3, num_negatives=4)
    batch = data.collate(rows, num_neg=0, max_seq_length=100, eos_id=EOS, pad_id=PAD, rng=random.Random(0))
    assert batch["input_ids"].shape[0] == 6 and batch["num_neg"] == 0


# ---- MultiDatasetLoader --------------------------------------------------------------------------

def tagged(sizes):
    return {name: [(name, i) for i in range(n)] for name, n in sizes.items()}


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
    """Processes stay in step: the draw must not depend on per-process state such as hash seeds."""
    script = ("import json, sys; sys.path.insert(0, {repo!r}); import data\n"
              "loader = data.MultiDatasetLoader({{n: [0] * k for n, k in {sizes!r}.items()}}, seed=5)\n"
              "loader.set_epoch(2)\n"
              "print(json.dumps(loader.draw_order()))\n").format(repo=REPO_DIR, sizes=SIZES)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONHASHSEED": str(h)}) for h in (1, 2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    here = data.MultiDatasetLoader({n: [0] * k for n, k in SIZES.items()}, seed=5)
    here.set_epoch(2)
    assert outputs[0] == outputs[1] == here.draw_order()


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


def test_multi_loader_skips_empty_datasets():
    loaders = tagged({"a": 3, "empty": 0, "b": 2})
    loader = data.MultiDatasetLoader(loaders, seed=0)
    assert len(loader) == 5
    for epoch in range(10):
        loader.set_epoch(epoch)
        names = [name for name, _ in loader]
        assert sorted(names) == ["a", "a", "a", "b", "b"]
    assert list(data.MultiDatasetLoader({"x": [], "y": []})) == []
    assert len(data.MultiDatasetLoader({})) == 0 and list(data.MultiDatasetLoader({})) == []


class EpochAware:
    """A sized iterable of batches that records set_epoch calls and reshuffles by epoch."""

    def __init__(self, name, n):
        self.name, self.n, self.epochs = name, n, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def __iter__(self):
        epoch = self.epochs[-1] if self.epochs else None
        return iter([(self.name, i, epoch) for i in range(self.n)])


def test_multi_loader_forwards_set_epoch():
    aware, plain = EpochAware("aware", 4), [("plain", i, None) for i in range(3)]
    loader = data.MultiDatasetLoader({"aware": aware, "plain": plain}, seed=0)
    loader.set_epoch(3)
    loader.set_epoch(4)
    assert aware.epochs == [3, 4]
    assert loader.epoch == 4
    items = [batch for _, batch in loader]
    assert len(items) == 7
    assert [b for b in items if b[0] == "aware"] == [("aware", i, 4) for i in range(4)]


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


def check_loader_batches(loader, split, columns, k, tok, bs, max_seq_length=64, picks=None):
    """Every batch: bs*(2+k) sequences, eos last, right padding, each query with its own positive and
    negatives from the split. Returns the queries in loader order; `picks` gets {query: picked negatives}."""
    by_query = {tuple(row["query_input_ids"]): row for row in split}
    queries = []
    for batch in loader:
        n = batch["num_queries"]
        assert n <= bs and batch["num_neg"] == k
        assert batch["input_ids"].shape[0] == n * (2 + k)
        lengths = batch["lengths"].tolist()
        assert max(lengths) <= max_seq_length
        for i, length in enumerate(lengths):
            assert batch["input_ids"][i, length - 1] == tok.eos_token_id
            assert (batch["input_ids"][i, length:] == tok.pad_token_id).all()
        seqs = real_sequences(batch)
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
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", validation_fraction=0.2)
    train, valid = data.load_splits(path, columns, cfg)

    loader = data.make_loader(train, "retrieval", cfg, tok.eos_token_id, tok.pad_token_id, seed=0, train=True)
    assert len(loader) == 12
    picks1, picks2 = {}, {}
    queries = check_loader_batches(loader, train, columns, 3, tok, 4, picks=picks1)
    assert sorted(queries) == sorted(tuple(q) for q in train["query_input_ids"]), "each train row once an epoch"
    assert queries != [tuple(q) for q in train["query_input_ids"]], "training batches are shuffled"
    # Training samples negatives from all 10 (not always negative_1..3), afresh in the next epoch.
    assert any(max(p) > 3 for p in picks1.values()), picks1
    queries2 = check_loader_batches(loader, train, columns, 3, tok, 4, picks=picks2)
    assert queries2 != queries, "the next epoch is shuffled differently"
    assert picks2 != picks1, "the next epoch draws other negatives"
    other_seed = data.make_loader(train, "retrieval", cfg, tok.eos_token_id, tok.pad_token_id, seed=1, train=True)
    assert check_loader_batches(other_seed, train, columns, 3, tok, 4) != queries

    # Same seed -> same batches.
    again = data.make_loader(train, "retrieval", cfg, tok.eos_token_id, tok.pad_token_id, seed=0, train=True)
    first = [b["input_ids"] for b in data.make_loader(train, "retrieval", cfg, tok.eos_token_id,
                                                       tok.pad_token_id, seed=0, train=True)]
    second = [b["input_ids"] for b in again]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == len(second)

    # Validation: in order, with the first k negatives.
    vloader = data.make_loader(valid, "retrieval", cfg, tok.eos_token_id, tok.pad_token_id, seed=0, train=False)
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


def test_make_loader_cuts_to_max_seq_length(tiny, tokenized, tmp_path, tok):
    path = os.path.join(tokenized, "banking77.parquet")
    columns = data.token_columns(path, 3)
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", max_seq_length=6)
    train, _ = data.load_splits(path, columns, cfg)
    loader = data.make_loader(train, "clustering", cfg, tok.eos_token_id, tok.pad_token_id, seed=1, train=True)
    cut = 0
    for batch in loader:
        assert batch["input_ids"].shape[0] == batch["num_queries"] * 5
        assert batch["input_ids"].shape[1] <= 6
        for i, length in enumerate(batch["lengths"].tolist()):
            assert batch["input_ids"][i, length - 1] == tok.eos_token_id
        cut += int((batch["lengths"] == 6).sum())
    assert cut > 0


def test_make_loader_classification_uses_one_negative(tiny, tokenized, tmp_path, tok):
    path = os.path.join(tokenized, "imdb.parquet")
    k = data.num_negatives_needed("classification", 7)
    columns = data.token_columns(path, k)
    assert columns == ["query_input_ids", "passage_input_ids", "negative_1_input_ids"]
    cfg = make_cfg(tiny, tokenized, tmp_path / "cache", num_hard_neg=7)
    train, _ = data.load_splits(path, columns, cfg)
    loader = data.make_loader(train, "classification", cfg, tok.eos_token_id, tok.pad_token_id, seed=0, train=True)
    batches = list(loader)
    assert len(batches) == len(loader) == (len(train) + 3) // 4
    for batch in batches[:-1]:
        assert batch["input_ids"].shape[0] == 4 * (2 + 1) and batch["num_neg"] == 1
    queries = check_loader_batches(batches, train, columns, 1, tok, 4)
    assert len(queries) == len(train)
