"""What a run measures. Training: each dataset's loss terms summed between reports (LossTracker) and
the real tokens per second (Throughput). Retrieval: nDCG@10, MRR@10 and recall@10 of queries ranked
against the documents of the rows evaluated with them, which validation (run.py), evaluate.py and the
benchmarks compute here."""
import contextlib
import time
from collections import defaultdict

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


GRAD_NORM = ("", "grad_norm")  # LossTracker's key of the gradient norm, beside (dataset, loss term)


PUBLISHED_KINDS = {"inbatch": "in_batch"}  # our loss term names that the published keys spell otherwise
PUBLISHED_SPLITS = {"train": "training", "valid": "valid"}


class LossTracker:
    """Sums of each dataset's losses since the last report; reported as means over all processes.
    `kinds`: the loss terms a step can have ("inbatch", "hard", and with F2LLM-v2 options
    "mrl_inbatch", "mrl_hard", "kd"); every process must pass the same ones, as report() reduces
    them in one tensor. `keys`: the metric names report() gives (see metric_names)."""

    def __init__(self, names, task_of, kinds=("inbatch", "hard"), keys="grouped"):
        self.names = sorted(names)
        self.task_of = task_of
        self.kinds = (*kinds, "total")
        self.keys = keys
        self.sums = {}
        self.counts = defaultdict(int)

    def add(self, name, losses, grad_norm=None):
        """Accumulates on the device: no host sync per step. The gradient norm (a float, the same on
        every process) is averaged over all datasets' steps."""
        for kind, value in {**losses, "total": sum(losses.values())}.items():
            self.sums[name, kind] = self.sums.get((name, kind), 0) + value.detach().double()
            self.counts[name, kind] += 1
        if grad_norm is not None:
            self.sums[GRAD_NORM] = self.sums.get(GRAD_NORM, 0) + grad_norm
            self.counts[GRAD_NORM] += 1

    def report(self, accelerator, prefix):
        """Each dataset's mean of each loss term, each task type's mean of its datasets' means (named
        by metric_names), {prefix/loss: mean total loss per step} and {prefix/grad_norm: mean per step};
        resets."""
        keys = [(n, k) for n in self.names for k in self.kinds] + [GRAD_NORM]
        zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        totals = torch.stack([torch.stack([zero + self.sums.get(key, 0), zero + self.counts[key]]) for key in keys])
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        self.sums.clear()
        self.counts.clear()
        means = {key: total / count for key, (total, count) in zip(keys, totals) if count}
        out = {f"{prefix}/grad_norm": means.pop(GRAD_NORM)} if GRAD_NORM in means else {}
        by_task = defaultdict(list)
        for (name, kind), mean in means.items():
            by_task[self.task_of[name], kind].append(mean)
        out.update(self.metric_names(prefix, means))
        out.update(self.metric_names(prefix, {key: sum(v) / len(v) for key, v in sorted(by_task.items())}, tasks=True))
        totals = [(total, count) for (_, kind), (total, count) in zip(keys, totals) if kind == "total"]
        if sum(count for _, count in totals):
            out[f"{prefix}/loss"] = sum(total for total, _ in totals) / sum(count for _, count in totals)
        return out

    def metric_names(self, prefix, means, tasks=False):
        """{metric name: mean} of {(dataset, or task type with `tasks`, kind): mean}. `grouped`:
        prefix/dataset/kind and prefix/task_type/kind, each term apart. `published`: the published
        TensorBoard names, dataset/training_loss_hard (valid_loss_... for validation) and
        Avg/task_type/training_loss_in_batch; in training the Matryoshka terms are added to the loss
        they cut, as the published code logs them (its validation has none: ours are kept apart)."""
        if self.keys == "grouped":
            return {f"{prefix}/{name}/{kind}": mean for (name, kind), mean in means.items()}
        out = defaultdict(float)
        for (name, kind), mean in means.items():
            kind = kind.removeprefix("mrl_") if prefix == "train" else kind
            kind = PUBLISHED_KINDS.get(kind, kind)
            out[f"{'Avg/' if tasks else ''}{name}/{PUBLISHED_SPLITS[prefix]}_loss_{kind}"] += mean
        return dict(out)

    def state_dict(self, accelerator):
        """The pending sums, reduced over processes (collective), for a checkpoint."""
        keys = sorted(self.counts)
        values = torch.tensor([[float(self.sums[key]), self.counts[key]] for key in keys] or [[0.0, 0]],
                              dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, reduction="sum").tolist()
        return {f"{name}/{kind}": value for (name, kind), value in zip(keys, values)}

    def load_state_dict(self, state, accelerator):
        """Pending sums from a checkpoint; kept by the main process only, as report() sums processes."""
        if accelerator.is_main_process:
            for key, (total, count) in state.items():
                name, kind = key.rsplit("/", 1)
                self.sums[name, kind] = torch.tensor(total, dtype=torch.float64, device=accelerator.device)
                self.counts[name, kind] = int(count)


def task_loss_key(prefix, task, keys="grouped"):
    """The metric name under which LossTracker.report gives a task type's mean total loss."""
    return next(iter(LossTracker([], {}, keys=keys).metric_names(prefix, {(task, "total"): 0.0}, tasks=True)))


class Throughput:
    """Real (unpadded) tokens and steps per second of training, summed over processes; the time
    spent validating and checkpointing (inside `paused()`) does not count."""

    def __init__(self):
        self.tokens, self.steps, self.seconds, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, tokens):
        self.tokens += tokens
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        self.seconds += time.perf_counter() - self.start
        yield
        self.start = time.perf_counter()

    def report(self, accelerator):
        """{train/tokens_per_s, train/steps_per_s} since the last report (collective); resets."""
        with self.paused():
            tokens = accelerator.reduce(torch.tensor(float(self.tokens), device=accelerator.device), "sum").item()
            seconds = max(self.seconds, 1e-9)
            out = {"train/tokens_per_s": tokens / seconds, "train/steps_per_s": self.steps / seconds}
            self.tokens, self.steps, self.seconds = 0, 0, 0.0
        return out
