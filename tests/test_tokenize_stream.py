"""tokenize_data_qwen.py reads, deduplicates, tokenizes and writes a file in chunks (--chunk_rows): the
outputs must be those of a direct computation on the whole file, whatever the chunks; errors must
still name the file's rows, before anything is written; a killed run must leave nothing behind.

The expected outputs are computed here from the rules, with pandas and dicts: the rows kept
(pandas' `df.sample` after one `np.random.seed`, as the published v2 script draws them), each text's
tokenizer ids cut to max_seq_length - 1 plus eos, and the distinct passages and negatives numbered
in order of first occurrence, column after column (passage, negative_1, ...).
"""
import json
import os
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import files
import tokenize_data_qwen
from conftest import assert_user_error, call_main, run_cli

MAX_LEN = 12
CHUNK_ROWS = 4  # rows per read batch: every file below spans many batches, row groups and rounds
NEGATIVES = 3
# Byte-exact dedup: texts that differ only in spaces, case or Unicode normalization are distinct.
POOL = ["kalo bakes bread", "kalo  bakes bread", "Kalo bakes bread", "mar flies planes", "café", "cafe\u0301",
        "中文文本", "a very long passage " * 8, "x", "the sea", "the sea ", "ok 👍🏽"]
SIZES = {"a": 23, "b": 9, "c": 30}  # c: a folder of two parts; b below the sample size
SAMPLE = 17


def raw_rows(name, n, start=0):
    """Texts repeated within and across columns, rows and read batches: queries from a pool of 7, the
    passages and negatives from POOL, shifted per column so that columns share texts in other rows."""
    return pd.DataFrame({
        "id": np.arange(start, start + n),
        "query": [f"{name} question {i % 7}" for i in range(start, start + n)],
        "passage": [POOL[i % len(POOL)] for i in range(start, start + n)],
        **{f"negative_{k}": [POOL[(3 * i + k) % len(POOL)] for i in range(start, start + n)]
           for k in range(1, NEGATIVES + 1)},
        "note": [f"note {i}" for i in range(start, start + n)],
        "query_input_ids": [[1, 2]] * n,  # an earlier run's ids: dropped and made again
    })


def write_raw(raw):
    """Pandas-written files (schema metadata to keep) in row groups of 5 rows, a folder of parts, and a
    large_string passage column next to string ones."""
    for name, n in SIZES.items():
        df = raw_rows(name, n)
        if name == "c":
            os.makedirs(raw / "c.parquet")
            df.iloc[:12].to_parquet(raw / "c.parquet" / "part-0.parquet", row_group_size=5)
            raw_rows(name, n - 12, start=12).to_parquet(raw / "c.parquet" / "part-1.parquet", row_group_size=5)
        else:
            table = pa.Table.from_pandas(df, preserve_index=False)
            if name == "a":
                table = table.set_column(2, "passage", table.column("passage").cast(pa.large_string()))
            pq.write_table(table, raw / f"{name}.parquet", row_group_size=5)
    return raw


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("stream_raw"))


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(f"{tiny}/backbone")


def tokenize_args(tiny, raw, out, *extra):
    return ["--model_path", f"{tiny}/backbone", "--input_dir", str(raw), "--output_dir", str(out),
            "--max_seq_length", str(MAX_LEN), "--num_proc", "1", *extra]


def kept_frames(raw, max_rows):
    """{name: the rows kept, in order}: every row, or the published script's draw."""
    frames = {name: pd.read_parquet(raw / f"{name}.parquet") for name in sorted(SIZES)}
    if max_rows is None:
        return frames
    state = np.random.get_state()
    np.random.seed(42)
    try:
        return {name: df.sample(n=max_rows).reset_index(drop=True) if len(df) > max_rows else df
                for name, df in frames.items()}
    finally:
        np.random.set_state(state)


def expected_files(df, name, layout, tok, schema):
    """{file: {column: (Arrow type, values)}} of one input's outputs, straight from the rules; `schema`:
    the input's, whose columns v1 keeps as they are."""
    def ids(texts):
        return [seq[: MAX_LEN - 1] + [tok.eos_token_id]
                for seq in tok(list(texts), add_special_tokens=False)["input_ids"]]

    tokens = pa.list_(pa.int32())
    docs = ["passage"] + [c for c in df.columns if c.startswith("negative_")]  # in order, as written here
    number = {}
    for column in docs:  # column-major: all of passage, then all of negative_1, ...
        for text in df[column]:
            number.setdefault(text, len(number))
    distinct = list(number)  # in order of the numbers
    queries = (tokens, ids(df["query"]))
    if layout == "v1":
        kept = {c: (schema.field(c).type, df[c].tolist())
                for c in df.columns if not c.endswith("_input_ids")}
        return {f"{name}.parquet": {**kept, "query_input_ids": queries,
                                    **{f"{c}_input_ids": (tokens, ids(df[c])) for c in docs}}}
    if layout == "v2":
        return {f"corpus/{name}.parquet": {"doc_id": (pa.int64(), list(range(len(distinct)))),
                                           "input_ids": (tokens, ids(distinct))},
                f"{name}.parquet": {"query_input_ids": queries,
                                    **{f"{c}_id": (pa.int64(), [number[t] for t in df[c]]) for c in docs}}}
    return {f"{name}_corpus.parquet": {"input_ids": (tokens, ids(distinct)),
                                       "doc_id": (pa.string(), [f"{name}_{i}" for i in range(len(distinct))])},
            f"{name}_query.parquet": {"query_input_ids": queries,
                                      **{f"{c}_input_ids": (pa.string(), [f"{name}_{number[t]}" for t in df[c]])
                                         for c in docs}}}


@pytest.mark.parametrize("max_rows", [None, SAMPLE], ids=["all_rows", "max_rows"])
@pytest.mark.parametrize("layout", ["v1", "v2", "published_v2"])
def test_streamed_output_equals_a_direct_computation(tiny, tok, raw, tmp_path, layout, max_rows):
    """Many chunks of 4 rows, repeated texts across chunks and columns: the same rows, row order, columns,
    values, types, doc_id numbering and schema metadata (v1: the input's; plus the record) as the rules give."""
    extra = ["--layout", layout, "--chunk_rows", str(CHUNK_ROWS)]
    extra += [] if max_rows is None else ["--max_rows_per_dataset", str(max_rows)]
    out = tmp_path / "out"
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, out, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    schemas = {name: pq.read_table(raw / f"{name}.parquet").schema for name in SIZES}
    want = {file: (name, columns) for name, df in kept_frames(raw, max_rows).items()
            for file, columns in expected_files(df, name, layout, tok, schemas[name]).items()}
    assert sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs) == sorted(want)
    for file, (name, columns) in want.items():
        table = pq.read_table(out / file)
        assert table.column_names == list(columns), file
        for column, (typ, values) in columns.items():
            assert table.schema.field(column).type == typ, (file, column)
            assert table.column(column).to_pylist() == values, (file, column)
        metadata = dict(pq.read_schema(out / file).metadata)
        record = json.loads(metadata.pop(tokenize_data_qwen.RECORD_KEY))
        assert record["layout"] == layout and ("sample" in record) == (max_rows is not None and SIZES[name] > max_rows)
        assert metadata == (schemas[name].metadata if layout == "v1" else {}), file


def test_streamed_output_equals_one_chunk_output(tiny, raw, tmp_path):
    """--chunk_rows 1 (every batch one row, every round one text) and the default give equal files,
    records included."""
    for chunk in ("1", "default"):
        extra = ["--chunk_rows", "1"] if chunk == "1" else []
        proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / chunk, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SIZES:
        one, whole = tmp_path / "1" / f"{name}.parquet", tmp_path / "default" / f"{name}.parquet"
        assert pq.read_table(one).equals(pq.read_table(whole)), name
        assert pq.read_schema(one).metadata == pq.read_schema(whole).metadata, name


@pytest.mark.parametrize("layout", ["v1", "published_v2"])
def test_parts_to_unify_are_read_as_pq_read_table_reads_them(tiny, tok, tmp_path, layout):
    """A folder whose parts differ (a string and a large_string passage column, Spark's key=value folders
    adding a column) is read through pyarrow's dataset scan, which unifies them as pq.read_table does: the
    rows and columns that pq.read_table gives, tokenized, in chunks or whole."""
    raw = tmp_path / "raw"
    for i, (lang, typ) in enumerate([("en", pa.string()), ("fr", pa.large_string()), ("en", pa.string())]):
        os.makedirs(raw / "d.parquet" / f"lang={lang}", exist_ok=True)
        pq.write_table(pa.table({"query": [f"q {i} {j}" for j in range(7)],
                                 "passage": pa.array([POOL[(i + j) % 5] for j in range(7)], typ)}),
                       raw / "d.parquet" / f"lang={lang}" / f"part-{i}.parquet")
    table = pq.read_table(raw / "d.parquet")
    outputs = {}
    for chunk in ("3", "default"):
        extra = ["--layout", layout] + (["--chunk_rows", chunk] if chunk != "default" else [])
        proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / chunk, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[chunk] = {name: pq.read_table(tmp_path / chunk / name) for name in os.listdir(tmp_path / chunk)}
    assert outputs["3"].keys() == outputs["default"].keys()
    for name, out in outputs["3"].items():
        assert out.equals(outputs["default"][name]), name
    want = expected_files(table.to_pandas(), "d", layout, tok, table.schema)
    for file, columns in want.items():
        for column, (typ, values) in columns.items():
            assert outputs["3"][file].column(column).to_pylist() == values, (file, column)
    if layout == "v1":
        assert outputs["3"]["d.parquet"].schema.field("lang").type == table.schema.field("lang").type


def test_tokenize_rounds_are_bounded_by_chunk_rows(tiny, tmp_path, monkeypatch):
    """The distinct texts are tokenized as they come, in rounds of about --chunk_rows texts (a round
    starts once a read batch brings the new texts to chunk_rows: fewer than 2 x chunk_rows), not all at
    once; each text once."""
    rounds = []
    real = tokenize_data_qwen.tokenize_unique
    monkeypatch.setattr(tokenize_data_qwen, "tokenize_unique",
                        lambda texts, *args: (rounds.append(list(texts)), real(texts, *args))[1])
    raw = tmp_path / "raw"
    os.makedirs(raw)
    pd.DataFrame({"query": [f"q {i}" for i in range(40)], "passage": [f"p {i % 25}" for i in range(40)],
                  "negative_1": [f"p {(i + 7) % 31}" for i in range(40)]}).to_parquet(raw / "d.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rounds) > 4 and all(0 < len(r) < 2 * 6 for r in rounds)
    queries = [t for r in rounds for t in r if t.startswith("q")]
    docs = [t for r in rounds for t in r if t.startswith("p")]
    assert queries == [f"q {i}" for i in range(40)]
    assert sorted(docs) == sorted({f"p {i}" for i in range(31)}) and len(docs) == 31


def test_tokens_number_texts_by_first_occurrence_under_16_byte_keys(tiny, tok):
    """Tokens: the numbers continue over calls, rounds and string / large_string arrays; a finished round's
    texts are kept as 16-byte digests, not as texts; the token ids are read back by number."""
    tokenize_data_qwen.init_worker(f"{tiny}/backbone", MAX_LEN)
    tokens = tokenize_data_qwen.Tokens(None, "t", None, round_texts=2)
    first = tokens.add(pa.array(["b", "a", "b", "c"]))  # 3 new texts: a round, tokenized
    assert tokens.round == {} and tokens.hashes.dtype == np.dtype("S16") and list(np.sort(tokens.hashes)) == list(
        tokens.hashes)
    digests = [tokenize_data_qwen.digest(text) for text in ("b", "a", "c")]
    assert dict(zip(tokens.hashes.tolist(), tokens.numbers.tolist())) == {d.rstrip(b"\0"): i for i, d in
                                                                          enumerate(digests)}
    second = tokens.add(pa.array(["c", "d", "a"], pa.large_string()))
    assert tokens.round == {"d": 3}
    tokens.finish()
    assert first.tolist() == [0, 1, 0, 2] and second.tolist() == [2, 3, 1]
    want = [seq + [tok.eos_token_id] for seq in tok(["b", "a", "c", "d"], add_special_tokens=False)["input_ids"]]
    assert tokens.take(np.array([3, 0, 2, 0, 1])).to_pylist() == [want[i] for i in (3, 0, 2, 0, 1)]
    assert [start for start, _ in tokens.batches()] == [0, 3]  # two rounds: b, a, c then d


@pytest.mark.parametrize("extra", [[], ["--max_rows_per_dataset", "5"]], ids=["all_rows", "max_rows"])
def test_bad_texts_are_named_by_file_row_across_chunks(tiny, tmp_path, extra):
    """Blank texts spread over many read batches are counted and named by their row in the file (with
    --max_rows_per_dataset too: the whole file is checked before the rows are drawn); nothing is written."""
    raw = tmp_path / "raw"
    os.makedirs(raw)
    passages = [" " if i in (2, 5, 7, 11, 13, 17, 19) else f"p {i}" for i in range(24)]
    pd.DataFrame({"query": [f"q {i}" for i in range(24)], "passage": passages}).to_parquet(raw / "d.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "3", *extra))
    assert_user_error(proc, str(raw / "d.parquet"), "'passage' 7 (rows 2, 5, 7, 11, 13, ...)")
    assert os.listdir(tmp_path / "out") == []


def test_invalid_utf8_in_a_later_chunk_is_named_by_file_row(tiny, tmp_path):
    raw = tmp_path / "raw"
    os.makedirs(raw)
    values = [b"\xff" if i in (9, 10) else f"p {i}".encode() for i in range(12)]
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    bad = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                           pa.py_buffer(b"".join(values))])
    pq.write_table(pa.table({"query": [f"q {i}" for i in range(12)], "passage": bad}), raw / "d.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "4"))
    assert_user_error(proc, str(raw / "d.parquet"), "'passage'", "2 text(s)", "not valid UTF-8", "rows 9, 10")
    assert os.listdir(tmp_path / "out") == []


def test_corrupt_page_in_a_later_row_group_is_a_user_error(tiny, tmp_path):
    """A page that cannot be decoded, behind an intact footer and readable first row groups, is found by the
    reading pass: one error line, nothing written."""
    raw = tmp_path / "raw"
    os.makedirs(raw)
    table = pa.table({"query": [f"q {i}" for i in range(40)], "passage": [f"p {i}" for i in range(40)]})
    pq.write_table(table, raw / "d.parquet", row_group_size=10, compression="none")
    offset = pq.ParquetFile(raw / "d.parquet").metadata.row_group(3).column(1).data_page_offset
    with open(raw / "d.parquet", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 8)  # the page header
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "5"))
    assert_user_error(proc, str(raw / "d.parquet"), "not a readable parquet file")
    assert os.listdir(tmp_path / "out") == []


KILL_WHILE_TOKENIZING = """
import os, signal, sys
import tokenize_data_qwen
calls = []
real = tokenize_data_qwen.tokenize_chunk
def chunk(texts):  # the third worker task: token ids of earlier rounds are in the scratch file
    calls.append(texts)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(texts)
tokenize_data_qwen.tokenize_chunk = chunk
tokenize_data_qwen.main(sys.argv[1:])
"""


@pytest.mark.parametrize("layout", ["v1", "published_v2"])
def test_kill_while_tokenizing_leaves_no_file(tiny, raw, tmp_path, layout):
    """SIGKILL (no cleanup possible) while the distinct texts are being tokenized, their ids partly in the
    scratch file: the output folder is left empty (the scratch file has no name), and the same command
    then writes the files of an uninterrupted run."""
    args = tokenize_args(tiny, raw, tmp_path / "out", "--layout", layout, "--chunk_rows", "3")
    killed = run_cli("-c", KILL_WHILE_TOKENIZING, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert os.listdir(tmp_path / "out") == []
    assert call_main(tokenize_data_qwen.main, args).returncode == 0
    reference = tokenize_args(tiny, raw, tmp_path / "reference", "--layout", layout)
    assert call_main(tokenize_data_qwen.main, reference).returncode == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "reference"))
    for name in os.listdir(tmp_path / "reference"):
        assert pq.read_table(tmp_path / "out" / name).equals(pq.read_table(tmp_path / "reference" / name)), name


def test_row_groups_of_a_streamed_file_are_even_and_bounded(tiny, raw, tmp_path, monkeypatch):
    """Written table by table, the row groups still hold about files.ROW_GROUP_BYTES: all of one size (set
    by the first table) but the last."""
    monkeypatch.setattr(files, "ROW_GROUP_BYTES", 1_500)
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pq.ParquetFile(tmp_path / "out" / "c.parquet")
    rows = [out.metadata.row_group(i).num_rows for i in range(out.metadata.num_row_groups)]
    sizes = [out.read_row_group(i).nbytes for i in range(out.metadata.num_row_groups)]
    assert len(rows) > 2 and len(set(rows[:-1])) == 1 and rows[-1] <= rows[0] and sum(rows) == SIZES["c"]
    assert max(sizes) < 2 * 1_500, sizes


def test_chunk_rows_below_1_is_a_user_error_and_help_explains_it(tiny, raw, tmp_path):
    proc = call_main(tokenize_data_qwen.main, tokenize_args(tiny, raw, tmp_path / "out", "--chunk_rows", "0"))
    assert_user_error(proc, "--chunk_rows must be at least 1 (got 0)")
    assert not os.path.exists(tmp_path / "out")
    text = " ".join(call_main(tokenize_data_qwen.main, ["--help"]).stdout.split())
    assert "--chunk_rows N" in text and "bounds the memory" in text
