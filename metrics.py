"""Retrieval metrics: nDCG@10, MRR@10 and recall@10 of queries ranked against the documents of the rows
evaluated with them. Validation (run.py), evaluate.py and the benchmarks compute them here."""
import torch

from data import rows_of

METRICS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "recall@10"}  # key -> column title


def retrieval_set(split, max_queries=None):
    """The first max_queries rows (all if None) of a split -> (queries, docs, relevant).

    queries: token lists; docs: the distinct token lists among those rows' positives and negatives,
    in order of first appearance (row by row: positive, then negative_1, negative_2, ...), so that a
    text that is one row's positive and another's negative is one document; relevant: per query,
    the list of its relevant doc indices (its positive).
    """
    rows = rows_of(split)
    n = len(rows) if max_queries is None else min(max_queries, len(rows))
    table = rows.__getitems__(list(range(n)))
    negatives = sorted((c for c in table.column_names if c.startswith("negative_")), key=lambda c: int(c.split("_")[1]))
    index = {}  # token tuple -> doc index
    relevant = []
    for row in zip(*(table.column(c).to_pylist() for c in ["passage_input_ids"] + negatives)):
        ids = [index.setdefault(tuple(seq), len(index)) for seq in row]
        relevant.append([ids[0]])
    return table.column("query_input_ids").to_pylist(), [list(doc) for doc in index], relevant


def retrieval_metrics(scores, relevant, k=10):
    """Binary-relevance nDCG@k, MRR@k and recall@k, each the mean over queries (Python floats).

    scores: [q, n] similarities of q queries to n docs; relevant: per query, a non-empty list of
    relevant doc indices. Ties count against the relevant docs: a relevant doc ranks below every
    irrelevant doc with an equal score (relevant docs tied among themselves in doc-index order),
    so the metrics do not depend on the order of the docs and a model that scores everything
    alike gets no credit. A NaN score ranks last.
    """
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant document")
    scores = scores.float().nan_to_num(nan=float("-inf"))
    device, (q, n) = scores.device, scores.shape
    num_rel = torch.tensor([len(r) for r in relevant], device=device)
    width = int(num_rel.max())
    rel = torch.tensor([r + r[:1] * (width - len(r)) for r in relevant], device=device)  # [q, R], padded
    counted = torch.arange(width, device=device) < num_rel[:, None]
    is_rel = torch.zeros(q, n, dtype=torch.bool, device=device).scatter_(1, rel, True)
    doc = torch.arange(n, device=device)
    ranks = torch.empty(q, width, device=device)
    for j in range(width):
        d = rel[:, j : j + 1]
        s = scores.gather(1, d)
        ranks[:, j] = 1 + ((scores > s) | ((scores == s) & (~is_rel | (doc < d)))).sum(1)
    hit = counted & (ranks <= k)
    gain = torch.where(hit, 1 / torch.log2(ranks + 1), 0.0).sum(1)
    ideal = (1 / torch.log2(torch.arange(2, k + 2, device=device))).cumsum(0)[num_rel.clamp(max=k) - 1]
    first = torch.where(hit, ranks, float("inf")).min(1).values
    return {f"ndcg@{k}": (gain / ideal).mean().item(), f"mrr@{k}": (1 / first).mean().item(),
            f"recall@{k}": (hit.sum(1) / num_rel).mean().item()}
