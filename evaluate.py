"""Retrieval evaluation of a checkpoint: MRR@10 on raw F2LLM-format parquet files.

    python evaluate.py CHECKPOINT DATA_DIR

For each `*.parquet` in DATA_DIR, each query is ranked against the file's corpus (every distinct
passage and negative); the relevant document is the query's own passage. Prints one line per
file and, last, the mean.
"""
import argparse
import glob
import os

import pyarrow.parquet as pq
import torch

from errors import UserError, exit_on_user_error
from model import load_encoder


def mrr_at_k(scores, relevant, k=10):
    """scores: [q, n] similarity; relevant: [q] index of each query's relevant document."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hits = top == relevant[:, None]
    ranks = hits.float().argmax(dim=1) + 1
    return (hits.any(dim=1).float() / ranks).mean().item()


def evaluate_file(encoder, path, batch_size):
    table = pq.read_table(path)
    if "query" not in table.column_names or "passage" not in table.column_names:
        raise UserError(f"{path}: evaluation needs columns query and passage (negative_i optional)")
    queries = table.column("query").to_pylist()
    doc_cols = ["passage"] + [c for c in table.column_names if c.startswith("negative_")]
    corpus = sorted({t for c in doc_cols for t in table.column(c).to_pylist()})
    index = {t: i for i, t in enumerate(corpus)}
    relevant = torch.tensor([index[t] for t in table.column("passage").to_pylist()])
    q = encoder.encode(queries, batch_size=batch_size)
    d = encoder.encode(corpus, batch_size=batch_size)
    return mrr_at_k(q @ d.T, relevant)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (or any backbone with its tokenizer)")
    p.add_argument("data_dir", help="folder of raw *.parquet files with query, passage, negative_i")
    p.add_argument("--max_seq_length", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.data_dir, "*.parquet")))
    if not files:
        raise UserError(f"no *.parquet files in {args.data_dir}")
    encoder = load_encoder(args.checkpoint, max_seq_length=args.max_seq_length)
    scores = []
    for path in files:
        scores.append(evaluate_file(encoder, path, args.batch_size))
        print(f"{os.path.basename(path)[:-len('.parquet')]:32s} MRR@10 {scores[-1]:.4f}")
    print(f"{'mean':32s} MRR@10 {sum(scores) / len(scores):.4f}")


if __name__ == "__main__":
    main()
