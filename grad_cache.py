"""The cached (GradCache-style) contrastive step: a large batch at the memory cost of a chunk.

1. Embed the batch chunk by chunk without a graph. 2. Compute the loss on those embeddings and
its gradient with respect to them, once. 3. Re-run each chunk with a graph and back-propagate
the chunk's slice of that gradient. The parameter gradient is the same as the uncached step's,
because the loss depends on the parameters only through the embeddings.
"""
from contextlib import nullcontext

import torch


def sequence_chunks(batch, chunk_size):
    """Consecutive chunks of at most chunk_size sequences of a flat batch:
    (first sequence, input_ids slice, lengths slice, queries in the chunk)."""
    lengths = batch["lengths"]
    starts = torch.cumsum(lengths, 0) - lengths
    chunks = []
    for a in range(0, len(lengths), chunk_size):
        b = min(a + chunk_size, len(lengths))
        t0, t1 = int(starts[a]), int(starts[b - 1] + lengths[b - 1])
        queries = min(max(batch["num_queries"] - a, 0), b - a)
        chunks.append((a, batch["input_ids"][t0:t1], lengths[a:b], queries))
    return chunks


def cached_backward(model, batch, loss_fn, chunk_size, accelerator, proceed=None):
    """Accumulate the gradient of loss_fn(embeddings of batch) into the parameters, chunk by
    chunk; returns loss_fn's losses, detached. Gradients are synchronised across processes once,
    in the last chunk's backward (DDP); under DeepSpeed, the chunks' backward passes are one
    gradient-accumulation window and its optimizer step follows the last. If proceed(losses) is
    False, nothing is back-propagated and the result is None."""
    chunks = sequence_chunks(batch, chunk_size)
    with torch.no_grad():
        embeddings = torch.cat([model(ids, lens, num_queries=q) for _, ids, lens, q in chunks])
    embeddings = embeddings.detach().requires_grad_()
    losses = loss_fn(embeddings)
    if proceed is not None and not proceed(losses):
        return None
    sum(losses.values()).backward()
    grad = embeddings.grad
    try:
        for i, (a, ids, lens, q) in enumerate(chunks):
            last = i == len(chunks) - 1
            # Before the last chunk: no gradient all-reduce (DDP), no optimizer step (DeepSpeed, which
            # accumulates the chunks' gradients and steps at the boundary its backward is told of).
            accelerator.sync_gradients = last
            with nullcontext() if last else accelerator.no_sync(model):
                chunk = model(ids, lens, num_queries=q)
                accelerator.backward((chunk * grad[a : a + len(lens)].to(chunk.dtype)).sum())
    finally:
        accelerator.sync_gradients = True
    return {kind: value.detach() for kind, value in losses.items()}
