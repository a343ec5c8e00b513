"""F2LLM's contrastive losses on cosine similarity with a temperature.

`hard_loss`: each query against [its positive, its k hard negatives]; all task types.
`inbatch_loss`: each query against the positives of every query in the global batch; retrieval only,
because in classification and clustering data other queries' positives may share the query's label.
Both work in a plain process; in a distributed run `inbatch_loss` gathers the positives of all processes.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each process the summed gradient of its own slice.

    The sum is over every process's loss, which is what the global-batch loss needs: the optimizer
    then averages gradients across processes (DDP, DeepSpeed) as for any other parameter gradient.
    """

    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return torch.cat(_all_gather_padded(x, sizes))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; an all-reduce then a slice works everywhere
        start = sum(ctx.sizes[: dist.get_rank()])
        return grad[start : start + ctx.sizes[dist.get_rank()]], None


def _all_gather_padded(x, sizes):
    """All-gather rows of `x` from every process, whose row counts `sizes` may differ."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return [part[:n] for part, n in zip(parts, sizes)]


def gather_positives(passage, with_grad=True):
    """Positives of every process in rank order, and the offset of this process's rows among them.

    with_grad=False is the published plain all-gather: other processes' rows are constants and
    only this process's own rows carry gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return passage, 0
    size = torch.tensor([len(passage)], device=passage.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank()
    offset = sum(sizes[:rank])
    if with_grad:
        return _GatherWithGrad.apply(passage, sizes), offset
    with torch.no_grad():
        parts = _all_gather_padded(passage.detach(), sizes)
    parts[rank] = passage
    return torch.cat(parts), offset


def inbatch_loss(query, passage, temperature=0.05, gather_with_grad=True):
    """Cross-entropy of each query over all positives of the global batch; target: its own positive.

    query, passage: [bs, d] local embeddings, row i of `passage` the positive of query i.
    """
    query = F.normalize(query, dim=-1)
    all_passages, offset = gather_positives(F.normalize(passage, dim=-1), gather_with_grad)
    logits = query @ all_passages.T / temperature
    labels = torch.arange(len(query), device=query.device) + offset
    return F.cross_entropy(logits.float(), labels)


def hard_loss(query, passage, negatives, temperature=0.05):
    """Cross-entropy of each query over [its positive, its k hard negatives]; target: the positive.

    query, passage: [bs, d]; negatives: [bs, k, d] or None (then only the positive is scored).
    """
    query = F.normalize(query, dim=-1)
    candidates = F.normalize(passage, dim=-1).unsqueeze(1)
    if negatives is not None:
        candidates = torch.cat([candidates, F.normalize(negatives, dim=-1)], dim=1)
    logits = torch.einsum("bd,bkd->bk", query, candidates) / temperature
    labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.float(), labels)


def split_embeddings(embeddings, num_queries, num_neg):
    """Undo the collate order: bs queries, bs positives, then each query's k negatives in turn."""
    bs = num_queries
    query, passage = embeddings[:bs], embeddings[bs : 2 * bs]
    negatives = embeddings[2 * bs :].view(bs, num_neg, -1) if num_neg else None
    return query, passage, negatives


def f2llm_losses(embeddings, num_queries, num_neg, task_type, temperature=0.05, gather_with_grad=True):
    """The recipe's losses for one homogeneous batch: {"hard": ..., "inbatch": ... (retrieval only)}."""
    query, passage, negatives = split_embeddings(embeddings, num_queries, num_neg)
    losses = {"hard": hard_loss(query, passage, negatives, temperature)}
    if task_type == "retrieval":
        losses["inbatch"] = inbatch_loss(query, passage, temperature, gather_with_grad)
    return losses
