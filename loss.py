"""F2LLM's contrastive losses on cosine similarity with a temperature.

`hard_loss`: each query against [its positive, its k hard negatives]; all task types.
`inbatch_loss`: each query against the positives of every query in the global batch; retrieval only,
because in classification and clustering data other queries' positives may share the query's label.
Both work in a plain process; in a distributed run `inbatch_loss` gathers the positives of all processes.
F2LLM-v2 adds the Matryoshka terms (both losses again on the first m dimensions, scaled by
`matryoshka_weight`) and `kd_loss` (distillation from a teacher's embeddings).

Beyond the recipe (config `contrastive_loss: joint`, `false_negative_margin`): `joint_loss`, each
query against every positive and every hard negative of the global batch in one softmax, as
sentence-transformers' MultipleNegativesRankingLoss with hard negatives (van den Oord et al. 2018,
arXiv 1807.03748; Henderson et al. 2017, arXiv 1705.00652), and false-negative masking, which drops
from a query's softmax the candidates that score above its positive by more than a margin (as the
Qwen3-Embedding training does, arXiv 2506.05176).
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


def gather_rows(rows, gradient="all"):
    """Rows of every process in rank order, and the offset of this process's rows among them.

    `gradient`: which gathered rows carry the loss's gradient back. "all": every process's, so each
    process's rows get the gradient of every process's loss (the gradient of the global-batch loss);
    "own": this process's rows only, the others are constants; "none": no row at all, only the
    queries learn from the loss (the published code, whose accelerate.gather returns a tensor
    without gradient, on one process too). Integer rows (document keys) carry no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (rows.detach() if gradient == "none" else rows), 0
    size = torch.tensor([len(rows)], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank()
    offset = sum(sizes[:rank])
    if gradient == "all" and rows.is_floating_point():
        return _GatherWithGrad.apply(rows, sizes), offset
    with torch.no_grad():
        parts = _all_gather_padded(rows.detach(), sizes)
    if gradient == "own":
        parts[rank] = rows
    return torch.cat(parts), offset


def drop_false_negatives(scores, labels, margin=None, same=None):
    """The cosine scores [bs, C] with the candidates that must not count as negatives set to -inf:
    with `margin`, those scoring above the query's positive (column `labels`) by more than the margin
    (the test runs without gradient: it selects, it is not learned); with `same` ([bs, C] bool),
    those marked (the same text as the positive). The positive itself always stays."""
    if margin is None and same is None:
        return scores
    drop = torch.zeros_like(scores, dtype=torch.bool) if same is None else same.clone()
    if margin is not None:
        with torch.no_grad():
            drop |= scores > scores.gather(1, labels[:, None]) + margin
    drop[torch.arange(len(labels), device=labels.device), labels] = False
    return scores.masked_fill(drop, float("-inf"))


def _cross_entropy(scores, labels, temperature, margin=None, same=None):
    # In the scores' dtype (f2llm_losses decides it). Below float32, the published operations (per-row
    # losses, then their mean), whose roundings the bf16 results depend on.
    logits = drop_false_negatives(scores, labels, margin, same) / temperature
    if logits.dtype == torch.float32:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="none").mean()


def inbatch_loss(query, passage, temperature=0.05, gradient="all", margin=None):
    """Cross-entropy of each query over all positives of the global batch; target: its own positive.

    query, passage: [bs, d] local embeddings, row i of `passage` the positive of query i; `gradient`:
    see gather_rows; `margin`: see drop_false_negatives.
    """
    return gathered_inbatch_loss(query, *gather_rows(passage, gradient), temperature, margin)


def gathered_inbatch_loss(query, all_passages, offset, temperature=0.05, margin=None):
    """inbatch_loss given the global batch's positives (query i's own at row offset + i)."""
    scores = F.normalize(query, dim=-1) @ F.normalize(all_passages, dim=-1).T
    labels = torch.arange(len(query), device=query.device) + offset
    return _cross_entropy(scores, labels, temperature, margin)


def hard_loss(query, passage, negatives, temperature=0.05, margin=None):
    """Cross-entropy of each query over [its positive, its k hard negatives]; target: the positive.

    query, passage: [bs, d]; negatives: [bs, k, d] or None (then only the positive is scored);
    `margin`: see drop_false_negatives.
    """
    query = F.normalize(query, dim=-1)
    candidates = F.normalize(passage, dim=-1).unsqueeze(1)
    if negatives is not None:
        candidates = torch.cat([candidates, F.normalize(negatives, dim=-1)], dim=1)
    if query.dtype == torch.float32:
        scores = torch.einsum("bd,bkd->bk", query, candidates)
    else:  # the published products, each rounded to bf16 before the sum, as its bf16 results are
        scores = (query.unsqueeze(1) * candidates).sum(-1)
    labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return _cross_entropy(scores, labels, temperature, margin)


def gather_candidates(passage, negatives, keys=None, gradient="all"):
    """joint_loss's candidates: each process's positives followed by its hard negatives ([bs x k]),
    in rank order, gathered at once; their document keys in the same order (keys: the batch's, the
    queries' first, as collate gives them; or None), and the offset of this process's positives."""
    local = passage if negatives is None else torch.cat([passage, negatives.flatten(0, 1)])
    candidates, offset = gather_rows(local, gradient)
    return candidates, None if keys is None else gather_rows(keys[len(passage):])[0], offset


def joint_loss(query, candidates, candidate_keys, offset, temperature=0.05, margin=None):
    """Cross-entropy of each query over every positive and every hard negative of the global batch
    (gather_candidates); target: its own positive, at row offset + i. Candidates with the positive's
    document key (the same text: in F2LLM data one row's positive is often another's hard negative)
    are not negatives; `margin`: see drop_false_negatives.

    query: [bs, d]; candidates: [C, d]; candidate_keys: [C] int64 or None (no same-text test).
    """
    scores = F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).T
    labels = torch.arange(len(query), device=query.device) + offset
    same = None
    if candidate_keys is not None:
        same = candidate_keys[None, :] == candidate_keys[labels][:, None]
    return _cross_entropy(scores, labels, temperature, margin, same)


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
    teacher = teacher[:, : student.shape[1]].to(student.dtype)
    groups = (slice(0, num_queries), slice(num_queries, 2 * num_queries), slice(2 * num_queries, None))
    return sum(F.mse_loss(student[g], teacher[g]) for g in groups if len(student[g]))


def f2llm_losses(embeddings, num_queries, num_neg, task_type, *, temperature=0.05, inbatch_gradient="all",
                 contrastive_loss="f2llm", false_negative_margin=None, mrl_dims=(), teacher=None, kd_weight=1.0,
                 keys=None, loss_dtype="float32"):
    """The losses for one homogeneous batch; the keywords are the Config keys of the same names.

    `contrastive_loss` "f2llm", the recipe: {"hard": ..., "inbatch": ... (retrieval only)}; "joint":
    {"joint": ...} on retrieval batches (joint_loss over the global batch's positives and hard
    negatives, `keys` the batch's document keys for its same-text test), {"hard": ...} on the others,
    whose in-batch candidates may share the query's label. Plus F2LLM-v2's "mrl_hard" and
    "mrl_inbatch" (or "mrl_joint") when mrl_dims is given (Matryoshka: each loss again on the first m
    dimensions for each m; the terms taken in the published order, the full dimension as term 1, then
    mrl_dims from the largest down, term n scaled by matryoshka_weight; the published code logs each
    inside its loss) and "kd" (kd_weight x kd_loss) when the teacher's embeddings of the same
    sequences are given. `false_negative_margin`: false-negative masking in every term
    (drop_false_negatives). `loss_dtype` "float32": every loss computed in float32 from the
    embeddings, whatever their dtype; "embeddings": in their dtype, as the published code (bf16 in
    its bf16 runs, where loss and gradient are up to about 1% off). The total loss is the sum of the
    values."""
    if loss_dtype == "float32":
        embeddings = embeddings.float()
        teacher = None if teacher is None else teacher.float()
    margin = false_negative_margin
    query, passage, negatives = split_embeddings(embeddings, num_queries, num_neg)
    retrieval = task_type == "retrieval"
    joint = retrieval and contrastive_loss == "joint"
    if joint:  # gathered once, then cut per dimension
        candidates, candidate_keys, offset = gather_candidates(passage, negatives, keys, inbatch_gradient)
    elif retrieval:
        all_passages, offset = gather_rows(passage, inbatch_gradient)

    def both(dim=None):
        cut = (lambda x: x[..., :dim]) if dim else (lambda x: x)
        if joint:
            return {"joint": joint_loss(cut(query), cut(candidates), candidate_keys, offset, temperature, margin)}
        out = {"hard": hard_loss(cut(query), cut(passage), None if negatives is None else cut(negatives), temperature,
                                 margin)}
        if retrieval:
            out["inbatch"] = gathered_inbatch_loss(cut(query), cut(all_passages), offset, temperature, margin)
        return out

    losses = both()
    hidden = embeddings.shape[-1]
    for n, dim in enumerate(sorted(mrl_dims, reverse=True), start=2):  # the published order, see docstring
        for kind, value in both(dim).items():
            losses[f"mrl_{kind}"] = losses.get(f"mrl_{kind}", 0) + matryoshka_weight(n, dim, hidden) * value
    if teacher is not None:
        losses["kd"] = kd_weight * kd_loss(embeddings, teacher, num_queries)
    return losses
