"""The whole pipeline on an embedded default, offline, on the CPU (`make demo`).

Builds a tiny random-init Qwen3 backbone and a byte-level BPE tokenizer with Qwen3's special
tokens, writes sample raw data in the F2LLM format for all three task types, then runs the real
commands: tokenize, a one-process cache warm-up, and training through `accelerate launch`. It
evaluates retrieval (nDCG@10, MRR@10, recall@10 with evaluate.py) on held-out data before and
after training, printing both tables, and checks that sentence-transformers loads the final
checkpoint and gives the project encoder's vectors.

The builders are also what the tests use to make their tiny models and data.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SYLLABLES = ["ka", "lo", "mar", "vel", "tin", "zor", "pa", "qui", "ren", "sol", "dra", "mi", "ber", "fo", "gal",
             "hu", "jen", "kos", "lum", "nev", "or", "pri", "sa", "tor", "ul", "vin", "wes", "xa", "yel", "zu"]
JOBS = ["baker", "pilot", "farmer", "painter", "doctor", "teacher", "sailor", "miner", "singer", "tailor"]
CITIES = ["north harbor", "green valley", "stone bridge", "river town", "old market", "high field",
          "east port", "sand hill", "white lake", "iron gate"]
HOBBIES = ["chess", "fishing", "gardening", "running", "poetry", "cooking", "climbing", "dancing"]
QUERY_TEMPLATES = ["who is {name}", "tell me about {name}", "what does {name} do for a living",
                   "where does {name} live", "{name}"]
TOPICS = {
    "card": ["card", "blocked", "pin", "atm", "lost", "stolen", "declined", "contactless"],
    "transfer": ["transfer", "pending", "account", "sent", "received", "bank", "wire", "beneficiary"],
    "exchange": ["exchange", "rate", "currency", "euro", "dollar", "fee", "convert", "abroad"],
    "refund": ["refund", "merchant", "return", "money", "back", "charged", "twice", "dispute"],
}
POSITIVE_WORDS = ["great", "wonderful", "loved", "brilliant", "moving", "superb", "delightful", "fun"]
NEGATIVE_WORDS = ["awful", "boring", "hated", "dull", "terrible", "weak", "tedious", "bad"]
FILLER = ["the", "a", "this", "movie", "film", "was", "really", "and", "very", "plot", "acting", "i"]


# ---- tiny backbone and tokenizer -------------------------------------------------------------

def build_tokenizer(out_dir, corpus, vocab_size=1024, base=False):
    """A byte-level BPE tokenizer trained on `corpus`, with Qwen3's special tokens.

    base=False: eos <|im_end|>, pad <|endoftext|> (post-trained Qwen3); base=True: both <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    eos = "<|endoftext|>" if base else "<|im_end|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_backbone(out_dir, vocab_size, hidden_size=64, num_layers=2, num_heads=4, seed=0):
    """A random-init Qwen3 causal LM saved like a real checkpoint (AutoModel drops its LM head)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
                         head_dim=hidden_size // num_heads, max_position_embeddings=2048, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


# ---- sample data in the F2LLM format ----------------------------------------------------------

def _name(rng):
    return "".join(rng.sample(SYLLABLES, rng.choice([2, 3])))


def _people(rng, n, taken=()):
    names, people = set(taken), []
    while len(people) < n:
        name = _name(rng)
        if name not in names:
            names.add(name)
            people.append((name, rng.choice(JOBS), rng.choice(CITIES), rng.choice(HOBBIES)))
    return people


def _bio(person):
    name, job, city, hobby = person
    return f"{name} is a {job} from {city} who enjoys {hobby}."


def retrieval_rows(rng, people, num_negatives):
    """Query about a person; positive: their bio; hard negatives: other people's bios."""
    rows = []
    for i, person in enumerate(people):
        others = rng.sample(people[:i] + people[i + 1 :], num_negatives)
        row = {"query": rng.choice(QUERY_TEMPLATES).format(name=person[0]), "passage": _bio(person)}
        row.update({f"negative_{j + 1}": _bio(o) for j, o in enumerate(others)})
        rows.append(row)
    return rows


def _topic_text(rng, topic):
    words = rng.sample(TOPICS[topic], 3) + rng.sample(["my", "the", "why", "is", "how", "do", "i", "a"], 3)
    rng.shuffle(words)
    return " ".join(words)


def clustering_rows(rng, n, num_negatives):
    """Query and positive from one topic; negatives from the others."""
    rows = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        row = {"query": _topic_text(rng, topic), "passage": _topic_text(rng, topic)}
        for j in range(num_negatives):
            row[f"negative_{j + 1}"] = _topic_text(rng, rng.choice([t for t in TOPICS if t != topic]))
        rows.append(row)
    return rows


def classification_rows(rng, n):
    """A review; positive: its label; the one negative: the other label."""
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.sample(POSITIVE_WORDS if label else NEGATIVE_WORDS, 2) + rng.sample(FILLER, 5)
        rng.shuffle(words)
        pos, neg = ("positive", "negative") if label else ("negative", "positive")
        rows.append({"query": " ".join(words), "passage": pos, "negative_1": neg})
    return rows


def write_parquet(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_sample_data(raw_dir, eval_dir, seed=0, people_per_dataset=600, num_negatives=10):
    """Training data for all three task types under published dataset names, and held-out
    retrieval data about people never seen in training. Returns every text, for the tokenizer."""
    rng = random.Random(seed)
    train_people = _people(rng, 2 * people_per_dataset)
    eval_people = _people(rng, 200, taken=[p[0] for p in train_people])
    tables = {
        os.path.join(raw_dir, "msmarco.parquet"): retrieval_rows(rng, train_people[:people_per_dataset], num_negatives),
        os.path.join(raw_dir, "natural_questions.parquet"): retrieval_rows(rng, train_people[people_per_dataset:],
                                                                           num_negatives),
        os.path.join(raw_dir, "banking77.parquet"): clustering_rows(rng, 300, num_negatives),
        os.path.join(raw_dir, "imdb.parquet"): classification_rows(rng, 300),
        os.path.join(eval_dir, "people.parquet"): retrieval_rows(rng, eval_people, num_negatives),
    }
    texts = []
    for path, rows in tables.items():
        write_parquet(rows, path)
        texts += [t for row in rows for t in row.values()]
    return texts


# ---- the demo ---------------------------------------------------------------------------------

def _run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, cwd=REPO_DIR, **kw)


def mean_mrr(table):
    """The mean MRR@10 from evaluate.py's output: its table's header row and last row, "mean"."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("dataset ")).split()
    return float(lines[-1].split()[header.index("MRR@10")])


def _mrr(checkpoint, eval_dir):
    """Evaluate every row of the held-out files (none of them was trained on); print the table."""
    out = _run([sys.executable, "evaluate.py", checkpoint, eval_dir, "--split", "all"], capture_output=True,
               text=True).stdout
    print(out, end="")
    return mean_mrr(out)


def _compare_with_sentence_transformers(checkpoint, texts):
    """The checkpoint loaded by sentence-transformers gives the project encoder's vectors."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: skipping the SentenceTransformer check")
        return
    from model import load_encoder

    ours = load_encoder(checkpoint, device="cpu").encode(texts)
    theirs = SentenceTransformer(checkpoint, device="cpu").encode(texts, convert_to_tensor=True)
    cosine = (ours * theirs.float()).sum(-1).min().item()
    print(f"SentenceTransformer({checkpoint}) on {len(texts)} texts: lowest cosine to our encoder {cosine:.6f}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the F2LLM pipeline end to end on a tiny offline model.")
    p.add_argument("--work_dir", default="demo_out", help="where everything the demo makes goes")
    p.add_argument("--config", default="configs/demo.json", help="training config (paths under demo_out)")
    args = p.parse_args(argv)
    work = os.path.join(REPO_DIR, args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    texts = write_sample_data(os.path.join(work, "raw"), os.path.join(work, "eval"))
    tokenizer = build_tokenizer(os.path.join(work, "backbone"), texts)
    build_backbone(os.path.join(work, "backbone"), len(tokenizer))
    print(f"built a tiny Qwen3 backbone and tokenizer in {work}/backbone")

    _run([sys.executable, "tokenize_data_qwen.py", "--model_path", f"{work}/backbone", "--input_dir", f"{work}/raw",
          "--output_dir", f"{work}/tokenized", "--max_seq_length", "128", "--num_proc", "2"])
    _run([sys.executable, "run.py", "--config", args.config, "--prepare_only"])
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    train = _run([accelerate, "launch", "--config_file", "configs/accelerate_cpu.yaml", "run.py", "--config",
                  args.config], stdout=subprocess.PIPE, text=True)
    print(train.stdout, end="")
    final = [line for line in train.stdout.splitlines() if line.startswith("final checkpoint: ")][-1]
    final = os.path.join(REPO_DIR, final[len("final checkpoint: "):])

    before = _mrr(f"{work}/backbone", f"{work}/eval")
    after = _mrr(final, f"{work}/eval")
    print(f"held-out retrieval MRR@10: before training {before:.4f}, after training {after:.4f}")
    _compare_with_sentence_transformers(final, texts[:64])
    print(f"final checkpoint: {final}")


if __name__ == "__main__":
    main()
