"""Padding-free batches: the flat Arrow collate against a pure-Python reference, pad_flat / flatten,
the varlen attention, and the packed, grouped and padded Embedder layouts giving the same
embeddings, losses and gradients; the config keys that choose the layout."""
import os
import random

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_config

import config
import data
import model
from errors import UserError
from loss import f2llm_losses

TOKENS = pa.list_(pa.int32())


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- collate against an independent reference ------------------------------------------------------

def negative_number(column):
    return int(column[len("negative_"):-len("_input_ids")])


def reference_collate(rows, num_neg, max_seq_length, eos_id, picks):
    """The recipe's batch by hand: the queries, the positives, then each query's picked negatives
    (picks[r]: indices into its negatives in numeric column order); each sequence cut to
    max_seq_length with its last token set to eos; all concatenated."""
    negative_columns = sorted((c for c in rows[0] if c.startswith("negative_")), key=negative_number)
    sequences = [row["query_input_ids"] for row in rows] + [row["passage_input_ids"] for row in rows]
    for r, row in enumerate(rows):
        for i in range(num_neg):
            sequences.append(row[negative_columns[picks[r][i]]])
    fitted = []
    for s in sequences:
        s = list(s[:max_seq_length])
        s[-1] = eos_id
        fitted.append(s)
    flat = []
    for s in fitted:
        flat += s
    return flat, [len(s) for s in fitted]


def random_rows(rnd, bs, num_negatives, max_len):
    """Rows with random tokens and lengths: length 1, up to well past max_seq_length; the negative
    columns in a random order."""
    def sequence():
        n = rnd.choice([1, 1, 2, max_len, max_len + 1, rnd.randint(1, 3 * max_len + 2)])
        return [rnd.randint(0, 2 ** 31 - 1) if rnd.random() < 0.1 else rnd.randint(0, 200) for _ in range(n)]

    columns = ["query_input_ids", "passage_input_ids"] + [f"negative_{j}_input_ids"
                                                         for j in rnd.sample(range(1, num_negatives + 1),
                                                                             num_negatives)]
    return [{c: sequence() for c in columns} for _ in range(bs)]


def as_table(rnd, rows):
    """The rows as an Arrow table of list<int32> columns, sometimes in several chunks, sliced."""
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, TOKENS) for c in rows[0]]))
    if len(rows) > 2 and rnd.random() < 0.5:
        cut = rnd.randint(1, len(rows) - 1)
        table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    return table


def test_collate_equals_the_reference_on_random_tables():
    rnd = random.Random(0)
    seen = {"cut": 0, "length_1": 0, "sampled": 0}
    for case in range(150):
        bs, available, max_len = rnd.randint(1, 6), rnd.randint(1, 12), rnd.randint(1, 9)
        num_neg = rnd.randint(0, available)
        eos = rnd.randint(0, 500)
        rows = random_rows(rnd, bs, available, max_len)
        # A pad row before the batch, sliced off: offsets into the Arrow buffers must be honoured.
        table = as_table(rnd, random_rows(rnd, 1, available, max_len) + rows).slice(1)
        seed = None if case % 3 == 0 else case
        rng_collate = None if seed is None else np.random.default_rng(seed)
        rng_reference = None if seed is None else np.random.default_rng(seed)
        for _ in range(2):  # the same generator again: the next draw follows on both sides
            batch = data.collate(table, num_neg=num_neg, max_seq_length=max_len, eos_id=eos, rng=rng_collate)
            picks = data.pick_negatives(bs, available, num_neg, rng_reference)
            flat, lengths = reference_collate(rows, num_neg, max_len, eos, picks.tolist())
            assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].dim() == 1
            assert batch["input_ids"].tolist() == flat, (case, bs, available, num_neg, max_len)
            assert batch["lengths"].tolist() == lengths, case
            assert batch["num_queries"] == bs and batch["num_neg"] == num_neg
            seen["cut"] += sum(len(s) > max_len for row in rows for s in row.values())
            seen["length_1"] += lengths.count(1)
            seen["sampled"] += seed is not None and num_neg < available and any(
                sorted(p) != list(range(num_neg)) for p in picks.tolist())
    assert all(v > 20 for v in seen.values()), seen


def test_collate_without_rng_equals_the_reference_with_the_first_negatives():
    rnd = random.Random(1)
    for _ in range(30):
        bs, available, max_len = rnd.randint(1, 5), rnd.randint(1, 11), rnd.randint(2, 8)
        num_neg = rnd.randint(0, available)
        rows = random_rows(rnd, bs, available, max_len)
        batch = data.collate(as_table(rnd, rows), num_neg=num_neg, max_seq_length=max_len, eos_id=7)
        flat, lengths = reference_collate(rows, num_neg, max_len, 7, [list(range(num_neg))] * bs)
        assert batch["input_ids"].tolist() == flat and batch["lengths"].tolist() == lengths


# ---- pad_flat and flatten ---------------------------------------------------------------------------

def test_pad_flat_right_pads_each_sequence():
    rnd = random.Random(2)
    for _ in range(50):
        sequences = [[rnd.randint(1, 99) for _ in range(rnd.randint(1, 12))] for _ in range(rnd.randint(1, 9))]
        pad = rnd.choice([0, -1, 151643])
        flat = torch.tensor([t for s in sequences for t in s])
        lengths = torch.tensor([len(s) for s in sequences])
        padded = model.pad_flat(flat, lengths, pad)
        longest = max(len(s) for s in sequences)
        assert padded.shape == (len(sequences), longest) and padded.dtype == flat.dtype
        assert padded.tolist() == [s + [pad] * (longest - len(s)) for s in sequences]
    ids = model.pad_flat(torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([3]), 0)
    assert ids.dtype == torch.int32 and ids.tolist() == [[5, 6, 7]]


def test_flatten_round_trip():
    rnd = random.Random(3)
    for _ in range(30):
        sequences = [[rnd.randint(0, 300) for _ in range(rnd.randint(1, 10))] for _ in range(rnd.randint(1, 8))]
        flat, lengths = model.flatten(sequences)
        assert flat.dtype == torch.long and flat.dim() == 1
        assert lengths.tolist() == [len(s) for s in sequences]
        assert [t.tolist() for t in torch.split(flat, lengths.tolist())] == sequences
        assert model.pad_flat(flat, lengths, -5).tolist() == [s + [-5] * (int(lengths.max()) - len(s))
                                                               for s in sequences]


# ---- the varlen attention ---------------------------------------------------------------------------

def test_sdpa_varlen_attention_is_causal_attention_within_each_sequence():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    lengths = [3, 1, 6, 2]
    T = sum(lengths)
    q = torch.randn(1, heads, T, dim, generator=g)
    k = torch.randn(1, kv_heads, T, dim, generator=g)
    v = torch.randn(1, kv_heads, T, dim, generator=g)
    cu = torch.tensor([0, 3, 4, 10, 12], dtype=torch.int32)
    scale = 0.3
    out, weights = model.sdpa_varlen_attention(None, q, k, v, None, scaling=scale, cu_seq_lens_q=cu,
                                               cu_seq_lens_k=cu)
    assert weights is None and out.shape == (1, T, heads, dim)
    expected = torch.zeros(T, heads, dim)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for h in range(heads):
            kv = h // (heads // kv_heads)  # grouped-query attention: heads share a key/value head
            for i in range(s, e):
                scores = torch.tensor([float(q[0, h, i] @ k[0, kv, j]) * scale for j in range(s, i + 1)])
                expected[i, h] = torch.softmax(scores, 0) @ v[0, kv, s : i + 1]
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    # Without boundaries: one causal sequence over the whole row.
    whole, _ = model.sdpa_varlen_attention(None, q, k, v, None, scaling=scale)
    assert torch.allclose(whole[0, :3], out[0, :3], atol=1e-6) and not torch.allclose(whole, out, atol=1e-3)


def test_pick_attn_implementation_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("the CPU choices")
    assert model.pick_attn_implementation("auto", packed=True) == "sdpa_varlen"
    assert model.pick_attn_implementation("auto", packed=False) == "sdpa"
    assert model.pick_attn_implementation() == "sdpa"
    for requested in ("eager", "sdpa", "sdpa_varlen", "flash_attention_2"):
        assert model.pick_attn_implementation(requested, packed=True) == requested
        assert model.pick_attn_implementation(requested, packed=False) == requested


def test_pick_attn_implementation_on_a_gpu(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else find_spec(name, *a))
    assert model.pick_attn_implementation("auto", packed=True) == "flex_attention"
    assert model.pick_attn_implementation("auto", packed=False) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else find_spec(name, *a))
    assert model.pick_attn_implementation("auto", packed=True) == "flash_attention_2"
    assert model.pick_attn_implementation("auto", packed=False) == "flash_attention_2"
    assert model.pick_attn_implementation("eager", packed=True) == "eager"


# ---- Embedder layouts on the tiny backbone -----------------------------------------------------------

def random_batch(seed, num_queries=4, num_neg=2, vocab=390):
    """A batch in the collate format with random tokens and lengths 1 .. 24."""
    rnd = random.Random(seed)
    n = num_queries * (2 + num_neg)
    lengths = [1, 24] + [rnd.choice([1, 2, rnd.randint(1, 24)]) for _ in range(n - 2)]
    rnd.shuffle(lengths)
    sequences = [[rnd.randint(3, vocab - 1) for _ in range(m)] for m in lengths]
    flat, lengths = model.flatten(sequences)
    return {"input_ids": flat, "lengths": lengths, "num_queries": num_queries, "num_neg": num_neg}


LAYOUTS = [("packed", "auto"), ("packed", "sdpa"), ("packed", "eager"), ("grouped", "auto"), ("padded", "auto"),
           ("padded", "eager")]


def embedder(tiny, layout, attn="auto", checkpointing=False):
    backbone = model.load_backbone(f"{tiny}/backbone", attn, "float32", checkpointing, packed=layout == "packed")
    return model.Embedder(backbone, layout, pad_token_id=0)


def embed_losses_grads(emb, batch, task="retrieval"):
    emb.train()
    emb.zero_grad()
    out = emb(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"])
    losses = f2llm_losses(out, batch["num_queries"], batch["num_neg"], task)
    sum(losses.values()).backward()
    return out.detach(), {k: v.item() for k, v in losses.items()}, {n: p.grad.clone()
                                                                    for n, p in emb.named_parameters()}


def max_rel_diff(got, expected):
    return max(((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in expected.items())


@pytest.fixture(scope="module")
def layout_reference(tiny):
    """Each sequence alone through the backbone (no padding, no packing), and the padded layout's
    losses and gradients on two random batches."""
    out = {}
    for seed in (0, 1):
        batch = random_batch(seed)
        emb = embedder(tiny, "padded", "sdpa")
        with torch.no_grad():
            alone = torch.cat([emb(s, torch.tensor([len(s)]))
                               for s in torch.split(batch["input_ids"], batch["lengths"].tolist())])
        out[seed] = (batch, alone, embed_losses_grads(emb, batch))
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout,attn", LAYOUTS)
def test_layouts_give_the_same_embeddings_losses_and_gradients(tiny, layout_reference, layout, attn, checkpointing):
    emb = embedder(tiny, layout, attn, checkpointing)
    expected_attn = {("packed", "auto"): "sdpa_varlen", ("grouped", "auto"): "sdpa", ("padded", "auto"): "sdpa"}
    assert emb.backbone.config._attn_implementation == expected_attn.get((layout, attn), attn)
    for batch, alone, (ref_emb, ref_losses, ref_grads) in layout_reference.values():
        assert 1 in batch["lengths"].tolist() and len(set(batch["lengths"].tolist())) > 3
        got_emb, got_losses, got_grads = embed_losses_grads(emb, batch)
        assert got_emb.shape == alone.shape == (len(batch["lengths"]), 32)
        torch.testing.assert_close(got_emb, alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_emb, ref_emb, rtol=0, atol=1e-5)
        assert set(got_losses) == {"hard", "inbatch"}
        for kind, value in ref_losses.items():
            assert got_losses[kind] == pytest.approx(value, rel=1e-5, abs=1e-6), kind
        assert set(got_grads) == set(ref_grads)
        assert max_rel_diff(got_grads, ref_grads) < 1e-4
        assert all(g.abs().sum() > 0 for n, g in got_grads.items() if ".layers." in n)
    # Different sequences, different embeddings: equality above is not trivial.
    alone = layout_reference[0][1]
    assert torch.pdist(alone).min() > 1e-2


class BackboneCalls:
    """Records the keyword arguments of every backbone call."""

    def __init__(self, backbone):
        self.calls = []
        forward = backbone.forward

        def recorded(*args, **kwargs):
            self.calls.append(kwargs)
            return forward(*args, **kwargs)

        backbone.forward = recorded


@torch.no_grad()
def test_packed_runs_one_row_with_restarting_positions_and_boundaries(tiny):
    batch = random_batch(2)
    emb = embedder(tiny, "packed")
    calls = BackboneCalls(emb.backbone).calls
    emb(batch["input_ids"], batch["lengths"], num_queries=4)
    (call,) = calls
    lengths = batch["lengths"].tolist()
    assert call["input_ids"].tolist() == [batch["input_ids"].tolist()], "one row, no padding"
    assert call["position_ids"].tolist() == [[i for n in lengths for i in range(n)]]
    cu = [0] + np.cumsum(lengths).tolist()
    assert call["cu_seq_lens_q"].tolist() == cu and call["cu_seq_lens_k"].tolist() == cu
    assert call["max_length_q"] == call["max_length_k"] == max(lengths)
    assert call.get("attention_mask") is None


@torch.no_grad()
def test_grouped_pads_queries_and_documents_separately(tiny):
    batch = random_batch(3)
    lengths = batch["lengths"].tolist()
    emb = embedder(tiny, "grouped")
    calls = BackboneCalls(emb.backbone).calls
    out = emb(batch["input_ids"], batch["lengths"], num_queries=4)
    assert [tuple(c["input_ids"].shape) for c in calls] == [(4, max(lengths[:4])), (len(lengths) - 4,
                                                                                   max(lengths[4:]))]
    sequences = [s.tolist() for s in torch.split(batch["input_ids"], lengths)]
    assert calls[0]["input_ids"].tolist() == [s + [0] * (max(lengths[:4]) - len(s)) for s in sequences[:4]]
    assert calls[1]["attention_mask"].sum(1).tolist() == lengths[4:]
    # Without num_queries (or all queries): one padded group, the same embeddings.
    calls.clear()
    torch.testing.assert_close(emb(batch["input_ids"], batch["lengths"]), out, rtol=0, atol=1e-5)
    assert [tuple(c["input_ids"].shape) for c in calls] == [(len(lengths), max(lengths))]
    padded = embedder(tiny, "padded")
    calls = BackboneCalls(padded.backbone).calls
    torch.testing.assert_close(padded(batch["input_ids"], batch["lengths"], num_queries=4), out, rtol=0, atol=1e-5)
    assert [tuple(c["input_ids"].shape) for c in calls] == [(len(lengths), max(lengths))], "padded: one group"


@pytest.fixture(scope="module")
def post_tok(tiny):
    return model.load_tokenizer(f"{tiny}/backbone")


@torch.no_grad()
def test_loader_batches_embed_the_same_packed_and_padded(tiny, tokenized, post_tok):
    """Real tokenized batches from make_loader, cut to a short max_seq_length so that some are cut."""
    path = os.path.join(tokenized, "msmarco.parquet")
    split = datasets.Dataset(pq.read_table(path, columns=data.token_columns(path, 2)))
    cfg = config.Config(model_path=f"{tiny}/backbone", train_data_path=tokenized, train_batch_size=3,
                        num_hard_neg=2, max_seq_length=20)
    loader = data.make_loader(split, "retrieval", cfg, post_tok.eos_token_id, train=True)
    packed = embedder(tiny, "packed").eval()
    padded = model.Embedder(model.load_backbone(f"{tiny}/backbone", dtype="float32").eval(), "padded",
                            post_tok.pad_token_id)
    published = model.Embedder(padded.backbone, "padded", post_tok.pad_token_id, post_tok.pad_token_id)
    lengths_seen = set()
    for batch, _ in zip(loader, range(3)):
        assert len(batch["lengths"]) == 3 * 4
        args = (batch["input_ids"], batch["lengths"])
        a = packed(*args, num_queries=batch["num_queries"])
        b = padded(*args, num_queries=batch["num_queries"])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(published(*args), b, rtol=0, atol=1e-5)
        lengths_seen |= set(batch["lengths"].tolist())
        losses_a = f2llm_losses(a, 3, 2, "retrieval")
        losses_b = f2llm_losses(b, 3, 2, "retrieval")
        for kind in losses_a:
            assert losses_a[kind].item() == pytest.approx(losses_b[kind].item(), rel=1e-5)
    assert 20 in lengths_seen and len(lengths_seen) > 3, lengths_seen


# ---- config -----------------------------------------------------------------------------------------

def load(tmp_path, **values):
    return config.load_config(write_config(tmp_path / "c.json", model_path="m", train_data_path="d", **values))


def test_batch_layout_default_and_values(tmp_path):
    assert load(tmp_path).batch_layout == "packed"
    for layout in ("packed", "grouped", "padded"):
        assert load(tmp_path, batch_layout=layout).batch_layout == layout


def test_batch_layout_unknown(tmp_path):
    with pytest.raises(UserError) as err:
        load(tmp_path, batch_layout="foo")
    assert "'batch_layout'" in str(err.value) and "'packed', 'grouped' or 'padded'" in str(err.value)
    with pytest.raises(UserError, match="batch_layout"):
        load(tmp_path, batch_layout=1)


def test_published_mask_needs_a_padded_layout(tmp_path):
    for values in ({}, {"batch_layout": "packed"}):
        with pytest.raises(UserError) as err:
            load(tmp_path, attention_mask_from="pad_token_id", **values)
        message = str(err.value)
        assert "attention_mask_from" in message and '"batch_layout": "padded"' in message, message
    for layout in ("padded", "grouped"):
        cfg = load(tmp_path, attention_mask_from="pad_token_id", batch_layout=layout)
        assert (cfg.attention_mask_from, cfg.batch_layout) == ("pad_token_id", layout)


def test_sdpa_varlen_needs_the_packed_layout(tmp_path):
    from config import load_config
    from errors import UserError

    base = dict(model_path="m", train_data_path="t", attn_implementation="sdpa_varlen")
    assert load_config(write_config(tmp_path / "ok.json", **base)).batch_layout == "packed"
    with pytest.raises(UserError, match="batch_layout"):
        load_config(write_config(tmp_path / "bad.json", **base, batch_layout="padded"))
