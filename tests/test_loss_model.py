"""loss.py against hand computations, and model.py: pooling, attention masks, Embedder, encode."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_two_gloo_workers

import data
import loss
import model


pytestmark = pytest.mark.usefixtures("one_thread")


def checkpointing_on(backbone):
    """transformers 5 renamed is_gradient_checkpointing to is_activation_checkpointing."""
    if hasattr(type(backbone), "is_activation_checkpointing"):
        return backbone.is_activation_checkpointing
    return backbone.is_gradient_checkpointing


# ---- independent reference computations ----------------------------------------------------------


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _nll_first(logits, target):
    """-log softmax(logits)[target], computed stably by hand."""
    m = max(logits)
    lse = m + math.log(sum(math.exp(v - m) for v in logits))
    return lse - logits[target]


def ref_hard(q, p, negs, t=0.05):
    q, p = q.double().tolist(), p.double().tolist()
    negs = negs.double().tolist() if negs is not None else [[] for _ in q]
    total = 0.0
    for i in range(len(q)):
        logits = [_cos(q[i], p[i]) / t] + [_cos(q[i], n) / t for n in negs[i]]
        total += _nll_first(logits, 0)
    return total / len(q)


def ref_inbatch(q, p, t=0.05, offset=0):
    """Queries q against all positives p; query i's target is p[offset + i]."""
    q, p = q.double().tolist(), p.double().tolist()
    total = 0.0
    for i in range(len(q)):
        logits = [_cos(q[i], pj) / t for pj in p]
        total += _nll_first(logits, offset + i)
    return total / len(q)


def torch_ref_hard(q, p, negs, t):
    """Differentiable reference, written with explicit per-query loops."""
    losses = []
    for i in range(len(q)):
        cands = [p[i]] + ([negs[i, j] for j in range(negs.shape[1])] if negs is not None else [])
        sims = torch.stack([F.cosine_similarity(q[i], c, dim=0) for c in cands]) / t
        losses.append(torch.logsumexp(sims, 0) - sims[0])
    return torch.stack(losses).mean()


def torch_ref_inbatch(q, p, t, offset=0):
    losses = []
    for i in range(len(q)):
        sims = torch.stack([F.cosine_similarity(q[i], p[j], dim=0) for j in range(len(p))]) / t
        losses.append(torch.logsumexp(sims, 0) - sims[offset + i])
    return torch.stack(losses).mean()


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).requires_grad_()


# ---- losses --------------------------------------------------------------------------------------

def test_plain_process_has_no_distributed_init():
    assert not (dist.is_available() and dist.is_initialized())
    p = torch.randn(3, 4)
    gathered, offset = loss.gather_rows(p)
    assert gathered is p and offset == 0


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("bs,k,d", [(1, 1, 3), (4, 3, 8), (6, 7, 16)])
def test_hard_loss_matches_hand_computation(temperature, bs, k, d):
    q, p, n = rand(bs, d, seed=1), rand(bs, d, seed=2), rand(bs, k, d, seed=3)
    got = loss.hard_loss(q, p, n, temperature) if temperature != 0.05 else loss.hard_loss(q, p, n)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_hard(q, p, n, temperature), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.05, 0.2, 2.0])
@pytest.mark.parametrize("bs,d", [(1, 4), (5, 8), (12, 16)])
def test_inbatch_loss_matches_hand_computation(temperature, bs, d):
    q, p = rand(bs, d, seed=4), rand(bs, d, seed=5)
    got = loss.inbatch_loss(q, p, temperature) if temperature != 0.05 else loss.inbatch_loss(q, p)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_inbatch(q, p, temperature), rel=1e-4, abs=1e-4)


def test_losses_depend_on_the_temperature_and_are_scale_invariant():
    q, p, n = rand(4, 8, seed=6), rand(4, 8, seed=7), rand(4, 3, 8, seed=8)
    assert loss.hard_loss(q, p, n, 0.05).item() != pytest.approx(loss.hard_loss(q, p, n, 0.5).item(), rel=1e-3)
    # Cosine similarity: scaling the embeddings does not change the loss.
    with torch.no_grad():
        assert loss.hard_loss(q * 7, p * 0.1, n * 3).item() == pytest.approx(loss.hard_loss(q, p, n).item(), rel=1e-5)
        assert loss.inbatch_loss(q * 7, p * 0.1).item() == pytest.approx(loss.inbatch_loss(q, p).item(), rel=1e-5)


def test_hard_loss_prefers_the_positive():
    q = torch.eye(4)
    good = loss.hard_loss(q, q.clone(), -q.unsqueeze(1).repeat(1, 2, 1))
    bad = loss.hard_loss(q, -q, q.unsqueeze(1).repeat(1, 2, 1))
    assert good.item() < 1e-6 and bad.item() > 10


def test_hard_loss_without_negatives_is_zero():
    q, p = rand(5, 8, seed=9), rand(5, 8, seed=10)
    out = loss.hard_loss(q, p, None)
    assert out.item() == pytest.approx(0.0, abs=1e-7)
    assert ref_hard(q, p, None) == pytest.approx(0.0, abs=1e-12)


def test_gradients_flow_to_all_inputs_and_match_reference():
    t = 0.1
    q, p, n = rand(4, 8, seed=11), rand(4, 8, seed=12), rand(4, 3, 8, seed=13)
    grads = torch.autograd.grad(loss.hard_loss(q, p, n, t), (q, p, n))
    ref = torch.autograd.grad(torch_ref_hard(q, p, n, t), (q, p, n))
    for g, r in zip(grads, ref):
        assert torch.isfinite(g).all() and (g.abs().sum(-1) > 0).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert torch_ref_hard(q, p, n, t).item() == pytest.approx(ref_hard(q, p, n, t), rel=1e-5)

    grads = torch.autograd.grad(loss.inbatch_loss(q, p, t), (q, p))
    ref = torch.autograd.grad(torch_ref_inbatch(q, p, t), (q, p))
    for g, r in zip(grads, ref):
        assert torch.isfinite(g).all() and (g.abs().sum(-1) > 0).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---- split_embeddings and f2llm_losses -----------------------------------------------------------

def _rows(bs, num_negatives):
    rows = []
    for r in range(bs):
        row = {"query_input_ids": [1000 + r, 2], "passage_input_ids": [2000 + r, 5, 2]}
        for j in range(1, num_negatives + 1):
            row[f"negative_{j}_input_ids"] = [3000 + 50 * r + j] + [7] * (j % 3) + [2]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.list_(pa.int32())) for c in rows[0]]))


@pytest.mark.parametrize("seed", [None, 3])
def test_split_embeddings_undoes_collate_order(seed):
    bs, k = 4, 3
    rng = None if seed is None else np.random.default_rng(seed)
    batch = data.collate(_rows(bs, 6), num_neg=k, max_seq_length=16, eos_id=2, rng=rng)
    # A fake "embedding" that identifies each sequence: [first token id, length].
    starts = batch["lengths"].cumsum(0) - batch["lengths"]
    emb = torch.stack([batch["input_ids"][starts].float(), batch["lengths"].float()], dim=1)
    query, passage, negatives = loss.split_embeddings(emb, batch["num_queries"], batch["num_neg"])
    assert query[:, 0].tolist() == [1000 + r for r in range(bs)]
    assert passage[:, 0].tolist() == [2000 + r for r in range(bs)]
    assert negatives.shape == (bs, k, 2)
    for r in range(bs):
        tags = negatives[r, :, 0].tolist()
        assert len(set(tags)) == k and all(3000 + 50 * r < t <= 3000 + 50 * r + 6 for t in tags)
        if seed is None:
            assert tags == [3000 + 50 * r + j for j in range(1, k + 1)]
        for j, t in enumerate(tags):  # lengths travel with their sequence
            assert negatives[r, j, 1].item() == 2 + (int(t) - 3000 - 50 * r) % 3
    q, p, n = loss.split_embeddings(emb[: 2 * bs], bs, 0)
    assert n is None and torch.equal(q, emb[:bs]) and torch.equal(p, emb[bs : 2 * bs])


def test_f2llm_losses_by_task_type():
    bs, k, d = 4, 3, 8
    emb = rand(bs * (2 + k), d, seed=20)
    q, p = emb[:bs], emb[bs : 2 * bs]
    negs = torch.stack([emb[2 * bs + r * k : 2 * bs + (r + 1) * k] for r in range(bs)])
    for task in ("classification", "clustering"):
        out = loss.f2llm_losses(emb, bs, k, task)
        assert set(out) == {"hard"}
        assert out["hard"].item() == pytest.approx(ref_hard(q, p, negs), rel=1e-4)
    out = loss.f2llm_losses(emb, bs, k, "retrieval")
    assert set(out) == {"hard", "inbatch"}
    assert out["hard"].item() == pytest.approx(ref_hard(q, p, negs), rel=1e-4)
    assert out["inbatch"].item() == pytest.approx(ref_inbatch(q, p), rel=1e-4)
    out = loss.f2llm_losses(emb, bs, k, "retrieval", temperature=0.3)
    assert out["hard"].item() == pytest.approx(ref_hard(q, p, negs, 0.3), rel=1e-4)
    assert out["inbatch"].item() == pytest.approx(ref_inbatch(q, p, 0.3), rel=1e-4)
    (g,) = torch.autograd.grad(sum(out.values()), emb)
    assert (g.abs().sum(-1) > 0).all(), "every query, positive and negative gets gradient"
    # Classification: one negative per query.
    emb1 = rand(bs * 3, d, seed=21)
    out = loss.f2llm_losses(emb1, bs, 1, "classification")
    assert out["hard"].item() == pytest.approx(ref_hard(emb1[:bs], emb1[bs:2 * bs], emb1[2 * bs:, None]), rel=1e-4)


# ---- two processes (gloo): in-batch loss over the global batch ----------------------------------

WORKER = r"""
import os, sys
sys.path.insert(0, os.environ["REPO_DIR"])
import torch, torch.distributed as dist
import loss
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=rank, world_size=2)
g = torch.Generator().manual_seed(0)
sizes = [3, 5]
Q, P = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
start = sum(sizes[:rank])
out = {}
for gradient in ("all", "own", "none"):
    q = Q[start : start + sizes[rank]].clone().requires_grad_()
    p = P[start : start + sizes[rank]].clone().requires_grad_()
    value = loss.inbatch_loss(q, p, 0.1, gradient=gradient)
    value.backward()
    out[gradient] = (value.item(), q.grad.clone(), None if p.grad is None else p.grad.clone())
torch.save(out, os.path.join(os.environ["OUT"], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_inbatch_loss_across_two_processes(tmp_path):
    run_two_gloo_workers(tmp_path, WORKER)

    g = torch.Generator().manual_seed(0)
    Q, P = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    sizes, starts = [3, 5], [0, 3]
    Q.requires_grad_()
    P.requires_grad_()
    per_rank = [torch_ref_inbatch(Q[s : s + n], P, 0.1, offset=s) for s, n in zip(starts, sizes)]
    grad_q_sum, grad_p_sum = torch.autograd.grad(sum(per_rank), (Q, P), retain_graph=True)
    for r, (s, n) in enumerate(zip(starts, sizes)):
        got = torch.load(tmp_path / f"rank{r}.pt")
        expected = ref_inbatch(Q[s : s + n], P, 0.1, offset=s)
        grad_q_own, grad_p_own = torch.autograd.grad(per_rank[r], (Q, P), retain_graph=True)
        for gradient in ("all", "own", "none"):
            value, gq, gp = got[gradient]
            assert value == pytest.approx(expected, rel=1e-4), "each query against all processes' positives"
            torch.testing.assert_close(gq, grad_q_own[s : s + n], rtol=1e-4, atol=1e-5)
        # "all": this process's positives get the summed gradient of every process's loss.
        torch.testing.assert_close(got["all"][2], grad_p_sum[s : s + n], rtol=1e-4, atol=1e-5)
        # "own": only this process's own loss reaches its positives.
        torch.testing.assert_close(got["own"][2], grad_p_own[s : s + n], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got["all"][2], got["own"][2], atol=1e-4)
        # "none" (published): no positive gets any gradient from the in-batch loss.
        assert got["none"][2] is None


# ---- model: pooling and attention masks ----------------------------------------------------------

TEXTS = ["who is kalomar", "tell me about velzor, the pilot from north harbor who enjoys chess and poetry",
         "a", "my card was blocked at the atm why", "the film was really dull and the acting weak",
         "ren is a tailor from river town who enjoys running."]


def test_last_token_pool_picks_the_last_real_token():
    hidden = torch.randn(4, 7, 5)
    lengths = torch.tensor([7, 1, 3, 5])
    pooled = model.pool(hidden, lengths)
    assert pooled.shape == (4, 5)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(pooled[i], hidden[i, n - 1])
    # Gradient reaches only the pooled positions.
    hidden.requires_grad_()
    (g,) = torch.autograd.grad(model.pool(hidden, lengths).sum(), hidden)
    assert g.abs().sum(-1).nonzero().tolist() == [[i, n - 1] for i, n in enumerate(lengths.tolist())]


@pytest.fixture(scope="module")
def base_tok(tiny_base):
    return model.load_tokenizer(f"{tiny_base}/backbone")


@pytest.fixture(scope="module")
def post_tok(tiny):
    return model.load_tokenizer(f"{tiny}/backbone")


def _flat(tok, texts=TEXTS):
    """The texts tokenized as in training: (flat input_ids, lengths), the Embedder's input."""
    return model.flatten(data.tokenize(tok, texts, 64))


def _batch(tok, texts=TEXTS):
    """The same, right-padded with the tokenizer's pad id: (input_ids [n, L], lengths)."""
    flat, lengths = _flat(tok, texts)
    return model.pad_flat(flat, lengths, tok.pad_token_id), lengths


def test_tokenizer_fixtures(base_tok, post_tok):
    assert base_tok.eos_token_id == base_tok.pad_token_id
    assert post_tok.eos_token_id != post_tok.pad_token_id


def test_attention_mask_rules_with_pad_equal_to_eos(base_tok):
    ids, lengths = _batch(base_tok)
    assert len(set(lengths.tolist())) > 1
    by_lengths = model.attention_mask(ids, lengths)
    published = model.attention_mask(ids, lengths, base_tok.pad_token_id)
    for i, n in enumerate(lengths.tolist()):
        assert ids[i, n - 1] == base_tok.eos_token_id
        assert by_lengths[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert published[i, n - 1] == 0, "the published rule masks the eos, the token that is pooled"
        assert published[i, : n - 1].all() and not published[i, n:].any()


def test_attention_mask_rules_agree_when_pad_differs_from_eos(post_tok):
    ids, lengths = _batch(post_tok)
    by_lengths = model.attention_mask(ids, lengths)
    published = model.attention_mask(ids, lengths, post_tok.pad_token_id)
    assert torch.equal(by_lengths, published)
    for i, n in enumerate(lengths.tolist()):
        assert by_lengths[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)


# ---- model: Embedder on the tiny backbone --------------------------------------------------------

def _load(root, attn="sdpa", **kw):
    return model.load_backbone(f"{root}/backbone", attn_implementation=attn, dtype="float32", **kw)


@pytest.fixture(scope="module")
def post_backbone(tiny):
    return _load(tiny).eval()


@pytest.fixture(scope="module")
def base_backbone(tiny_base):
    return _load(tiny_base).eval()


def _alone(embedder, tok, texts=TEXTS):
    out = []
    for seq in data.tokenize(tok, texts, 64):
        out.append(embedder(torch.tensor(seq), torch.tensor([len(seq)]))[0])
    return torch.stack(out)


def test_load_backbone(post_backbone):
    assert post_backbone.config.use_cache is False
    assert post_backbone.dtype == torch.float32
    assert not hasattr(post_backbone, "lm_head")
    assert not checkpointing_on(post_backbone)


def test_embedder_rejects_an_unknown_layout(post_backbone):
    with pytest.raises(ValueError, match="layout"):
        model.Embedder(post_backbone, layout="ragged")
    assert model.Embedder(post_backbone).layout == "padded"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["post", "base"])
@torch.no_grad()
def test_padded_embedding_equals_unpadded_with_lengths_mask(which, attn, tiny, tiny_base, post_tok, base_tok):
    root, tok = (tiny, post_tok) if which == "post" else (tiny_base, base_tok)
    embedder = model.Embedder(_load(root, attn).eval(), "padded", tok.pad_token_id)
    flat, lengths = _flat(tok)
    assert len(set(lengths.tolist())) > 1, "the batch needs padding"
    padded = embedder(flat, lengths)
    alone = _alone(embedder, tok)
    assert padded.shape == (len(TEXTS), 32)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    # The embeddings are those of the sequences: different texts give different embeddings.
    assert torch.cdist(alone, alone).triu(1)[torch.ones(6, 6).triu(1).bool()].min() > 1e-3


def _published(backbone, tok):
    """The published Embedder: all sequences padded to the longest, mask input_ids != pad id."""
    return model.Embedder(backbone, "padded", tok.pad_token_id, mask_pad_token_id=tok.pad_token_id)


@torch.no_grad()
def test_published_mask_with_pad_equal_to_eos_changes_the_embedding(base_backbone, base_tok):
    correct = _alone(model.Embedder(base_backbone, "padded", base_tok.pad_token_id), base_tok)
    flat, lengths = _flat(base_tok)
    published = _published(base_backbone, base_tok)(flat, lengths)
    diff = (published - correct).abs().amax(-1)
    assert (diff > 1e-3).all(), diff
    # The lengths rule gives the correct embeddings for the same padded batch.
    torch.testing.assert_close(model.Embedder(base_backbone, "padded", base_tok.pad_token_id)(flat, lengths),
                               correct, rtol=0, atol=1e-5)


@torch.no_grad()
def test_published_mask_with_pad_distinct_from_eos_changes_nothing(post_backbone, post_tok):
    flat, lengths = _flat(post_tok)
    by_lengths = model.Embedder(post_backbone, "padded", post_tok.pad_token_id)(flat, lengths)
    published = _published(post_backbone, post_tok)(flat, lengths)
    torch.testing.assert_close(published, by_lengths, rtol=0, atol=1e-6)
    torch.testing.assert_close(published, _alone(model.Embedder(post_backbone), post_tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("which", ["post", "base"])
def test_encode_unit_norm_input_order_and_batch_size_independent(which, layout, post_backbone, base_backbone,
                                                                 post_tok, base_tok):
    backbone, tok = (post_backbone, post_tok) if which == "post" else (base_backbone, base_tok)
    embedder = model.Embedder(backbone, layout, tok.pad_token_id)
    lens = [len(t) for t in TEXTS]
    assert lens != sorted(lens), "input order must differ from length order for this test"
    encoder = model.Encoder(embedder, tok, max_seq_length=64)
    assert isinstance(encoder.encode(TEXTS), np.ndarray)  # as sentence-transformers
    out = encoder.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    assert out.shape == (len(TEXTS), 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    with torch.no_grad():
        alone = _alone(model.Embedder(backbone), tok)
    torch.testing.assert_close(out, F.normalize(alone, dim=-1), rtol=0, atol=1e-5)
    for bs in (2, 100):
        torch.testing.assert_close(encoder.encode(TEXTS, batch_size=bs, convert_to_tensor=True), out,
                                   rtol=0, atol=1e-5)
    raw = encoder.encode(TEXTS, batch_size=100, normalize=False, convert_to_tensor=True)
    torch.testing.assert_close(raw, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-2)
    # Cut as in training: max_seq_length - 1 tokens of text, then eos.
    short = model.Encoder(embedder, tok, max_seq_length=3).encode(TEXTS, batch_size=4, normalize=False,
                                                                  convert_to_tensor=True)
    long_ids = data.tokenize(tok, TEXTS, 64)
    torch.testing.assert_close(model.Encoder(embedder, tok, max_seq_length=3).encode_ids(long_ids, normalize=False),
                               short, rtol=0, atol=1e-5)
    with torch.no_grad():
        cut = torch.stack([model.Embedder(backbone)(torch.tensor(s), torch.tensor([len(s)]))[0]
                           for s in data.tokenize(tok, TEXTS, 3)])
    assert all(len(s) <= 3 for s in data.tokenize(tok, TEXTS, 3))
    torch.testing.assert_close(short, cut, rtol=0, atol=1e-5)


# ---- gradient checkpointing ------------------------------------------------------------------------

def test_gradient_checkpointing_same_embeddings_and_gradients(tiny, post_tok):
    plain, ckpt = _load(tiny), _load(tiny, gradient_checkpointing=True)
    assert checkpointing_on(ckpt) and not checkpointing_on(plain)
    flat, lengths = _flat(post_tok)
    with torch.no_grad():
        torch.testing.assert_close(model.Embedder(ckpt.eval())(flat, lengths),
                                   model.Embedder(plain.eval())(flat, lengths), rtol=0, atol=1e-6)

    calls = {"plain": 0, "ckpt": 0}
    # A sub-module inside the checkpointed layer runs again when the backward pass recomputes the layer.
    # (Forward hooks do not fire on the recompute, so count calls of the sub-module's forward itself.)
    for name, backbone in (("plain", plain), ("ckpt", ckpt)):
        mlp = backbone.layers[0].mlp

        def counted(*args, _forward=mlp.forward, _name=name, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        mlp.forward = counted
    weights = torch.randn(len(TEXTS), 32, generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, backbone in (("plain", plain), ("ckpt", ckpt)):
        backbone.train()
        emb = model.Embedder(backbone)(flat, lengths)
        (emb * weights).sum().backward()
        grads[name] = {n: p.grad for n, p in backbone.named_parameters()}
    assert calls["plain"] == 1
    assert calls["ckpt"] == 2, "in train mode the layer is recomputed in the backward pass"
    for n, g in grads["ckpt"].items():
        assert g is not None and torch.isfinite(g).all(), n
        torch.testing.assert_close(g, grads["plain"][n], rtol=1e-4, atol=1e-6)
    assert all(grads["ckpt"][n].abs().sum() > 0 for n in grads["ckpt"] if ".layers." in n)
