"""grad_cache.py: the cached (GradCache) step gives the losses and parameter gradients of the
uncached step, for every chunk size, in one process and under DDP over 2 processes; only one
chunk of sequences is ever run with a graph; gradients are synchronised once per step. With
dropout (LoRA's) its second pass replays the first pass's masks, so the gradient is that of the
loss it computed, and the random stream after the step is not perturbed."""
import os
from contextlib import nullcontext

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import free_port, write_config

import config
import data
import grad_cache
import lora
from config import LORA_DEFAULTS
from errors import UserError
from loss import f2llm_losses
from model import Embedder, load_backbone

B, K = 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def accelerator():
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 1
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate state to other tests
    GradientState._reset_state()


def table_of(tokenized, name, rows, num_negatives, start=0):
    path = os.path.join(tokenized, f"{name}.parquet")
    return pq.read_table(path, columns=data.token_columns(path, num_negatives)).slice(start, rows)


@pytest.fixture(scope="module")
def batches(tokenized):
    """A retrieval batch (B queries, K of 10 negatives sampled) and a classification batch (1
    negative), from the tokenized data, cut at 24 tokens."""
    retrieval = data.collate(table_of(tokenized, "msmarco", B, K), num_neg=K, max_seq_length=24, eos_id=2,
                             rng=np.random.default_rng(0))
    classification = data.collate(table_of(tokenized, "imdb", B + 1, 1), num_neg=1, max_seq_length=24, eos_id=2,
                                  rng=np.random.default_rng(0))
    return {"retrieval": retrieval, "classification": classification}


def embedder(tiny, layout="packed", checkpointing=False):
    return Embedder(load_backbone(f"{tiny}/backbone", dtype="float32", gradient_checkpointing=checkpointing,
                                  packed=layout == "packed"), layout)


def loss_fn(batch, task):
    return lambda embeddings: f2llm_losses(embeddings, batch["num_queries"], batch["num_neg"], task)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def uncached_step(model, batch, task):
    model.zero_grad()
    losses = loss_fn(batch, task)(model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"]))
    sum(losses.values()).backward()
    return {k: v.item() for k, v in losses.items()}, grads_of(model)


def cached_step(model, batch, task, chunk_size, accelerator):
    model.zero_grad()
    losses = grad_cache.cached_backward(model, batch, loss_fn(batch, task), chunk_size, accelerator)
    assert all(not v.requires_grad for v in losses.values()), "losses come back detached"
    return {k: v.item() for k, v in losses.items()}, grads_of(model)


def max_rel_diff(got, expected):
    return max(((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in expected.items())


# ---- sequence_chunks ---------------------------------------------------------------------------------

def test_sequence_chunks_cover_the_batch_in_order(batches):
    for batch in batches.values():
        n = len(batch["lengths"])
        sequences = [s.tolist() for s in torch.split(batch["input_ids"], batch["lengths"].tolist())]
        for size in (1, 2, 3, 7, n - 1, n, n + 5):
            chunks = grad_cache.sequence_chunks(batch, size)
            assert len(chunks) == -(-n // size)
            got, queries = [], 0
            for first, ids, lengths, q in chunks:
                assert first == len(got), "chunks are consecutive"
                assert 1 <= len(lengths) <= size and len(ids) == int(lengths.sum())
                got += [s.tolist() for s in torch.split(ids, lengths.tolist())]
                # The chunk's queries are its sequences among the batch's first num_queries.
                assert q == sum(1 for i in range(first, first + len(lengths)) if i < batch["num_queries"])
                queries += q
            assert got == sequences and queries == batch["num_queries"]


# ---- one process: the same losses and gradients as the uncached step ----------------------------------

@pytest.mark.parametrize("layout,checkpointing", [("packed", False), ("packed", True), ("grouped", False)])
@pytest.mark.parametrize("task", ["retrieval", "classification"])
def test_cached_step_equals_the_uncached_step(tiny, batches, accelerator, task, layout, checkpointing):
    batch = batches[task]
    n = len(batch["lengths"])
    assert n == (B if task == "retrieval" else B + 1) * (2 + batch["num_neg"])
    model = embedder(tiny, layout, checkpointing).train()
    ref_losses, ref_grads = uncached_step(model, batch, task)
    assert set(ref_losses) == ({"hard", "inbatch"} if task == "retrieval" else {"hard"})
    assert all(g.abs().sum() > 0 for name, g in ref_grads.items() if ".layers." in name)
    for size in (1, 3, 7, n, n + 10):
        losses, grads = cached_step(model, batch, task, size, accelerator)
        assert set(losses) == set(ref_losses)
        for kind, value in ref_losses.items():
            assert losses[kind] == pytest.approx(value, rel=1e-5, abs=1e-6), (size, kind)
        assert max_rel_diff(grads, ref_grads) < 1e-4, size
    # The gradients accumulate like any backward: two cached steps without zero_grad give twice the gradient.
    model.zero_grad()
    for _ in range(2):
        grad_cache.cached_backward(model, batch, loss_fn(batch, task), 3, accelerator)
    assert max_rel_diff({n: p.grad for n, p in model.named_parameters()},
                        {n: 2 * g for n, g in ref_grads.items()}) < 1e-4


class GraphSpy:
    """Records, for every backbone call, the sequences and tokens it ran and whether it built a graph,
    and when the backward pass reached its output: the sequences alive in graphs at any time."""

    def __init__(self, backbone):
        self.events = []
        forward = backbone.forward

        def spied(*args, **kwargs):
            ids = kwargs["input_ids"]
            seqs = len(kwargs["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in kwargs else ids.shape[0]
            out = forward(*args, **kwargs)
            grad = torch.is_grad_enabled()
            self.events.append(("forward", grad, seqs, ids.numel()))
            if grad:
                out.last_hidden_state.register_hook(lambda g: self.events.append(("backward", True, seqs, 0)))
            return out

        backbone.forward = spied

    def peak_alive(self):
        alive = peak = 0
        for kind, grad, seqs, _ in self.events:
            if grad:
                alive += seqs if kind == "forward" else -seqs
                peak = max(peak, alive)
        assert alive == 0
        return peak


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_at_most_one_chunk_runs_with_a_graph(tiny, batches, accelerator, layout):
    batch = batches["retrieval"]
    n, tokens = len(batch["lengths"]), int(batch["lengths"].sum())
    model = embedder(tiny, layout).train()
    spy = GraphSpy(model.backbone)
    uncached_step(model, batch, "retrieval")
    assert spy.peak_alive() == n, "the uncached step holds the whole batch in its graph"
    for size in (1, 3, 7):
        spy.events.clear()
        cached_step(model, batch, "retrieval", size, accelerator)
        with_graph = [e for e in spy.events if e[0] == "forward" and e[1]]
        without = [e for e in spy.events if e[0] == "forward" and not e[1]]
        # Every sequence embedded once without a graph, then once more with one, chunk by chunk.
        assert sum(e[2] for e in without) == sum(e[2] for e in with_graph) == n
        assert max(e[2] for e in with_graph) <= size and len(with_graph) == -(-n // size)
        if layout == "packed":
            assert sum(e[3] for e in with_graph) == tokens, "packed: no padding tokens"
        assert spy.peak_alive() <= size, "a chunk's graph is freed by its backward before the next chunk runs"
        kinds = [e[0] for e in spy.events if e[1]]
        assert kinds == ["forward", "backward"] * len(with_graph)


# ---- dropout: the second pass replays each chunk's random state -----------------------------------------

CHUNK = 3


def lora_embedder(tiny, checkpointing=False):
    """The tiny backbone with LoRA at its default dropout, packed, in train mode."""
    backbone = load_backbone(f"{tiny}/backbone", dtype="float32", gradient_checkpointing=checkpointing, packed=True)
    torch.manual_seed(0)  # lora_A's random init: the same adapters whatever ran before
    backbone = lora.add_lora(backbone, {**LORA_DEFAULTS, "r": 4})
    for name, param in backbone.named_parameters():
        if "lora_B" in name:  # zero at init, which would leave the embeddings blind to the adapters' dropout
            param.data.normal_(0, 0.1)
    return Embedder(backbone, "packed").train()


def reference_step(model, batch, task):
    """The loss on embeddings built with a graph, chunk by chunk in cached_backward's order (so from
    the same random state, the same dropout masks), its autograd gradient, and the CPU random state
    after the forward pass."""
    model.zero_grad()
    embeddings = torch.cat([model(ids, lens, num_queries=q)
                            for _, ids, lens, q in grad_cache.sequence_chunks(batch, CHUNK)])
    after_forward = torch.get_rng_state()
    losses = loss_fn(batch, task)(embeddings)
    sum(losses.values()).backward()
    return {k: v.item() for k, v in losses.items()}, grads_of(model), after_forward


def cached_and_reference(tiny, batch, accelerator, checkpointing=False):
    """(reference_step's results, cached_step's results with the CPU random state after it), both
    from the same seed."""
    assert LORA_DEFAULTS["dropout"] == 0.05
    model = lora_embedder(tiny, checkpointing)
    with torch.no_grad():
        twice = [model(batch["input_ids"], batch["lengths"], num_queries=batch["num_queries"]) for _ in range(2)]
    assert (twice[0] - twice[1]).abs().max() > 1e-3, "dropout changes the embeddings from one pass to the next"
    torch.manual_seed(1)
    reference = reference_step(model, batch, "retrieval")
    torch.manual_seed(1)
    cached = (*cached_step(model, batch, "retrieval", CHUNK, accelerator), torch.get_rng_state())
    return reference, cached


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cached_step_with_dropout_is_the_gradient_of_its_loss(tiny, batches, accelerator, checkpointing):
    batch = batches["retrieval"]
    (ref_losses, ref_grads, ref_state), (losses, grads, state) = cached_and_reference(tiny, batch, accelerator,
                                                                                      checkpointing)
    assert ref_grads and all(".lora_" in n for n in ref_grads) and all(g.abs().sum() > 0 for g in ref_grads.values())
    for kind, value in ref_losses.items():
        assert losses[kind] == pytest.approx(value, rel=1e-6, abs=1e-7), "the first pass draws the reference's masks"
    assert max_rel_diff(grads, ref_grads) < 1e-5
    assert torch.equal(state, ref_state), "the random stream after the step is the first pass's"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_without_the_replay_the_gradient_differs(tiny, batches, accelerator, monkeypatch, checkpointing):
    """The test above can fail: with the replay a no-op, the second pass draws new masks (activation
    checkpointing's own replay covers only its recomputation)."""
    monkeypatch.setattr(grad_cache, "replayed", lambda state: nullcontext())
    (ref_losses, ref_grads, ref_state), (losses, grads, state) = cached_and_reference(tiny, batches["retrieval"],
                                                                                      accelerator, checkpointing)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7), "the first pass is the same"
    assert max_rel_diff(grads, ref_grads) > 0.1, "the second pass draws new masks"
    assert not torch.equal(state, ref_state), "and moves the random stream on"


# ---- config -----------------------------------------------------------------------------------------

def test_grad_cache_chunk_size_config(tmp_path):
    def load(**values):
        return config.load_config(write_config(tmp_path / "c.json", model_path="m", train_data_path="d", **values))

    assert load().grad_cache_chunk_size == 0, "off by default"
    assert load(grad_cache_chunk_size=8).grad_cache_chunk_size == 8
    for bad in (-1, -8):
        with pytest.raises(UserError) as err:
            load(grad_cache_chunk_size=bad)
        assert "'grad_cache_chunk_size'" in str(err.value) and "0 (off)" in str(err.value)
    with pytest.raises(UserError, match="grad_cache_chunk_size' must be of type int"):
        load(grad_cache_chunk_size=2.5)


# ---- two processes, DDP over gloo ----------------------------------------------------------------------

MODES = [("uncached", 0, "all"), ("cached", 3, "all"), ("cached", 7, "all"), ("uncached", 0, "own"),
         ("cached", 3, "own"), ("uncached", 0, "none"), ("cached", 3, "none")]


def _worker(rank, port, backbone, rows, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.process_index == rank
    batch = data.collate(rows.slice(rank * B, B), num_neg=K, max_seq_length=24, eos_id=2)
    results = {}
    for mode, chunk_size, gradient in MODES:
        # The training set-up: packed layout, activation checkpointing, DDP through accelerate.
        model = accelerator.prepare(Embedder(load_backbone(backbone, dtype="float32", gradient_checkpointing=True,
                                                           packed=True), "packed"))
        syncs = []

        def counting_allreduce(state, bucket, syncs=syncs):
            syncs.append(1)
            fut = torch.distributed.all_reduce(bucket.buffer().div_(2), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        model.register_comm_hook(None, counting_allreduce)
        model.train()

        def loss_fn(embeddings, gradient=gradient):
            return f2llm_losses(embeddings, B, K, "retrieval", inbatch_gradient=gradient)

        if mode == "cached":
            losses = grad_cache.cached_backward(model, batch, loss_fn, chunk_size, accelerator)
        else:
            losses = loss_fn(model(batch["input_ids"], batch["lengths"], num_queries=B))
            accelerator.backward(sum(losses.values()))
        results[mode, chunk_size, gradient] = (
            {k: v.item() for k, v in losses.items()},
            {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}, len(syncs))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tiny, tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_cache_ddp")
    rows = table_of(tokenized, "msmarco", 2 * B, K, start=8)
    port = free_port()
    mp.spawn(_worker, args=(port, f"{tiny}/backbone", rows, str(out)), nprocs=2, join=True)
    return rows, [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_two_processes_cached_equals_uncached(two_process_results):
    _, ranks = two_process_results
    for results in ranks:
        for gradient in ("all", "own", "none"):
            ref_losses, ref_grads, ref_syncs = results["uncached", 0, gradient]
            assert ref_syncs > 0
            for (mode, size, g), (losses, grads, syncs) in results.items():
                if mode != "cached" or g != gradient:
                    continue
                for kind, value in ref_losses.items():
                    assert losses[kind] == pytest.approx(value, rel=1e-5, abs=1e-6)
                assert max_rel_diff(grads, ref_grads) < 1e-4, (size, gradient)
                assert syncs == ref_syncs, "gradients are all-reduced once per step, in the last chunk"
    # DDP: every rank holds the same averaged gradient.
    for key in ranks[0]:
        assert max_rel_diff(ranks[1][key][1], ranks[0][key][1]) < 1e-6
    # Each in-batch gradient mode gives another gradient: the comparison above can tell them apart.
    for other in ("own", "none"):
        assert max_rel_diff(ranks[0]["cached", 3, other][1], ranks[0]["cached", 3, "all"][1]) > 1e-2


def test_two_processes_cached_equals_one_process_on_the_global_batch(tiny, two_process_results):
    """With the gather carrying gradients, the 2 x B cached step gives the gradient of the 2B batch."""
    rows, ranks = two_process_results
    batch = data.collate(rows, num_neg=K, max_seq_length=24, eos_id=2)
    model = embedder(tiny, "packed", checkpointing=True).train()
    _, grads = uncached_step(model, batch, "retrieval")
    for size in (3, 7):
        for results in ranks:
            assert max_rel_diff(results["cached", size, "all"][1], grads) < 1e-4
