"""mine_negatives.py: the ranking and selection rules against brute force, then the CLI as users run it.

The rule tests feed hand-made embeddings whose entries are multiples of 1/4 (every dot product is
exact in float32 and float64, and equal scores are common), so the code's ranking and an independent
brute force (a full score matrix, Python's sort, the rules applied by hand) must agree exactly, ties
included. The CLI tests use a random Qwen3 checkpoint with prompts (initializer_range 0.2: its cosines
spread over about [-0.4, 0.7], where the default init puts every pair near 0.9) on pairs of topic texts
with repeated queries, a query that is also a passage, duplicate passages and an extra corpus; their
independent check embeds the same texts with the project's encoder, rounds to the float16 store, and
re-derives every row's negatives. Subprocesses (a killed run, two processes under accelerate launch,
training) run with one thread, as the in-process runs do (one_thread), so that all give the same bytes.
"""
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    BIN,
    ONE_THREAD,
    REPO_DIR,
    assert_user_error,
    call_main,
    free_port,
    launch_env,
    run_cli,
    write_config,
)

import demo
import evaluate
import mine_negatives as mn
import tokenize_data_qwen

pytestmark = pytest.mark.usefixtures("one_thread")

N, SKIP, RANK, MARGIN = 4, 2, 12, 0.95  # the CLI runs' --num_negatives, --skip_top, --max_rank, --positive_margin
BATCH = 8


# ---- the rules on hand-made embeddings --------------------------------------------------------------

def dyadic(rng, n, d=8):
    """Vectors of multiples of 1/4 in [-1, 1]: exact dot products, frequent ties."""
    return (rng.integers(-4, 5, size=(n, d)) / 4).astype(np.float32)


def chunks_of(matrix, sizes):
    cuts = np.cumsum(sizes)[:-1]
    return mn.Vectors(np.split(matrix, cuts))


def brute_order(score_row, allowed):
    """Corpus ids by score, highest first, ties by lower id: Python's sort of the full row."""
    return sorted(allowed, key=lambda j: (-score_row[j], j))


@pytest.mark.parametrize("sizes, block", [([50], 1024), ([7, 20, 23], 5), ([1] * 50, 3)])
def test_rank_is_the_exact_top_k_in_a_total_order(sizes, block):
    rng = np.random.default_rng(0)
    queries, corpus = dyadic(rng, 9), dyadic(rng, 50)
    excluded = [sorted(rng.choice(50, size=int(rng.integers(0, 6)), replace=False).tolist()) for _ in range(9)]
    excluded[3] = list(range(45))  # five texts left: fewer than k
    offsets = np.cumsum([0] + [len(e) for e in excluded])
    keys = mn.rank(queries, chunks_of(corpus, sizes), offsets, np.array([j for e in excluded for j in e], np.int64),
                   k=12, block=block)
    ids, scores = mn.decode_keys(keys)
    full = queries.astype(np.float64) @ corpus.astype(np.float64).T
    for q in range(9):
        expected = brute_order(full[q], [j for j in range(50) if j not in excluded[q]])[:12]
        assert ids[q, : len(expected)].tolist() == expected
        assert scores[q, : len(expected)].tolist() == [full[q, j] for j in expected]
        assert (ids[q, len(expected) :] == -1).all() and np.isneginf(scores[q, len(expected) :]).all()
    assert len(set(np.round(full[0], 6))) < 50  # ties were there to break


def rule_case(seed=0):
    """A table of pairs and vectors for its texts: c0..c39 passages (c5 twice), q0..q29 queries where q0 has
    three rows (three positives) and q7's text is also a passage; extra corpus texts x0..x9 (and c1 again)."""
    rng = np.random.default_rng(seed)
    rows = [(f"q{i}", f"c{i}") for i in range(30)] + [("q0", "c30"), ("q0", "c31"), ("q9", "c5")]
    rows += [(f"q{i}", f"c{i + 20}") for i in range(12, 20)]
    rows[7] = ("c33", "c7")  # a query whose text is a corpus text
    table = pa.table({"query": [q for q, _ in rows], "passage": [p for _, p in rows]})
    extra = pa.array([f"x{i}" for i in range(10)] + ["c1", "x3"])
    texts = sorted({t for r in rows for t in r} | set(extra.to_pylist()))
    vectors = dict(zip(texts, dyadic(rng, len(texts))))
    return table, extra, vectors


def embed_case(table, extra, vectors, chunk_sizes=None):
    pairs = mn.build_pairs(table, extra)
    corpus = np.stack([vectors[t] for t in pairs.corpus.to_pylist()])
    queries = np.stack([vectors[t] for t in pairs.queries.to_pylist()])
    return pairs, queries, corpus


def run_rules(table, extra, vectors, settings, chunk_sizes=None, block=1024, name="f"):
    pairs, queries, corpus = embed_case(table, extra, vectors)
    corpus_vectors = chunks_of(corpus, chunk_sizes or [len(corpus)])
    keys = mn.rank(queries, corpus_vectors, pairs.offsets, pairs.excluded, settings.max_rank, block=block)
    mined = mn.select_negatives(lambda q: keys[q], pairs, mn.Vectors([queries]), corpus_vectors, settings, name)
    texts = pairs.corpus.to_pylist()
    return [[texts[j] if j >= 0 else None for j in row] for row in mined.negatives], mined


def brute_windows(table, extra, vectors, settings):
    """Per row: (its allowed negatives in rank order after window and margin, the skipped top, the
    excluded texts, the threshold), from the rules as written, in float64."""
    queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
    corpus = list(dict.fromkeys(passages + extra.to_pylist()))
    out = []
    for q, p in zip(queries, passages):
        excluded = {pp for qq, pp in zip(queries, passages) if qq == q} | {q}
        score = {t: float(np.dot(vectors[q].astype(np.float64), vectors[t].astype(np.float64))) for t in corpus}
        ranked = sorted((t for t in corpus if t not in excluded), key=lambda t: (-score[t], corpus.index(t)))
        window = ranked[settings.skip_top : settings.max_rank]
        threshold = None
        if settings.positive_margin is not None:
            pos = score[p]
            threshold = pos - (1 - settings.positive_margin) * abs(pos)
            window = [t for t in window if score[t] <= threshold]
        out.append((window, ranked[: settings.skip_top], excluded, threshold, score))
    return out


@pytest.mark.parametrize("skip_top, max_rank, margin", [(0, 6, None), (2, 9, None), (1, 15, 0.95), (0, 40, 0.5),
                                                        (3, 7, 1.0)])
def test_top_sampling_follows_the_rules(skip_top, max_rank, margin):
    table, extra, vectors = rule_case()
    settings = mn.Settings(num_negatives=3, skip_top=skip_top, max_rank=max_rank, positive_margin=margin)
    got, mined = run_rules(table, extra, vectors, settings, chunk_sizes=[13, 13, 30])
    expected_short, relaxed = [], 0
    for row, (window, skipped, excluded, threshold, score) in enumerate(brute_windows(table, extra, vectors, settings)):
        negatives = got[row]
        assert len(set(negatives)) == 3 and not set(negatives) & excluded  # exclusions (a), (b), (c)
        assert negatives[: min(3, len(window))] == window[:3]
        if len(window) < 3:
            expected_short.append(row)
            relaxed += check_fills(negatives[len(window) :], window, skipped, excluded, threshold, score)
    assert mined.short.tolist() == expected_short and mined.relaxed == relaxed
    assert margin is None or expected_short  # the margin cases do leave rows short


def check_fills(fills, window, skipped, excluded, threshold, score, tol=0.0):
    """A short row's fills are distinct texts outside the window and the exclusions, and outside the skipped
    top and under the margin's threshold, unless no such text was left: then the rest are the lowest-scored
    others. Returns the number of those. tol: how far a score may be off the code's."""
    assert len(set(fills)) == len(fills) and not set(fills) & (excluded | set(window))

    def under(t, slack):
        return threshold is None or score[t] <= threshold + slack

    fine = [t for t in fills if t not in skipped and under(t, tol)]
    if len(fine) == len(fills):
        return 0
    allowed = [t for t in score if t not in excluded | set(window) | set(skipped)]
    assert {t for t in allowed if under(t, -tol)} <= set(fine)  # the allowed texts ran out
    others = sorted((t for t in score if t not in excluded | set(window) | set(fine)), key=lambda t: score[t])
    assert [score[t] for t in fills if t not in fine] == pytest.approx(
        [score[t] for t in others[: len(fills) - len(fine)]], abs=tol)
    return len(fills) - len(fine)


def test_several_positives_and_the_query_text_are_never_negatives():
    table, extra, vectors = rule_case()
    settings = mn.Settings(num_negatives=5, max_rank=60, positive_margin=None)
    got, _ = run_rules(table, extra, vectors, settings)
    queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
    for row in (0, 30, 31):  # q0's three rows
        assert not {"c0", "c30", "c31"} & set(got[row])
    assert "c33" not in got[7]  # the query's own text, although it is a corpus text
    assert "c5" not in got[32] and "c9" not in got[32]  # q9's two positives
    assert all(len(set(row)) == 5 for row in got)  # no text twice
    for row, (q, p) in enumerate(zip(queries, passages)):
        assert p not in got[row] and q not in got[row]


def test_random_sampling_is_seeded_per_row_and_independent_of_blocks(monkeypatch):
    table, extra, vectors = rule_case()
    settings = mn.Settings(num_negatives=3, skip_top=1, max_rank=20, positive_margin=None, sampling="random", seed=7)
    first, _ = run_rules(table, extra, vectors, settings)
    monkeypatch.setattr(mn, "ROW_BLOCK", 4)
    again, _ = run_rules(table, extra, vectors, settings, chunk_sizes=[5, 11, 40], block=3)
    assert again == first
    other, _ = run_rules(table, extra, vectors, dataclasses.replace(settings, seed=8))
    assert other != first
    assert run_rules(table, extra, vectors, settings, name="g")[0] != first  # the file name is in the seed
    for negatives, (window, *_) in zip(first, brute_windows(table, extra, vectors, settings)):
        assert set(negatives) <= set(window)
        assert negatives == sorted(negatives, key=window.index)  # in rank order
    top, _ = run_rules(table, extra, vectors, dataclasses.replace(settings, sampling="top"))
    assert top != first


def test_short_rows_are_filled_within_the_rules_or_dropped():
    table, extra, vectors = rule_case()
    settings = mn.Settings(num_negatives=4, skip_top=2, max_rank=10, positive_margin=0.9, seed=3)
    got, mined = run_rules(table, extra, vectors, settings)
    windows = brute_windows(table, extra, vectors, settings)
    assert len(mined.short) >= 5
    relaxed = 0
    for row in mined.short:
        window, skipped, excluded, threshold, score = windows[row]
        assert got[row][: len(window)] == window
        relaxed += check_fills(got[row][len(window) :], window, skipped, excluded, threshold, score)
    assert relaxed == mined.relaxed < len(mined.short)
    assert run_rules(table, extra, vectors, settings)[0] == got  # the fills are seeded
    dropped = dataclasses.replace(settings, on_short="drop")
    kept, mined_drop = run_rules(table, extra, vectors, dropped)
    assert mined_drop.short.tolist() == mined.short.tolist()
    assert all(None in kept[row] for row in mined.short)
    assert [r for i, r in enumerate(kept) if i not in set(mined.short)] == [
        r for i, r in enumerate(got) if i not in set(mined.short)]


@pytest.mark.parametrize("floats", [mn.FILL_FLOATS, 3000])
def test_fill_short_fills_as_fill_does_row_by_row(monkeypatch, floats):
    """The short rows filled a block at a time give what fill gives one row at a time, with rows whose
    draws suffice and rows that need the whole corpus, in one block or in many (floats: the block size)."""
    rng = np.random.default_rng(5)
    table = pa.table({"query": [f"q{rng.integers(0, 150)}" for _ in range(300)],
                      "passage": [f"c{rng.integers(0, 250)}" for _ in range(300)]})
    pairs = mn.build_pairs(table, pa.array([f"c{i}" for i in range(300)]))
    queries, corpus = (rng.normal(size=(size, 6)).astype(np.float32) for size in (len(pairs.queries), 300))
    settings = mn.Settings(num_negatives=5, skip_top=2, max_rank=9, positive_margin=0.95, seed=2)
    corpus_vectors = chunks_of(corpus, [100, 120, 80])
    keys = mn.rank(queries, corpus_vectors, pairs.offsets, pairs.excluded, settings.max_rank)
    monkeypatch.setattr(mn, "FILL_FLOATS", floats)
    mined = mn.select_negatives(lambda q: keys[q], pairs, mn.Vectors([queries]), corpus_vectors, settings, "f")

    ids, scores = mn.decode_keys(keys[pairs.qid])
    positive = (queries[pairs.qid] * corpus[pairs.pid]).sum(1)
    chosen, counts = mn.select(ids, scores, positive, settings, mn.file_key("f"), np.arange(len(pairs.qid)))
    threshold = mn.margin_threshold(positive, settings.positive_margin)
    fast = 0
    for row in mined.short.tolist():
        have = chosen[row, : counts[row]].tolist()
        q = pairs.qid[row]
        rng_row = mn.row_rng(settings, mn.file_key("f"), row, mn.FILL_STREAM)
        first = rng_row.integers(300, size=4 * (5 - len(have)) + 32)
        extra, _ = mn.fill(5 - len(have), set(pairs.excluded_of(q).tolist()) | set(have),
                           [j for j in ids[row, :2].tolist() if j >= 0], queries[q], threshold[row], corpus_vectors,
                           mn.row_rng(settings, mn.file_key("f"), row, mn.FILL_STREAM), corpus @ queries[q])
        assert mined.negatives[row].tolist() == have + extra, row
        fast += set(extra) <= set(first.tolist())
    assert 10 < fast < len(mined.short) - 10  # both ways were taken


def test_fills_take_the_lowest_scored_texts_only_when_nothing_else_is_left():
    """A query scoring every text above its positive (margin 1.0): no text passes the margin, so the fills
    take the lowest-scored allowed texts, in that order, and say so."""
    table = pa.table({"query": ["q"], "passage": ["p"]})
    vectors = {"q": np.array([1, 0], np.float32), "p": np.array([-1, 0], np.float32)}
    extra = pa.array([f"x{i}" for i in range(6)])
    for i in range(6):
        vectors[f"x{i}"] = np.array([0.25 * (i % 3) - 0.5, 0.25], np.float32)  # scores -0.5, -0.25, 0, ...
    settings = mn.Settings(num_negatives=3, max_rank=6, positive_margin=1.0)
    got, mined = run_rules(table, extra, vectors, settings)
    assert mined.short.tolist() == [0] and mined.relaxed == 3
    assert got[0] == ["x0", "x3", "x1"]  # score -0.5 twice (lower corpus position first), then -0.25


def test_build_pairs_dedups_the_corpus_in_order_of_first_appearance():
    table, extra, _ = rule_case()
    pairs = mn.build_pairs(table, extra)
    passages = table.column("passage").to_pylist()
    assert pairs.corpus.to_pylist() == list(dict.fromkeys(passages + extra.to_pylist()))
    assert pairs.corpus.to_pylist()[pairs.pid[32]] == "c5"
    assert pairs.excluded_of(pairs.qid[0]).tolist() == sorted(pairs.corpus.to_pylist().index(t)
                                                              for t in ("c0", "c30", "c31"))


def test_order_keys_sort_like_scores_then_positions():
    import torch

    scores = torch.tensor([[0.5, -0.0, 0.0, -1.5, 3e-39, -3e-39, 0.5, -np.inf, 1e30]], dtype=torch.float32)
    keys = mn.order_keys(scores, torch.arange(10, 19))
    ids, decoded = mn.decode_keys(keys.numpy())
    assert ids[0].tolist() == list(range(10, 19)) and decoded[0].tolist() == scores[0].tolist()
    order = torch.argsort(keys[0], descending=True).tolist()
    assert order == [8, 0, 6, 4, 2, 1, 5, 3, 7]  # -0.0 ranks just below 0.0


# ---- the command line on a random model --------------------------------------------------------------

TOPICS = demo.TOPICS
FILLER = ["my", "the", "why", "is", "how", "do", "i", "a", "please", "now"]


def topic_text(rng, topic):
    words = rng.sample(TOPICS[topic], 3) + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words)


def write_pairs(folder, rows=70, extra=30, seed=0):
    """topics.parquet: columns id, query, passage, topic, with queries that repeat (rows 0-2 ask what rows
    40-42 ask), a query equal to another row's passage (row 5 asks row 6's passage) and a duplicate
    passage (row 11's is row 10's); extra.parquet (column text) with duplicates of passages."""
    rng = random.Random(seed)
    topics = [rng.choice(sorted(TOPICS)) for _ in range(rows)]
    queries = [topic_text(rng, t) for t in topics]
    passages = [topic_text(rng, t) for t in topics]
    for i in range(3):
        queries[40 + i] = queries[i]
    queries[5], passages[11] = passages[6], passages[10]
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(rows)), "query": queries, "passage": passages, "topic": topics}),
                   os.path.join(folder, "topics.parquet"))
    texts = [topic_text(rng, rng.choice(sorted(TOPICS))) for _ in range(extra)] + passages[:2]
    extra_path = os.path.join(os.path.dirname(folder), "extra.parquet")
    pq.write_table(pa.table({"text": texts + texts[:1]}), extra_path)
    return extra_path


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A random Qwen3 (initializer_range 0.2) with the tiny tokenizer, saved as our checkpoints are, with
    a query and a document prompt and max_seq_length 48."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from model import load_tokenizer, save_inference_model

    path = str(tmp_path_factory.mktemp("mine_model"))
    tokenizer = load_tokenizer(f"{tiny}/backbone")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)
    save_inference_model(Qwen3Model(config), tokenizer, path, max_seq_length=48,
                         prompts={"query": "query: ", "document": "passage: "})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine_data")
    extra = write_pairs(str(root / "pairs"))
    return {"input": str(root / "pairs"), "corpus": extra}


def mine_args(checkpoint, data, out, *extra, chunk_size=32):
    return ["--model", checkpoint, "--input_dir", data["input"], "--output_dir", str(out), "--corpus", data["corpus"],
            "--num_negatives", str(N), "--skip_top", str(SKIP), "--max_rank", str(RANK), "--positive_margin",
            str(MARGIN), "--batch_size", str(BATCH), "--chunk_size", str(chunk_size), "--device", "cpu", *extra]


def mine_main(*argv):
    return call_main(mn.main, list(argv))


@pytest.fixture(scope="module")
def reference(checkpoint, data, tmp_path_factory):
    """An uninterrupted one-process run (chunks of 32 texts): (output folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("mine_reference")
    proc = mine_main(*mine_args(checkpoint, data, out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def output_bytes(folder):
    with open(os.path.join(folder, "topics.parquet"), "rb") as f:
        return f.read()


def independent_windows(checkpoint, table, extra_texts):
    """Each row's (window after the margin in rank order, skipped top, excluded texts, threshold, scores,
    ambiguous), from the encoder's own embeddings of every text (float16, as stored) and Python sorting."""
    from model import load_encoder

    encoder = load_encoder(checkpoint, device="cpu")
    queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
    corpus = list(dict.fromkeys(passages + extra_texts))
    distinct = list(dict.fromkeys(queries))

    def embed(texts, prompt):  # as the CLI's single chunk: the same texts, order and batches
        return encoder.encode(texts, prompt_name=prompt, batch_size=BATCH).astype(np.float16).astype(float)

    scores = embed(distinct, "query") @ embed(corpus, "document").T
    out = []
    for q, p in zip(queries, passages):
        row = scores[distinct.index(q)]
        excluded = {pp for qq, pp in zip(queries, passages) if qq == q} | {q}
        ranked = sorted((j for j, t in enumerate(corpus) if t not in excluded), key=lambda j: (-row[j], j))
        pos = row[corpus.index(p)]
        threshold = pos - (1 - MARGIN) * abs(pos)
        near = np.diff(row[ranked[: RANK + 1]])
        ambiguous = bool((np.abs(near) < 1e-6).any() or (np.abs(row[ranked[:RANK]] - threshold) < 1e-6).any())
        window = [corpus[j] for j in ranked[SKIP:RANK] if row[j] <= threshold]
        out.append((window, [corpus[j] for j in ranked[:SKIP]], excluded, threshold,
                    {t: row[j] for j, t in enumerate(corpus)}, ambiguous))
    return out


def negatives_of(table):
    return [list(row) for row in zip(*(table.column(f"negative_{i}").to_pylist() for i in range(1, N + 1)))]


def test_cli_negatives_follow_the_rules(checkpoint, data, tmp_path):
    """One chunk per kind (as the independent check embeds): every row's negatives are re-derived from the
    encoder's scores; the input columns stay, in order; the record holds the settings."""
    proc = mine_main(*mine_args(checkpoint, data, tmp_path, chunk_size=1000))
    assert proc.returncode == 0, proc.stderr
    source = pq.read_table(os.path.join(data["input"], "topics.parquet"))
    table = pq.read_table(tmp_path / "topics.parquet")
    assert table.column_names == source.column_names + [f"negative_{i}" for i in range(1, N + 1)]
    assert table.select(source.column_names).equals(source)
    assert all(pa.types.is_string(table.schema.field(f"negative_{i}").type) for i in range(1, N + 1))
    extra = pq.read_table(data["corpus"]).column("text").to_pylist()
    expected = independent_windows(checkpoint, table, extra)
    assert sum(e[-1] for e in expected) <= 2  # near-ties the float order may break either way: left out below
    short, relaxed = [], 0
    for row, (negatives, (window, skipped, excluded, threshold, score, ambiguous)) in enumerate(
            zip(negatives_of(table), expected)):
        assert len(set(negatives)) == N and not set(negatives) & excluded
        if ambiguous:
            continue
        assert negatives[: len(window)] == window[:N], row
        if len(window) < N:
            short.append(row)
            relaxed += check_fills(negatives[len(window) :], window, skipped, excluded, threshold, score, tol=1e-6)
    assert short and len(short) < len(expected)
    assert (f"topics: {relaxed} fill(s) took a text" in proc.stdout) == (relaxed > 0)
    line = next(line for line in proc.stdout.splitlines() if "fewer than" in line)
    assert line.startswith(f"topics: {len(short)} of 70 row(s) had fewer than {N} negatives in the window (rows "
                           f"{', '.join(map(str, short[:5]))}")
    assert line.endswith("filled with random corpus texts (--on_short fill_random)")
    record = mn.read_record(str(tmp_path / "topics.parquet"))
    assert record["settings"] == {"num_negatives": N, "skip_top": SKIP, "max_rank": RANK, "positive_margin": MARGIN,
                                  "sampling": "top", "seed": 0, "on_short": "fill_random"}
    assert record["model"]["prompts"] == {"query": "query: ", "document": "passage: "}
    assert not os.path.exists(tmp_path / mn.WORK_DIR)


def test_drop_leaves_the_short_rows_out(checkpoint, data, reference, tmp_path):
    proc = mine_main(*mine_args(checkpoint, data, tmp_path, "--on_short", "drop"))
    assert proc.returncode == 0, proc.stderr
    count = int(re.search(r"topics: (\d+) of 70 row\(s\) had fewer", proc.stdout).group(1))
    assert "dropped (--on_short drop)" in proc.stdout
    dropped, filled = pq.read_table(tmp_path / "topics.parquet"), pq.read_table(reference[0] / "topics.parquet")
    assert dropped.num_rows == 70 - count
    kept = set(dropped.column("id").to_pylist())
    assert dropped.equals(filled.filter(pa.array([i in kept for i in filled.column("id").to_pylist()]))
                          .replace_schema_metadata(dropped.schema.metadata))


def test_same_bytes_for_any_batch_and_chunk_size_and_seeded_sampling(checkpoint, data, reference, tmp_path):
    proc = mine_main(*mine_args(checkpoint, data, tmp_path / "a", "--batch_size", "3", chunk_size=7))
    assert proc.returncode == 0, proc.stderr
    assert output_bytes(tmp_path / "a") == output_bytes(reference[0])
    runs = []
    for name, seed in (("r1", "5"), ("r2", "5"), ("r3", "6")):
        proc = mine_main(*mine_args(checkpoint, data, tmp_path / name, "--sampling", "random", "--seed", seed,
                                    "--max_rank", "30", "--positive_margin", "none"))
        assert proc.returncode == 0, proc.stderr
        runs.append(negatives_of(pq.read_table(tmp_path / name / "topics.parquet")))
    assert runs[0] == runs[1] != runs[2]


def test_rerun_skips_what_is_done_and_says_why_it_mines_again(checkpoint, data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    before = os.stat(out / "topics.parquet").st_mtime_ns
    proc = mine_main(*mine_args(checkpoint, data, out))
    assert proc.returncode == 0, proc.stderr
    assert "skip topics: already mined" in proc.stdout and "mined 0 file(s), skipped 1" in proc.stdout
    assert os.stat(out / "topics.parquet").st_mtime_ns == before
    proc = mine_main(*mine_args(checkpoint, data, out, "--num_negatives", "3"))
    assert "mine topics again: changed: --num_negatives 4 -> 3" in proc.stdout, proc.stdout
    assert pq.read_table(out / "topics.parquet").column_names[-1] == "negative_3"
    proc = mine_main(*mine_args(checkpoint, data, out, "--num_negatives", "3", "--overwrite"))
    assert "mine topics again: --overwrite" in proc.stdout


def test_a_bare_backbone_mines_without_prompts(tiny, data, tmp_path):
    """A backbone folder (no sentence-transformers files): no prompt, max_seq_length 1024, same rules."""
    proc = mine_main(*mine_args(f"{tiny}/backbone", data, tmp_path))
    assert proc.returncode == 0, proc.stderr
    record = mn.read_record(str(tmp_path / "topics.parquet"))
    assert record["model"]["prompts"] == {"query": None, "document": None}
    assert record["model"]["max_seq_length"] == 1024 and record["model"]["dtype"] == "float32"
    table = pq.read_table(tmp_path / "topics.parquet")
    for row, negatives in zip(table.to_pylist(), negatives_of(table)):
        assert row["passage"] not in negatives and row["query"] not in negatives and len(set(negatives)) == N


def test_killed_run_resumes_to_the_same_bytes(checkpoint, data, reference, tmp_path, monkeypatch):
    """Killed (SIGKILL) after 5 of its 10 work files (4 corpus chunks, 3 query chunks, 3 ranked ones): the
    same command then writes only the 5 missing ones and the reference's bytes, and removes the work folder."""
    args = [os.path.join(REPO_DIR, "mine_negatives.py"), *mine_args(checkpoint, data, tmp_path)]
    work = tmp_path / mn.WORK_DIR / "topics"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, mn.KILL_AFTER: "5"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert sorted(f for f in os.listdir(work) if f.endswith(".npy")) == [
        *(f"corpus_0000{i}.npy" for i in range(4)), "query_00000.npy"]
    assert not os.path.exists(tmp_path / "topics.parquet")
    written = []
    save = mn.Work.save
    monkeypatch.setattr(mn.Work, "save", lambda self, kind, i, array: (written.append(f"{kind}_{i}"),
                                                                       save(self, kind, i, array)))
    proc = mine_main(*mine_args(checkpoint, data, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert written == ["query_1", "query_2", "rank_0", "rank_1", "rank_2"]
    assert output_bytes(tmp_path) == output_bytes(reference[0])
    assert not os.path.exists(tmp_path / mn.WORK_DIR)


def test_two_processes_write_the_same_bytes(checkpoint, data, reference, tmp_path):
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "configs/accelerate_ddp.yaml",
           "--num_processes", "2", "--main_process_port", free_port(), "--mixed_precision", "no",
           "mine_negatives.py", *mine_args(checkpoint, data, tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_DIR, env=launch_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert output_bytes(tmp_path) == output_bytes(reference[0])
    assert proc.stdout.count("wrote ") == 1  # the main process writes


def test_output_tokenizes_and_trains(tiny, reference, tmp_path):
    tokenized = tmp_path / "tokenized"
    proc = call_main(tokenize_data_qwen.main, ["--model_path", f"{tiny}/backbone", "--input_dir", str(reference[0]),
                                               "--output_dir", str(tokenized), "--max_seq_length", "32",
                                               "--num_proc", "1"])
    assert proc.returncode == 0, proc.stderr
    assert {f"negative_{i}_input_ids" for i in range(1, N + 1)} <= set(
        pq.read_schema(tokenized / "topics.parquet").names)
    config = write_config(tmp_path / "config.json", model_path=f"{tiny}/backbone", train_data_path=str(tokenized),
                          experiment_id="mined", output_dir=str(tmp_path / "out"), tb_dir=str(tmp_path / "tb"),
                          cache_dir=str(tmp_path / "cache"), dataset_types={"topics": "retrieval"},
                          train_batch_size=8, max_seq_length=32, num_hard_neg=N, train_steps=1, train_epochs=1,
                          warmup_steps=0, checkpointing_steps=0, validation_steps=0, log_interval=1,
                          gradient_checkpointing=False)
    proc = run_cli("run.py", "--config", config, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final checkpoint:" in proc.stdout and "step_1" in proc.stdout
    # the README's last step: the trained checkpoint ranks the held-out rows of the mined data
    proc = call_main(evaluate.main, [str(tmp_path / "out" / "mined" / "step_1"), str(tokenized), "--config", config])
    assert proc.returncode == 0, proc.stderr
    assert "topics:" in proc.stdout and 0 <= demo.mean_mrr(proc.stdout) <= 1


# ---- bad input ---------------------------------------------------------------------------------------

def write_table(folder, columns, name="bad.parquet"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    pq.write_table(pa.table(columns), path)
    return path


TEXTS = [f"text number {i}" for i in range(8)]


@pytest.mark.parametrize("columns, fragments", [
    ({"query": TEXTS}, ["no column 'passage'"]),
    ({"query": list(range(8)), "passage": TEXTS}, ["column 'query' has type int64"]),
    ({"query": ["a", None, "c", " ", "e", "f", "g", "h"], "passage": TEXTS},
     ["null or empty texts in column 'query' 2 (rows 1, 3)"]),
    ({"query": TEXTS, "passage": TEXTS, "negative_1": TEXTS}, ["already has negative column(s) (negative_1)",
                                                                "drop them"]),
    ({"query": TEXTS[:3], "passage": TEXTS[3:6]}, ["3 distinct text(s), fewer than --num_negatives + 1 = 5"]),
    ({"query": ["q"] * 5 + ["r"] * 3, "passage": TEXTS}, ["5 row(s) (rows 0, 1, 2, 3, 4) have a query whose"]),
    ({"query": pa.array([], pa.string()), "passage": pa.array([], pa.string())}, ["0 rows"]),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, columns, fragments):
    write_table(tmp_path / "in", columns)
    proc = mine_main("--model", checkpoint, "--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                     "--num_negatives", "4", "--max_rank", "10")
    assert proc.returncode == 2
    assert_user_error(proc, *fragments)


def test_bad_setup_is_one_line(checkpoint, tmp_path):
    pairs = tmp_path / "in"
    write_table(pairs, {"query": TEXTS, "passage": TEXTS[::-1]})
    base = ["--input_dir", str(pairs), "--output_dir", str(tmp_path / "out")]
    cases = [
        (["--model", str(tmp_path / "nope"), *base], ["--model", "not found"]),
        (["--model", checkpoint, "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")],
         ["input folder", "not found"]),
        (["--model", checkpoint, *base, "--num_negatives", "4", "--skip_top", "7", "--max_rank", "10"],
         ["the window --skip_top 7 .. --max_rank 10 holds 3 candidates"]),
        (["--model", checkpoint, *base, "--corpus", str(tmp_path / "nope.parquet")], ["--corpus", "not found"]),
        (["--model", checkpoint, *base, "--corpus", write_table(tmp_path, {"body": TEXTS}, "c.parquet")],
         ["no column 'text'"]),
        (["--model", checkpoint, "--input_dir", str(pairs), "--output_dir", str(pairs)], ["would replace the inputs"]),
    ]
    os.makedirs(tmp_path / "empty")
    cases.append((["--model", checkpoint, "--input_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")],
                  ["no *.parquet files"]))
    for argv, fragments in cases:
        proc = mine_main(*argv)
        assert proc.returncode == 2, argv
        assert_user_error(proc, *fragments)


# ---- the benchmark at its tiniest ------------------------------------------------------------------

@pytest.mark.breadth
def test_bench_quick_runs_both_sides_alike(qwen3_tokenizer, tmp_path):
    """bench/bench_mine.py with 48 pairs and a 16-wide model (about 20 s: each run loads Qwen3's tokenizer):
    both sides mine the same texts (top sampling, no margin); with the margin all our rows come out and
    ST keeps those that found 8 (its window can reach one text deeper: at least ours' full rows), and
    with ours' --on_short drop ours keeps its full rows; the data holds topics and a held-out split; the
    report and JSON come out."""
    sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
    import bench_mine

    result = bench_mine.run(sizes={"short": (48, 48, 8, 1)}, hidden=16, layers=1, work_dir=str(tmp_path),
                            tokenizer_builder=lambda path: shutil.copytree(qwen3_tokenizer, path, dirs_exist_ok=True),
                            float32=False)
    out = result["regimes"]["short"]
    top, margin = out["variants"]["top"], out["variants"]["top-margin"]
    assert top["agreement"]["rows"] == 48 and top["agreement"]["overlap"] >= 0.9
    assert top["sides"]["ours"]["rows_out"] == top["sides"]["st"]["rows_out"] == 48
    assert margin["sides"]["ours"]["rows_out"] == 48
    assert 48 > margin["sides"]["st"]["rows_out"] >= 48 - margin["sides"]["ours"]["short_rows"]
    drop = out["variants"]["top-margin-drop"]["sides"]
    assert drop["ours"]["rows_out"] == 48 - margin["sides"]["ours"]["short_rows"] <= drop["st"]["rows_out"]
    assert all(v["sides"][side]["queries_per_s"] > 0 for v in (top, margin) for side in ("ours", "st"))
    assert "float32_store" not in top
    assert "top-margin ours" in bench_mine.report(result)
    json.dumps(result)
    paths = bench_mine.write_pairs(str(tmp_path / "data"), [f"w{i}" for i in range(4000)], 6, 5, 4)
    assert pq.read_schema(paths["train"]).names == ["query", "passage", "topic"]
    assert pq.read_table(paths["heldout"]).num_rows == 4 and pq.read_table(paths["extra"]).num_rows == 5


def test_bench_random_negatives_follow_the_rules():
    """bench/bench_negatives.py's baseline: per row n distinct passages of other rows, never a passage of
    the same query (a query with two positives here), the same for a seed."""
    sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
    import bench_negatives

    queries = ["q0", "q1", "q1", "q2", "q3", "q4", "q5", "q6"]
    pairs = pa.table({"query": queries, "passage": [f"p{i}" for i in range(len(queries))]})
    table = bench_negatives.random_negatives(pairs, 4, seed=3)
    rows = list(zip(*(table.column(f"negative_{i}").to_pylist() for i in range(1, 5))))
    for query, row in zip(queries, rows):
        own = {p for q, p in zip(queries, pairs.column("passage").to_pylist()) if q == query}
        assert len(set(row)) == 4 and not own & set(row) and set(row) <= set(pairs.column("passage").to_pylist())
    assert bench_negatives.random_negatives(pairs, 4, seed=3).equals(table)
    assert not bench_negatives.random_negatives(pairs, 4, seed=4).equals(table)
