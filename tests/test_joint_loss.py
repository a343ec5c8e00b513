"""The losses beyond the recipe: contrastive_loss "joint" (each query against every positive and
hard negative of the global batch) and false_negative_margin, against computations written here
from their definitions: in one process, across two processes (values and gradients), and in a
2-process training run through the DDP launch."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_DIR, ddp_launch, make_config, run_cli, run_two_gloo_workers
from test_presets import first_batches, published_events

import data
import loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def ref_softmax_loss(q, candidates, target, t, margin=None, same=()):
    """-log softmax over the kept candidates, by hand in float64 lists: a candidate other than the
    target is left out when its index is in `same` or when its cosine beats the target's by > margin."""
    cos = [_cos(q, c) for c in candidates]
    kept = [j for j in range(len(candidates)) if j == target or (
        j not in same and (margin is None or cos[j] <= cos[target] + margin))]
    m = max(cos[j] / t for j in kept)
    return m + math.log(sum(math.exp(cos[j] / t - m) for j in kept)) - cos[target] / t


def ref_joint(q, p, n, keys, t=0.05, margin=None, offset=0):
    """Queries q [bs, d] of one process against the global batch's positives p [B, d] and hard
    negatives n [B * k, d] (keys: the document keys of p then n); query i's target is p[offset + i]."""
    q, candidates = q.double().tolist(), torch.cat([p, n]).double().tolist()
    keys = list(keys)
    total = 0.0
    for i in range(len(q)):
        target = offset + i
        same = {j for j, key in enumerate(keys) if key == keys[target] and j != target}
        total += ref_softmax_loss(q[i], candidates, target, t, margin, same)
    return total / len(q)


def test_joint_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    bs, k, d = 5, 3, 8
    q, p, n = torch.randn(bs, d, generator=g), torch.randn(bs, d, generator=g), torch.randn(bs, k, d, generator=g)
    n[1, 2] = p[3]  # row 1's third negative is row 3's positive, as in F2LLM data
    p[4] = p[0]  # two rows with the same positive
    keys = torch.arange(bs * (2 + k), dtype=torch.long)
    keys[2 * bs + 1 * k + 2] = keys[bs + 3]
    keys[bs + 4] = keys[bs + 0]
    candidates, candidate_keys, offset = loss.gather_candidates(p, n, keys)
    assert offset == 0 and candidates.shape == (bs + bs * k, d)
    for margin in (None, 0.0, 0.2):
        got = loss.joint_loss(q, candidates, candidate_keys, offset, 0.05, margin).item()
        want = ref_joint(q, p, n.flatten(0, 1), candidate_keys.tolist(), 0.05, margin)
        assert got == pytest.approx(want, rel=1e-5), margin
    # The same-text test changes the value (query 3's positive reappears as a negative), and
    # without keys nothing is left out.
    masked = loss.joint_loss(q, candidates, candidate_keys, offset).item()
    unmasked = loss.joint_loss(q, candidates, None, offset).item()
    assert unmasked == pytest.approx(ref_joint(q, p, n.flatten(0, 1), range(bs * (1 + k))), rel=1e-5)
    assert masked < unmasked - 1e-3


def test_margin_in_hard_and_inbatch_losses_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    bs, k, d = 6, 4, 8
    q, p, n = torch.randn(bs, d, generator=g), torch.randn(bs, d, generator=g), torch.randn(bs, k, d, generator=g)
    qs, ps, ns = q.double().tolist(), p.double().tolist(), n.double().tolist()
    dropped = 0
    for margin in (0.0, 0.1, 0.5):
        hard = sum(ref_softmax_loss(qs[i], [ps[i]] + ns[i], 0, 0.05, margin) for i in range(bs)) / bs
        inbatch = sum(ref_softmax_loss(qs[i], ps, i, 0.05, margin) for i in range(bs)) / bs
        assert loss.hard_loss(q, p, n, 0.05, margin).item() == pytest.approx(hard, rel=1e-5)
        assert loss.inbatch_loss(q, p, 0.05, margin=margin).item() == pytest.approx(inbatch, rel=1e-5)
        dropped += loss.hard_loss(q, p, n, 0.05, margin).item() != pytest.approx(loss.hard_loss(q, p, n).item())
    assert dropped, "the margins must drop some candidates here, or this test shows nothing"


def test_drop_false_negatives_never_drops_the_positive():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.95]])
    labels = torch.tensor([0, 1])
    same = torch.tensor([[True, False, False], [False, True, True]])
    out = loss.drop_false_negatives(scores, labels, margin=0.3, same=same)
    # row 0: 0.9 > 0.1 + 0.3 dropped, 0.5 > 0.4 dropped; row 1: 0.95 marked same; the labels stay
    assert torch.isinf(out).tolist() == [[False, True, True], [False, False, True]]
    assert out[0, 0] == 0.1 and out[1, 1] == 0.2
    assert loss.drop_false_negatives(scores, labels) is scores


def test_f2llm_losses_joint_terms_by_task_type():
    g = torch.Generator().manual_seed(2)
    bs, k, d = 4, 2, 16
    emb = torch.randn(bs * (2 + k), d, generator=g)
    keys = torch.arange(len(emb))
    out = loss.f2llm_losses(emb, bs, k, "retrieval", contrastive_loss="joint", keys=keys, mrl_dims=[8])
    assert set(out) == {"joint", "mrl_joint"}
    q, p, n = emb[:bs], emb[bs: 2 * bs], emb[2 * bs:]
    assert out["joint"].item() == pytest.approx(ref_joint(q, p, n, keys.tolist()), rel=1e-5)
    weight = loss.matryoshka_weight(2, 8, d)
    assert out["mrl_joint"].item() == pytest.approx(weight * ref_joint(q[:, :8], p[:, :8], n[:, :8], keys.tolist()),
                                                    rel=1e-5)
    for task in ("classification", "clustering"):  # other queries' positives may share the label
        assert set(loss.f2llm_losses(emb, bs, k, task, contrastive_loss="joint", keys=keys)) == {"hard"}


def test_sequence_keys_tell_equal_sequences_in_every_process():
    ids = np.array([5, 6, 7, 1, 5, 6, 7, 1, 5, 6, 1, 9, 1], dtype=np.int64)
    lengths = np.array([4, 4, 3, 2])
    keys = data.sequence_keys(ids, lengths)
    assert keys[0] == keys[1] and len(set(keys.tolist())) == 3
    code = ("import numpy as np, data; print(data.sequence_keys(np.array([5, 6, 7, 1, 5, 6, 1, 9, 1]), "
            "np.array([4, 3, 2])).tolist())")
    seen = {subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert seen == {f"{keys[[0, 2, 3]].tolist()}\n"}


WORKER = r"""
import os, sys
sys.path.insert(0, os.environ["REPO_DIR"])
import torch, torch.distributed as dist
import loss
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}", rank=rank, world_size=2)
sizes, k, d = [3, 5], 2, 6
g = torch.Generator().manual_seed(0)
Q, P, N = torch.randn(8, d, generator=g), torch.randn(8, d, generator=g), torch.randn(8, k, d, generator=g)
N[6, 1] = P[1]  # a negative on rank 1 is a positive on rank 0
KP, KN = torch.arange(8), torch.arange(8, 8 + 8 * k).view(8, k)
KN[6, 1] = KP[1]
start = sum(sizes[:rank])
rows = slice(start, start + sizes[rank])
out = {}
for gradient in ("all", "own"):
    q, p, n = (x[rows].clone().requires_grad_() for x in (Q, P, N))
    keys = torch.cat([torch.zeros(sizes[rank], dtype=torch.long), KP[rows], KN[rows].flatten()])
    value = loss.joint_loss(q, *loss.gather_candidates(p, n, keys, gradient), 0.1, 0.3)
    value.backward()
    out[gradient] = (value.item(), q.grad.clone(), p.grad.clone(), n.grad.clone())
torch.save(out, os.path.join(os.environ["OUT"], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_joint_loss_across_two_processes(tmp_path):
    """Each process's queries against both processes' positives and negatives (gathered as rank 0's
    positives and negatives, then rank 1's; the reference orders them otherwise), the same-text test across
    processes, and the gradients: "all" gives each process's candidates the summed gradient of both
    losses, "own" only its own loss's."""
    run_two_gloo_workers(tmp_path, WORKER)

    g = torch.Generator().manual_seed(0)
    k, d, sizes, starts = 2, 6, [3, 5], [0, 3]
    Q, P, N = torch.randn(8, d, generator=g), torch.randn(8, d, generator=g), torch.randn(8, k, d, generator=g)
    N[6, 1] = P[1]
    keys = list(range(8)) + list(range(8, 8 + 8 * k))
    keys[8 + 6 * k + 1] = 1
    Q, P, N = (x.double().requires_grad_() for x in (Q, P, N))

    def torch_ref(rank):  # the definition with autograd, for the gradients
        s, b = starts[rank], sizes[rank]
        candidates = F.normalize(torch.cat([P, N.flatten(0, 1)]), dim=-1)
        logits = F.normalize(Q[s: s + b], dim=-1) @ candidates.T
        target = torch.arange(s, s + b)
        drop = torch.tensor([[keys[j] == keys[t] and j != t for j in range(len(keys))] for t in target.tolist()])
        drop |= (logits > logits[torch.arange(b), target][:, None] + 0.3).detach()
        drop[torch.arange(b), target] = False
        return F.cross_entropy(logits.masked_fill(drop, float("-inf")) / 0.1, target)

    per_rank = [torch_ref(r) for r in (0, 1)]
    summed = torch.autograd.grad(sum(per_rank), (Q, P, N), retain_graph=True)
    for r, (s, b) in enumerate(zip(starts, sizes)):
        got = torch.load(tmp_path / f"rank{r}.pt")
        want = ref_joint(Q[s: s + b].detach(), P.detach(), N.detach().flatten(0, 1), keys, 0.1, 0.3, offset=s)
        assert per_rank[r].item() == pytest.approx(want, rel=1e-9), "the autograd reference is the definition"
        own = torch.autograd.grad(per_rank[r], (Q, P, N), retain_graph=True)
        for gradient in ("all", "own"):
            value, gq, gp, gn = got[gradient]
            assert value == pytest.approx(want, rel=1e-5)
            torch.testing.assert_close(gq.double(), own[0][s: s + b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["all"][2].double(), summed[1][s: s + b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["all"][3].double(), summed[2][s: s + b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["own"][2].double(), own[1][s: s + b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["own"][3].double(), own[2][s: s + b], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got["all"][3], got["own"][3], atol=1e-4)


def step_one_joint(cfg, batches, margin, same_text=True):
    """The first step's joint loss on retrieval data, from its definition: each process's model
    embeddings (the HF model on right-padded sequences, mask from the lengths, the last real
    token's state), each query against every process's positives and negatives, the ones with its
    positive's tokens (compared as token lists) or beating it by more than `margin` left out.
    Returns (mean loss over processes, norm of the gradient of that mean, the number of same-text
    and of margin drops)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(cfg.model_path, torch_dtype=torch.float32)
    embeddings, texts = [], []
    for _, batch, _ in batches:
        sequences = torch.split(batch["input_ids"], batch["lengths"].tolist())
        ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        mask = (torch.arange(ids.shape[1])[None] < batch["lengths"][:, None]).long()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        embeddings.append(hidden[torch.arange(len(ids)), batch["lengths"] - 1])
        texts.append([tuple(s.tolist()) for s in sequences])
    bs = batches[0][1]["num_queries"]
    candidates = torch.cat([e[bs: 2 * bs] for e in embeddings] + [e[2 * bs:] for e in embeddings])
    candidate_texts = [t for ts in texts for t in ts[bs: 2 * bs]] + [t for ts in texts for t in ts[2 * bs:]]
    total, same_drops, margin_drops = 0, 0, 0
    for rank, emb in enumerate(embeddings):
        cos = F.normalize(emb[:bs], dim=-1) @ F.normalize(candidates, dim=-1).T
        target = torch.arange(bs) + rank * bs
        same = torch.tensor([[same_text and candidate_texts[j] == candidate_texts[t] and j != t
                              for j in range(len(candidate_texts))] for t in target.tolist()])
        beats = (cos > cos[torch.arange(bs), target][:, None] + margin).detach()
        beats[torch.arange(bs), target] = False
        same_drops += int(same.sum())
        margin_drops += int((beats & ~same).sum())
        total = total + F.cross_entropy(cos.masked_fill(same | beats, float("-inf")) / 0.05, target) / len(batches)
    total.backward()
    norm = torch.cat([param.grad.flatten() for param in model.parameters() if param.grad is not None]).norm()
    return total.item(), norm.item(), same_drops, margin_drops


def test_joint_loss_trains_with_two_processes(tiny, tokenized, tmp_path):
    """contrastive_loss joint with a false_negative_margin, 2 processes through the DDP launch: the
    first step's logged joint loss and gradient norm are the definition's, computed here."""
    margin = 0.002  # the untrained model's cosines all sit near 1: a small margin already drops some
    config, values = make_config(tmp_path, tiny, tokenized, "joint", contrastive_loss="joint",
                                 false_negative_margin=margin, dataset_draw="published", train_batch_size=16,
                                 num_hard_neg=3, train_epochs=1, warmup_steps=2, dtype="float32",
                                 train_steps=2, eval_queries=0)
    proc = run_cli("run.py", "--config", config, env={"OMP_NUM_THREADS": "1"}, prefix=ddp_launch(2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = published_events(values)
    cfg, batches = first_batches(config, tokenized, 2)
    name = batches[0][0]
    assert name in ("msmarco", "natural_questions"), "the first batch must be a retrieval one for this test"
    value, norm, same_drops, margin_drops = step_one_joint(cfg, batches, margin)
    assert same_drops > 0 and margin_drops > 0, "both tests must drop candidates here, or this shows nothing"
    assert logged[f"train/{name}/joint"][1] == pytest.approx(value, rel=1e-4)
    assert logged["train/grad_norm"][1] == pytest.approx(norm, rel=1e-4)
    assert not any(tag.endswith("/inbatch") for tag in logged)
    # The check can fail: without the same-text test the loss is another number.
    assert step_one_joint(cfg, batches, margin, same_text=False)[0] != pytest.approx(value, rel=1e-3)
