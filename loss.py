"""F2LLM's contrastive losses on cosine similarity with a temperature.

`hard_loss`: each query against [its positive, its k hard negatives]; all task types.
`inbatch_loss`: each query against the positives of every query in the global batch; retrieval only,
because in classification and clustering data other queries' positives may share the query's label.
Both work in a plain process; in a distributed run `inbatch_loss` gathers the positives of all processes.
F2LLM-v2 adds the Matryoshka terms (both losses again on the first m dimensions, scaled by
`matryoshka_weight`) and `kd_loss` (distillation from a teacher's embeddings).
"""
import math

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


def gather_positives(passage, gradient="all"):
    """Positives of every process in rank order, and the offset of this process's rows among them.

    `gradient`: which gathered positives carry the in-batch loss's gradient back. "all": every
    process's, so each process's positives get the gradient of every process's loss (the gradient
    of the global-batch loss); "own": this process's rows only, the others are constants; "none":
    no positive at all, only the queries learn from the in-batch loss (the published code, whose
    accelerate.gather returns a tensor without gradient, on one process too).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (passage.detach() if gradient == "none" else passage), 0
    size = torch.tensor([len(passage)], device=passage.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank()
    offset = sum(sizes[:rank])
    if gradient == "all":
        return _GatherWithGrad.apply(passage, sizes), offset
    with torch.no_grad():
        parts = _all_gather_padded(passage.detach(), sizes)
    if gradient == "own":
        parts[rank] = passage
    return torch.cat(parts), offset


def inbatch_loss(query, passage, temperature=0.05, gradient="all"):
    """Cross-entropy of each query over all positives of the global batch; target: its own positive.

    query, passage: [bs, d] local embeddings, row i of `passage` the positive of query i; `gradient`:
    see gather_positives.
    """
    return gathered_inbatch_loss(query, *gather_positives(passage, gradient), temperature)


def gathered_inbatch_loss(query, all_passages, offset, temperature=0.05):
    """inbatch_loss given the global batch's positives (query i's own at row offset + i)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(all_passages, dim=-1).T / temperature
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


def matryoshka_dims(hidden_size, dims=None):
    """The Matryoshka dimensions below hidden_size: `dims`, or 8, 16, 32, ... by default."""
    if dims is not None:
        return sorted(dims)
    return [2 ** i for i in range(3, max(3, math.ceil(math.log2(hidden_size))))]


def matryoshka_weight(n, dim, hidden_size):
    """F2LLM-v2's scale of the n-th loss term (n = 1 the full dimension) on the first `dim` dimensions."""
    return 1 / (n * math.sqrt(hidden_size / dim))


def kd_loss(student, teacher, num_queries):
    """F2LLM-v2's distillation loss: the mean squared error between the student's raw (unnormalised)
    embeddings and the teacher's cut to the student's size, taken over the queries, the positives
    and the negatives separately and summed, as the published code's three F.mse_loss calls."""
    teacher = teacher[:, : student.shape[1]]
    groups = (slice(0, num_queries), slice(num_queries, 2 * num_queries), slice(2 * num_queries, None))
    return sum(F.mse_loss(student[g].float(), teacher[g].float()) for g in groups if len(student[g]))


def f2llm_losses(embeddings, num_queries, num_neg, task_type, temperature=0.05, inbatch_gradient="all",
                 mrl_dims=(), teacher=None, kd_weight=1.0):
    """The recipe's losses for one homogeneous batch: {"hard": ..., "inbatch": ... (retrieval only)},
    plus F2LLM-v2's "mrl_hard" and "mrl_inbatch" when mrl_dims is given (Matryoshka: each loss again
    on the first m dimensions for each m; the terms taken in the published order, the full dimension
    as term 1, then mrl_dims from the largest down, term n scaled by matryoshka_weight; the published
    code logs each inside its loss) and "kd" (kd_weight x kd_loss) when the
    teacher's embeddings of the same sequences are given. The total loss is the sum of the values."""
    query, passage, negatives = split_embeddings(embeddings, num_queries, num_neg)
    retrieval = task_type == "retrieval"
    if retrieval:
        all_passages, offset = gather_positives(passage, inbatch_gradient)  # once, then cut per dimension

    def both(dim=None):
        cut = (lambda x: x[..., :dim]) if dim else (lambda x: x)
        out = {"hard": hard_loss(cut(query), cut(passage), None if negatives is None else cut(negatives), temperature)}
        if retrieval:
            out["inbatch"] = gathered_inbatch_loss(cut(query), cut(all_passages), offset, temperature)
        return out

    losses = both()
    hidden = embeddings.shape[-1]
    for n, dim in enumerate(sorted(mrl_dims, reverse=True), start=2):  # the published order, see docstring
        for kind, value in both(dim).items():
            losses[f"mrl_{kind}"] = losses.get(f"mrl_{kind}", 0) + matryoshka_weight(n, dim, hidden) * value
    if teacher is not None:
        losses["kd"] = kd_weight * kd_loss(embeddings, teacher, num_queries)
    return losses
