"""MTEB evaluation of a checkpoint with the `mteb` package (2.x), embedding with the project's Encoder.

    python mteb_eval.py CHECKPOINT --tasks NFCorpus SciFact     # named MTEB tasks: downloaded from the Hub
    python mteb_eval.py CHECKPOINT --local DATA_DIR             # every *.parquet there: a local retrieval task

Named tasks download their data from the Hugging Face Hub on first use (into the `datasets` cache), so
they need network access. `--local` needs none: each raw F2LLM-format file (query, passage,
negative_1..n) becomes a retrieval task whose corpus is every distinct passage and negative and whose
relevant documents are each query's passages. Prints one row per task: mteb's main score, then
nDCG@10, MRR@10 and recall@10 where the task reports them; mteb's result files go to --output_dir.
"""
import argparse
import glob
import os
import sys

import pyarrow.parquet as pq

from errors import UserError, exit_on_user_error
from model import load_encoder

METRICS = [("nDCG@10", "ndcg_at_10"), ("MRR@10", "mrr_at_10"), ("recall@10", "recall_at_10")]


class MtebEncoder:
    """Our Encoder as mteb 2.x calls a model (its EncoderProtocol, duck-typed so that mteb is imported
    only when a run starts). mteb's prompt type (query / document) picks the checkpoint's prompt of that
    name, with mteb's priority for task-specific prompt names."""

    def __init__(self, encoder, name):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        self.encoder = encoder
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"f2llm/{name}", revision="local", similarity_fn_name=ScoringFunction.COSINE,
            embed_dim=encoder.embedder.backbone.config.hidden_size, max_tokens=encoder.max_seq_length))

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        from mteb.models.abs_encoder import get_prompt_name

        # All texts at once: the Encoder batches them by length, which pads far less than mteb's batches.
        texts = [text for batch in inputs for text in batch["text"]]
        prompt_name = get_prompt_name(self.encoder.prompts, task_metadata, prompt_type)
        return self.encoder.encode(texts, prompt_name=prompt_name, batch_size=kwargs.get("batch_size", 32))

    def similarity(self, embeddings1, embeddings2):
        # encode returns L2-normalised rows: the dot product is the cosine
        return _tensor(embeddings1) @ _tensor(embeddings2).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        return (_tensor(embeddings1) * _tensor(embeddings2)).sum(-1)


def _tensor(array):
    import torch

    return torch.as_tensor(array, dtype=torch.float32)


def read_retrieval_file(path):
    """A raw F2LLM-format parquet file -> (queries, corpus, relevant): distinct query texts, distinct
    passage and negative texts (sorted), and for each query the corpus indices of its passages (a
    query that appears on several rows has every one of their passages relevant)."""
    table = pq.read_table(path)
    for column in ("query", "passage"):
        if column not in table.column_names:
            raise UserError(f"{path}: no column '{column}' (a local task needs query, passage, negative_i optional)")
        if table.column(column).null_count:
            raise UserError(f"{path}: column '{column}' has {table.column(column).null_count} null values; "
                            "fill or drop those rows")
    rows = table.select(["query", "passage"]).to_pylist()
    negatives = [t for c in table.column_names if c.startswith("negative_") for t in table.column(c).to_pylist()]
    corpus = sorted({row["passage"] for row in rows} | {t for t in negatives if t is not None})
    index = {text: i for i, text in enumerate(corpus)}
    relevant = {}
    for row in rows:
        relevant.setdefault(row["query"], set()).add(index[row["passage"]])
    return list(relevant), corpus, [sorted(docs) for docs in relevant.values()]


def local_task(path):
    """A small mteb retrieval task (split "test") built from one raw parquet file, no download."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    name = os.path.basename(path)[: -len(".parquet")]
    queries, corpus, relevant = read_retrieval_file(path)

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name, description=f"F2LLM-format retrieval data from {path}.", reference=None,
            dataset={"path": path, "revision": "local"}, type="Retrieval", category="t2t", modalities=["text"],
            eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=None, domains=None,
            task_subtypes=None, license=None, annotations_creators=None, dialect=None, sample_creation=None,
            bibtex_citation=None)

        def load_data(self, num_proc=None, **kwargs):
            # "q"/"d" prefixes: a query id never equals a document id (some mteb tasks drop such pairs)
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(queries))], "text": queries}),
                corpus=Dataset.from_dict({"id": [f"d{j}" for j in range(len(corpus))], "text": corpus}),
                relevant_docs={f"q{i}": {f"d{j}": 1 for j in docs} for i, docs in enumerate(relevant)},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def named_tasks(names):
    """MTEB tasks by name; a benchmark name (e.g. "MTEB(eng, v2)") stands for all its tasks."""
    import mteb

    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError:
            try:
                tasks += mteb.get_benchmark(name).tasks
            except KeyError:
                raise UserError(f"--tasks: no MTEB task or benchmark named '{name}' (list them with "
                                "`mteb available-tasks` and `mteb available-benchmarks`)")
    return tasks


def load_task_data(task):
    """Download (or read from the datasets cache) a named task's data; one line if that fails."""
    try:
        task.load_data()
    except OSError as err:
        raise UserError(f"cannot load the data of MTEB task {task.metadata.name} ({str(err).splitlines()[0]}): "
                        "named tasks download from the Hugging Face Hub and need network access; "
                        "--local evaluates local parquet files offline")


def scores_row(task, result):
    """A task's TaskResult -> {column: value}: mteb's main score and the retrieval metrics it reported,
    each averaged over the task's splits and subsets as mteb aggregates its main score."""
    first = next(iter(result.scores.values()))[0]
    row = {"task": task.metadata.name, "main score": f"{result.get_score():.4f} ({task.metadata.main_score})"}
    for column, key in METRICS:
        row[column] = f"{result.get_score(getter=lambda s, key=key: s[key]):.4f}" if key in first else "-"
    return row


def print_table(rows):
    columns = ["task", "main score", *(c for c, _ in METRICS)]
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    for row in [dict(zip(columns, columns)), *rows]:
        print("  ".join(row[c].ljust(w) for c, w in zip(columns, widths)).rstrip())


def evaluate_mteb(checkpoint, *, tasks=(), local=None, output_dir="mteb_results", batch_size=32, max_seq_length=None):
    """Run MTEB on a checkpoint: the named `tasks` (or benchmarks) and a retrieval task per *.parquet of
    the folder `local`; mteb's result files go to output_dir. Returns one row per task ({column: value},
    see print_table). The keyword arguments are the command line's flags, with its defaults."""
    if not tasks and not local:
        raise UserError("nothing to evaluate: give --tasks NAME ... and/or --local DIR")
    local_files = sorted(glob.glob(os.path.join(local, "*.parquet"))) if local else []
    if local and not local_files:
        raise UserError(f"--local: no *.parquet files in {local}")

    # mteb keeps results and a default cache under ~/.cache/mteb unless told otherwise
    os.environ.setdefault("MTEB_CACHE", os.path.abspath(output_dir))
    try:
        import mteb
    except ImportError:
        raise UserError("mteb_eval.py needs the mteb package (2.x): pip install 'mteb>=2.0'")

    to_run = named_tasks(tasks) + [local_task(path) for path in local_files]
    encoder = load_encoder(checkpoint, max_seq_length=max_seq_length)
    model = MtebEncoder(encoder, os.path.basename(os.path.normpath(checkpoint)))
    cache = mteb.ResultCache(output_dir)
    rows = []
    for i, task in enumerate(to_run, 1):
        print(f"[{i}/{len(to_run)}] {task.metadata.name}", file=sys.stderr, flush=True)
        load_task_data(task)
        # "always": a checkpoint folder can be retrained under the same name, so never reuse old results
        result = mteb.evaluate(model, task, cache=cache, overwrite_strategy="always", co2_tracker=False,
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                               show_progress_bar=False)
        task.unload_data()
        rows.append(scores_row(task, result.task_results[0]))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (or any backbone with its tokenizer)")
    p.add_argument("--tasks", nargs="+", default=[], metavar="NAME", help="MTEB task or benchmark names (downloaded)")
    p.add_argument("--local", metavar="DIR", help="folder of raw *.parquet files, each run as a retrieval task")
    p.add_argument("--output_dir", default="mteb_results", help="mteb's result files and cache (MTEB_CACHE)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=None, help="default: the checkpoint's, else 1024")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    print_table(evaluate_mteb(**vars(args)))
    print(f"mteb results: {os.path.join(args.output_dir, 'results')}")


if __name__ == "__main__":
    main()
