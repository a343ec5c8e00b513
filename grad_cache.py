"""The cached (GradCache-style) contrastive step: a large batch at the memory cost of a chunk.

1. Embed the batch chunk by chunk without a graph. 2. Compute the loss on those embeddings and
its gradient with respect to them, once. 3. Re-run each chunk with a graph and back-propagate
the chunk's slice of that gradient. The result is the exact gradient of the loss of step 2,
because the loss depends on the parameters only through the embeddings and step 3 reproduces
step 1's embeddings: each chunk runs again from the random state its first pass started from,
so dropout (LoRA's, 0.05 by default) draws the same masks. Without dropout that is the uncached
step's gradient; with dropout it is the gradient for masks drawn chunk by chunk, a draw from the
same distribution as, but not equal to, the uncached step's. After the step the random state is
the one the first pass left: the stream the rest of training draws from (and a resumed run's)
does not depend on the replay.
"""
from contextlib import contextmanager, nullcontext

import torch


class RandomState:
    """A snapshot of the generators a forward pass can draw from: the CPU's and those of the
    given CUDA devices."""

    def __init__(self, cuda_devices):
        self.cuda_devices = cuda_devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in cuda_devices]

    def restore(self):
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(state, device)


@contextmanager
def replayed(state):
    """Run the block from the RandomState `state`, then put the generators back as they were."""
    current = RandomState(state.cuda_devices)
    state.restore()
    try:
        yield
    finally:
        current.restore()


def cuda_devices(model, inputs):
    """The CUDA devices a forward of `model` on `inputs` can draw random numbers on."""
    return sorted({t.device for t in (inputs, *model.parameters()) if t.device.type == "cuda"}, key=str)


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
    devices = cuda_devices(model, batch["input_ids"])
    states, parts = [], []
    with torch.no_grad():
        for _, ids, lens, q in chunks:
            states.append(RandomState(devices))
            parts.append(model(ids, lens, num_queries=q))
    embeddings = torch.cat(parts).detach().requires_grad_()
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
                # Activation checkpointing inside the model saves the replayed state and restores
                # it for its recomputation in the backward pass, so the two replays compose.
                with replayed(states[i]):
                    chunk = model(ids, lens, num_queries=q)
                accelerator.backward((chunk * grad[a : a + len(lens)].to(chunk.dtype)).sum())
    finally:
        accelerator.sync_gradients = True
    return {kind: value.detach() for kind, value in losses.items()}
