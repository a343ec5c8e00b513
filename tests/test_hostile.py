"""Property-based tests (hypothesis) on hostile input: texts, token tables and broken parquet files.

Every outcome must be either a clean result or a clear user error (`UserError`; through a script's
main(): exit status 2, one `error:` line naming the file, no traceback): never a traceback, a hang
or a silently dropped row. Covered: `data.tokenize` and the tokenizer script's table path
(`check_texts`, `tokenize_table` through `main`) on hostile texts; `data.collate` on random token
tables; malformed parquet files for the tokenizer script and for the training side's checks
(`data.token_columns`, `data.check_datasets` then `data.load_splits` and `data.collate`).

The example counts are small and the examples derandomized (the same ones on every run, so CI
never finds a new failure by chance); for a longer hunt with fresh random examples, scale the
counts: `HOSTILE_EXAMPLES=20 python -m pytest -q tests/test_hostile.py`.

The broken token files that these properties found (BROKEN_TOKEN_FILES, at the end) each failed
with a traceback or a silent garbage id before data.py checked types, nulls, empty lists, ids and
unreadable pages; they are kept as regression cases.
"""
import operator
import os
import signal
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import data
import tokenize_data_qwen
from config import Config
from conftest import assert_user_error, call_main
from errors import UserError
from model import load_tokenizer

SCALE = int(os.environ.get("HOSTILE_EXAMPLES", "1"))
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = 2  # the eos id given to collate in the token-table tests (any id works)


def hostile(max_examples):
    """Small example counts, no deadline (tokenizing 200k characters takes a while), no example
    database on disk; derandomized unless HOSTILE_EXAMPLES asks for a longer, random hunt."""
    return settings(max_examples=max_examples * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def no_hang():
    """A test that runs past 120 s (the whole file takes well under 60 s) fails instead of hanging."""
    def hung(signum, frame):
        raise AssertionError("hung: still running after 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120 * SCALE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(f"{tiny}/backbone")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hostile"))


def fresh(workdir):
    """A new empty folder per hypothesis example (function-scoped fixtures do not reset between them)."""
    return tempfile.mkdtemp(dir=workdir)


# ---- hostile texts -----------------------------------------------------------------------------

ATOMS = [
    "", " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u2029", "\u3000",  # spaces
    "\x00", "\x01", "\x1b[31m", "\x7f", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u202e", "\ufffd",  # control
    "kalo is a baker", "who", "x",
    "中文文本", "日本語のテキスト", "한국어", "مرحبا بالعالم", "שלום", "Ελληνικά", "हिन्दी",  # scripts, RTL
    "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "👍🏽", "🇺🇳",  # emoji: ZWJ sequences, modifiers, flags
    "e\u0301", "a\u0300\u0301\u0302\u0303\u0304", "Z\u0335\u031b\u0324a\u0336l\u0334g\u0338o",  # combining marks
    "\U0010fffd", "\U0001d54f", "\\", "\"'`", "{}[]<>",
    *SPECIAL_TOKENS,
]
LONG_UNITS = ["a", "ab ", "中", "👨\u200d👩\u200d👧\u200d👦", "\x00", " \u200b", "e\u0301"]

atom_runs = st.lists(st.sampled_from(ATOMS), max_size=6).map("".join)
random_unicode = st.text(max_size=40)  # any code point but surrogates (hypothesis' default alphabet)
long_runs = st.builds(operator.mul, st.sampled_from(LONG_UNITS), st.integers(1, 3000))
hostile_text = st.one_of(atom_runs, random_unicode, long_runs)
VERY_LONG = ["a" * 200_000, "中" * 200_000, "👨\u200d👩\u200d👧\u200d👦" * 30_000]  # ~0.3-0.9 s each


def blank(text):
    """What the tokenizer script rejects: null, empty or whitespace only (Python's and Arrow's
    idea of whitespace agree on every code point)."""
    return text is None or text.strip() == ""


def own_ids(tokenizer, text):
    return tokenizer([text], add_special_tokens=False)["input_ids"][0]


def assert_clean_ids(seq, tokenizer, max_seq_length):
    assert 1 <= len(seq) <= max_seq_length, len(seq)
    assert seq[-1] == tokenizer.eos_token_id
    assert all(0 <= i < len(tokenizer) for i in seq)


@hostile(40)
@given(texts=st.lists(hostile_text, min_size=1, max_size=6), max_seq_length=st.integers(2, 48))
@example(texts=VERY_LONG, max_seq_length=1024)
@example(texts=["", " ", "\x00", "\u200b", "\r\n\u2028"], max_seq_length=2)
def test_data_tokenize_hostile_texts(tok, texts, max_seq_length):
    """data.tokenize: every text, whatever it holds, gives its own ids cut to max_seq_length - 1,
    then eos; eos occurs nowhere else unless the text spells out a special token."""
    ids = data.tokenize(tok, texts, max_seq_length)
    assert len(ids) == len(texts)
    for text, seq in zip(texts, ids):
        assert_clean_ids(seq, tok, max_seq_length)
        if len(text) <= 50_000:  # (the 200k ones: too slow to tokenize twice; they give max_seq_length ids)
            assert seq == own_ids(tok, text)[: max_seq_length - 1] + [tok.eos_token_id]
        else:
            assert len(seq) == max_seq_length
        if not any(s in text for s in SPECIAL_TOKENS):
            assert tok.eos_token_id not in seq[:-1]


def test_special_token_strings_in_texts_become_special_ids(tok):
    """Not a crash, but worth knowing: like the published code, the tokenizer parses special-token
    strings inside a text (add_special_tokens=False only stops adding them), so a text quoting
    "<|im_end|>" gets the eos id in its middle. Harmless for packed or length-masked batches (the
    pooled token is the appended eos); `"attention_mask_from": "pad_token_id"` would mask such
    tokens when they equal pad. `split_special_tokens=True` in data.tokenize would change it."""
    seq = data.tokenize(tok, ["see <|im_end|> here"], 32)[0]
    assert seq[-1] == tok.eos_token_id and tok.eos_token_id in seq[:-1]


# ---- the tokenizer script on hostile texts -----------------------------------------------------

def tokenizer_args(tiny, inp, out, max_seq_length=32, *extra):
    return ["--model_path", f"{tiny}/backbone", "--input_dir", str(inp), "--output_dir", str(out),
            "--max_seq_length", str(max_seq_length), "--num_proc", "1", *extra]


@st.composite
def text_tables(draw, cells=st.one_of(st.none(), hostile_text, hostile_text, hostile_text)):
    """A raw F2LLM table: 0-4 rows, query, passage and 0-3 negatives, string or large_string columns,
    cells hostile texts or null."""
    rows = draw(st.integers(0, 4))
    names = ["query", "passage"] + [f"negative_{i}" for i in range(1, draw(st.integers(0, 3)) + 1)]
    return pa.table({name: pa.array(draw(st.lists(cells, min_size=rows, max_size=rows)),
                                    draw(st.sampled_from([pa.string(), pa.large_string()])))
                     for name in names})


def check_script_outcome(proc, table, in_path, out_path, tokenizer, max_seq_length):
    """Exit 2 with one error line naming the file and nothing written, or exit 0 with every row
    kept and clean ids: the property every tokenizer-script test here asserts."""
    if proc.returncode != 0:
        line = assert_user_error(proc, str(in_path))
        assert proc.returncode == 2, proc.stderr
        assert not os.path.exists(out_path)
        out_dir = os.path.dirname(out_path)
        assert not os.path.isdir(out_dir) or not [f for f in os.listdir(out_dir) if ".tmp-" in f]
        return line
    assert "Traceback" not in proc.stderr, proc.stderr
    out = pq.read_table(out_path)
    assert out.num_rows == table.num_rows  # nothing dropped
    for name in data.text_columns(table.schema, in_path):
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
        for text, seq in zip(out.column(name).to_pylist(), out.column(f"{name}_input_ids").to_pylist()):
            assert_clean_ids(seq, tokenizer, max_seq_length)
            assert seq == own_ids(tokenizer, text)[: max_seq_length - 1] + [tokenizer.eos_token_id]
    return None


@hostile(30)
@given(table=text_tables(), max_seq_length=st.integers(2, 32))
def test_tokenizer_script_on_hostile_texts(tiny, tok, workdir, table, max_seq_length):
    """main(): a file with no rows, or with a null or blank text, is refused with one line (that names
    exactly the bad columns); any other file is tokenized whole, each text to its own ids plus eos."""
    root = fresh(workdir)
    os.makedirs(f"{root}/in")
    pq.write_table(table, f"{root}/in/hostile.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{root}/in", f"{root}/out", max_seq_length))
    line = check_script_outcome(proc, table, f"{root}/in/hostile.parquet", f"{root}/out/hostile.parquet", tok,
                                max_seq_length)
    if table.num_rows == 0:  # an empty file is refused too: nothing would be trained from it
        assert line is not None and "0 rows" in line
        return
    bad = [c for c in table.column_names if any(blank(t) for t in table.column(c).to_pylist())]
    assert (line is not None) == bool(bad)
    if bad:
        assert "null or empty texts" in line
        for c in table.column_names:
            assert (f"'{c}'" in line) == (c in bad), (c, line)


@hostile(60)
@given(table=text_tables())
def test_check_texts_refuses_exactly_the_blank_cells(table):
    """check_texts raises iff a cell is null or blank, and counts them per column."""
    columns = table.column_names
    counts = {c: sum(blank(t) for t in table.column(c).to_pylist()) for c in columns}
    if not any(counts.values()):
        data.check_texts(table, columns, "f.parquet")
        return
    with pytest.raises(UserError) as err:
        data.check_texts(table, columns, "f.parquet")
    for c in columns:
        assert (f"'{c}' {counts[c]} (rows" in str(err.value)) == (counts[c] > 0), (c, str(err.value))


def test_tokenizer_script_on_very_long_texts(tiny, tok, workdir):
    """200k-character queries (one word, CJK, ZWJ emoji) tokenize to exactly max_seq_length ids
    each, in a couple of seconds; the row stays aligned with its short passage."""
    root = fresh(workdir)
    table = pa.table({"query": VERY_LONG, "passage": ["short one", "中文", "\x00 x"]})
    os.makedirs(f"{root}/in")
    pq.write_table(table, f"{root}/in/long.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{root}/in", f"{root}/out", 1024))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pq.read_table(f"{root}/out/long.parquet")
    assert out.column("query").to_pylist() == VERY_LONG
    for seq in out.column("query_input_ids").to_pylist():
        assert_clean_ids(seq, tok, 1024)
        assert len(seq) == 1024
    assert out.column("passage_input_ids").to_pylist() == [
        own_ids(tok, t) + [tok.eos_token_id] for t in table.column("passage").to_pylist()]


def test_tokenize_table_without_rows(tiny):
    """tokenize_table on zero rows: the id columns are added, empty (clean; training refuses the file)."""
    tokenize_data_qwen.init_worker(f"{tiny}/backbone", 8)
    table = pa.table({"query": pa.array([], pa.string()), "passage": pa.array([], pa.large_string())})
    out = tokenize_data_qwen.tokenize_table(table, ["query", "passage"], None, "t")
    assert out.num_rows == 0
    assert out.schema.field("passage_input_ids").type == pa.list_(pa.int32())


# ---- collate on random token tables ------------------------------------------------------------

@st.composite
def token_tables(draw):
    """A batch as ArrowRows hands it over: 1-6 rows of query / passage / negative_i token lists
    (1-20 ids each, so often longer than max_seq_length), in any column order, any list type, in
    1-3 chunks; with num_neg <= the negatives available."""
    bs = draw(st.integers(1, 6))
    available = draw(st.integers(0, 5))
    names = ["query_input_ids", "passage_input_ids"] + [f"negative_{i}_input_ids" for i in range(1, available + 1)]
    names = draw(st.permutations(names))
    seqs = st.lists(st.integers(0, 150_000), min_size=1, max_size=20)
    columns = {name: draw(st.lists(seqs, min_size=bs, max_size=bs)) for name in names}
    list_type = draw(st.sampled_from([pa.list_(pa.int32()), pa.list_(pa.int64()), pa.large_list(pa.int32())]))
    table = pa.table({name: pa.array(columns[name], list_type) for name in names})
    cuts = sorted(draw(st.sets(st.integers(1, bs - 1), max_size=2))) if bs > 1 else []
    table = pa.concat_tables([table.slice(a, b - a) for a, b in zip([0] + cuts, cuts + [bs])])
    return table, columns, draw(st.integers(0, available)), draw(st.integers(2, 12)), draw(
        st.one_of(st.none(), st.integers(0, 2**32 - 1)))


@hostile(150)
@given(case=token_tables())
def test_collate_properties(case):
    """Lengths add up to the ids, one sequence per query / positive / negative in the documented
    order, each the original cut to max_seq_length with eos last; sampled negatives are distinct."""
    table, columns, num_neg, max_seq_length, seed = case
    bs = table.num_rows
    rng = None if seed is None else np.random.default_rng(seed)
    batch = data.collate(table, num_neg=num_neg, max_seq_length=max_seq_length, eos_id=EOS, rng=rng)
    ids, lengths = batch["input_ids"].tolist(), batch["lengths"].tolist()
    assert batch["num_queries"] == bs and batch["num_neg"] == num_neg
    assert len(lengths) == bs * (2 + num_neg)
    assert sum(lengths) == len(ids)
    assert all(1 <= n <= max_seq_length for n in lengths)
    ends = np.cumsum(lengths)
    sequences = [ids[e - n: e] for e, n in zip(ends, lengths)]
    picks = data.pick_negatives(bs, len(columns) - 2, num_neg, None if seed is None else np.random.default_rng(seed))
    for row in picks:
        assert len(set(row.tolist())) == num_neg and all(0 <= j < len(columns) - 2 for j in row)
    originals = (columns["query_input_ids"] + columns["passage_input_ids"]
                 + [columns[f"negative_{j + 1}_input_ids"][r] for r in range(bs) for j in picks[r]])
    for seq, orig in zip(sequences, originals):
        assert seq[-1] == EOS
        assert seq == orig[: min(len(orig), max_seq_length) - 1] + [EOS]


# ---- malformed parquet files -------------------------------------------------------------------

def parquet_bytes(table, **kwargs):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue().to_pybytes()


GOOD_RAW = pa.table({"query": ["who is kalo", "who is mar", "中文?"], "passage": ["kalo bakes", "mar flies", "是的"],
                     "negative_1": ["mar flies", "kalo bakes", "no"]})
GOOD_TOKENS = pa.table({name: pa.array([[5, 6, EOS], [7, EOS], [8, 9, 10, EOS], [11, EOS]], pa.list_(pa.int32()))
                        for name in ("query_input_ids", "passage_input_ids", "negative_1_input_ids")})


def invalid_utf8_strings(values):
    """A string array holding the given raw bytes, unvalidated (as a careless writer produces)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


@st.composite
def broken_files(draw, good, kinds=("random", "magic", "empty", "truncated", "flipped", "folder")):
    """(kind, how to make it): bytes for a file, or None for a folder named *.parquet."""
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return kind, draw(st.binary(max_size=3000))
    if kind == "magic":
        return kind, b"PAR1" + draw(st.binary(max_size=2000)) + b"PAR1"
    if kind == "empty":
        return kind, b""
    if kind == "folder":
        return kind, None
    raw = parquet_bytes(good, compression=draw(st.sampled_from(["none", "snappy", "zstd"])),
                        use_dictionary=draw(st.booleans()))
    if kind == "truncated":
        return kind, raw[: draw(st.integers(0, len(raw) - 1))]
    out = bytearray(raw)  # flipped: a few bytes anywhere changed
    for _ in range(draw(st.integers(1, 6))):
        out[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return kind, bytes(out)


def make_file(path, content):
    if content is None:
        os.makedirs(path)
    elif isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        with open(path, "wb") as f:
            f.write(content)


def raw_variants():
    """Readable files with something wrong (or surprising) in their columns, for the tokenizer."""
    n = GOOD_RAW.num_rows
    good = dict(zip(GOOD_RAW.column_names, GOOD_RAW.columns))
    wrong_values = {
        "ints": pa.array(range(n)), "list<string>": pa.array([["a"]] * n), "binary": pa.array([b"x"] * n),
        "null type": pa.nulls(n), "dictionary": pa.array(["a"] * n).dictionary_encode(),
        "struct": pa.array([{"a": "b"}] * n), "bool": pa.array([True] * n), "floats": pa.array([0.5] * n),
    }
    return st.one_of(
        st.builds(lambda col, typ: pa.table({**good, col: wrong_values[typ]}),
                  st.sampled_from(GOOD_RAW.column_names), st.sampled_from(sorted(wrong_values))),
        st.builds(lambda col: GOOD_RAW.drop_columns([col]), st.sampled_from(["query", "passage"])),
        st.just(GOOD_RAW.rename_columns(["query", "passage", "negative_2"])),  # a gap
        st.just(GOOD_RAW.slice(0, 0)),  # zero rows
        st.just(pa.table({})),  # no columns
        st.builds(lambda col, row: GOOD_RAW.set_column(
            GOOD_RAW.column_names.index(col), col,
            invalid_utf8_strings([b"\xff\xfe" if r == row else b"ok" for r in range(n)])),
            st.sampled_from(GOOD_RAW.column_names), st.integers(0, n - 1)),
        st.builds(lambda col: GOOD_RAW.append_column(col, GOOD_RAW.column(0)),  # a repeated column name
                  st.sampled_from(GOOD_RAW.column_names)),
        st.just(GOOD_RAW.append_column("extra", GOOD_RAW.column(0)).append_column("extra", GOOD_RAW.column(1))),
        st.builds(lambda value: GOOD_RAW.append_column("extra", pa.array([value] * n)),  # extra columns are kept
                  st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=5), st.none())),
        st.just(GOOD_RAW.append_column("query_input_ids", pa.array(["stale"] * n))),  # old ids are replaced
    )


@hostile(50)
@given(case=st.one_of(broken_files(GOOD_RAW), st.tuples(st.just("table"), raw_variants())))
def test_tokenizer_script_on_malformed_parquet(tiny, tok, workdir, case):
    """main() on a broken or odd raw file: exit 2 with one error line naming it, or a clean output."""
    kind, content = case
    root = fresh(workdir)
    os.makedirs(f"{root}/in")
    path = f"{root}/in/broken.parquet"
    make_file(path, content)
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{root}/in", f"{root}/out"))
    if proc.returncode == 0:  # then the file really was readable: compare with what pyarrow reads
        table = pq.read_table(path)
    else:
        table = None
    check_script_outcome(proc, table, path, f"{root}/out/broken.parquet", tok, 32)


def test_tokenizer_script_on_column_name_that_is_not_utf8(tiny, tok, workdir):
    """A byte of the footer changed inside a column name (found by the malformed-parquet property):
    pyarrow reads the file, then `schema.names` raises UnicodeDecodeError. It was a traceback."""
    root = fresh(workdir)
    os.makedirs(f"{root}/in")
    raw = parquet_bytes(GOOD_RAW.append_column("extra_col", GOOD_RAW.column(0)))
    make_file(f"{root}/in/bad_name.parquet", raw.replace(b"extra_col", b"extra_co\x80"))
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{root}/in", f"{root}/out"))
    assert proc.returncode == 2
    assert_user_error(proc, f"{root}/in/bad_name.parquet", "column name is not valid UTF-8")
    with pytest.raises(UserError, match="not a readable parquet file"):  # the training side's check
        data.token_columns(f"{root}/in/bad_name.parquet", 1)


def test_tokenizer_script_on_invalid_utf8(tiny, workdir):
    """Bytes that are not UTF-8 in a string column (parquet readers do not validate them) are one
    error line naming the column and rows. It was Arrow's 'Invalid UTF8 sequence' traceback."""
    root = fresh(workdir)
    os.makedirs(f"{root}/in")
    pq.write_table(GOOD_RAW.set_column(1, "passage", invalid_utf8_strings([b"ok", b"caf\xe9", b"\xc3("])),
                   f"{root}/in/latin1.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{root}/in", f"{root}/out"))
    assert proc.returncode == 2
    assert_user_error(proc, f"{root}/in/latin1.parquet", "'passage'", "2 text(s)", "not valid UTF-8", "rows 1, 2")


# ---- the training side: token_columns, check_datasets, load_splits, collate ------------------------

def training_outcome(folder, num_hard_neg=1, max_seq_length=8):
    """What run.py does with a data folder before and while training: check every file, split it,
    collate all of its rows. Returns 'clean' or the UserError; any other exception escapes."""
    cfg = Config(model_path="unused", train_data_path=folder, cache_dir=os.path.join(folder, "cache"),
                 num_hard_neg=num_hard_neg, max_seq_length=max_seq_length, validation_fraction=0.5)
    try:
        checked = data.check_datasets(cfg, {"msmarco": "retrieval"})
        for _, path, task, columns in checked:
            train, valid = data.load_splits(path, columns, cfg)
            assert len(train) + len(valid) == pq.read_metadata(path).num_rows  # nothing dropped
            for split, train_side in ((train, True), (valid, False)):
                cfg.train_batch_size = len(split)
                batch = next(iter(data.make_loader(split, task, cfg, EOS, train=train_side, name=path)))
                lengths = batch["lengths"].tolist()
                assert all(1 <= n <= max_seq_length for n in lengths), lengths
                assert sum(lengths) == len(batch["input_ids"])
                assert (batch["input_ids"][np.cumsum(lengths) - 1] == EOS).all()
                assert (batch["input_ids"] >= 0).all()
    except UserError as err:
        return err
    return "clean"


def token_variants():
    """Readable token files with a missing column or too few negatives: clear errors today."""
    return st.one_of(
        st.builds(lambda col: GOOD_TOKENS.drop_columns([col]), st.sampled_from(GOOD_TOKENS.column_names)),
        st.just(GOOD_TOKENS.slice(0, 1)),  # one row: no validation row
        st.just(pa.table({})),
        st.just(GOOD_TOKENS.append_column("extra", pa.array(["x"] * GOOD_TOKENS.num_rows))),
        st.just(GOOD_TOKENS),
    )


@hostile(30)
@given(case=st.one_of(broken_files(GOOD_TOKENS, kinds=("random", "magic", "empty", "truncated", "folder")),
                      st.tuples(st.just("table"), token_variants())))
def test_training_side_on_malformed_token_files(workdir, case):
    """check_datasets -> load_splits -> collate on a broken token file: a UserError naming the file,
    or a clean pass over every row. (Not "flipped": bytes changed inside a data page, behind an
    intact footer, pass token_columns and fail in load_splits, a known bug below.)"""
    kind, content = case
    folder = fresh(workdir)
    path = os.path.join(folder, "msmarco.parquet")
    make_file(path, content)
    outcome = training_outcome(folder)
    if outcome != "clean":
        assert path in str(outcome), outcome


@hostile(60)
@given(content=st.one_of(st.binary(max_size=2000), broken_files(GOOD_TOKENS).map(lambda kc: kc[1])))
def test_token_columns_on_random_files(workdir, content):
    """data.token_columns: a list of columns or a UserError naming the file, for any bytes."""
    path = os.path.join(fresh(workdir), "d.parquet")
    make_file(path, content)
    try:
        columns = data.token_columns(path, 1)
    except UserError as err:
        assert path in str(err)
    else:
        assert columns[:2] == ["query_input_ids", "passage_input_ids"] and len(columns) >= 3


def test_training_side_accepts_the_tokenizer_scripts_output(tiny, workdir):
    """The round trip: hostile (non-blank) texts through the tokenizer script, then the training side."""
    folder = fresh(workdir)
    os.makedirs(f"{folder}/in")
    texts = [t for t in ATOMS + VERY_LONG[:1] if not blank(t)]
    pq.write_table(pa.table({"query": texts, "passage": texts[::-1], "negative_1": texts[1:] + texts[:1]}),
                   f"{folder}/in/msmarco.parquet")
    proc = call_main(tokenize_data_qwen.main, tokenizer_args(tiny, f"{folder}/in", f"{folder}/out", 16))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert training_outcome(f"{folder}/out", max_seq_length=16) == "clean"


TOKENS = pa.list_(pa.int32())


def _with(column, values, typ=TOKENS):
    table = GOOD_TOKENS
    return table.set_column(table.column_names.index(column), column, pa.array(values, typ))


def _corrupt_first_page(table):
    raw = bytearray(parquet_bytes(table, compression="none"))
    raw[4:12] = b"\xff" * 8  # the first page header starts right after the magic bytes
    return bytes(raw)


# Found by the properties above (the comments say how each failed before data.py checked for it).
BROKEN_TOKEN_FILES = {
    "null token list": _with("passage_input_ids", [[3, EOS], None, [3, EOS], [3, EOS]]),  # ValueError in collate
    "null id inside a list": _with("passage_input_ids", [[3, None, EOS], [3, EOS], [3, EOS], [3, EOS]]),  # garbage id
    "empty token list": _with("query_input_ids", [[], [5, EOS], [6, EOS], [7, EOS]]),  # silent 0-length sequence
    "string token column": _with("query_input_ids", ["5 2", "7 2", "8 2", "9 2"], pa.string()),  # ArrowNotImplemented
    "float token ids": _with("query_input_ids", [[1.5, 2.0]] * 4, pa.list_(pa.float64())),  # ArrowInvalid in collate
    # ids are never checked against the vocabulary (a flipped byte in a page makes such ids): IndexError
    # later, in the model's embedding
    "negative token id": _with("passage_input_ids", [[-7, EOS], [3, EOS], [3, EOS], [3, EOS]]),
    "zero rows": GOOD_TOKENS.slice(0, 0),  # DatasetGenerationError in load_splits, not the "0 row(s)" UserError
    "repeated column name": pa.Table.from_arrays(  # DatasetGenerationError in load_splits
        GOOD_TOKENS.columns + [GOOD_TOKENS.column(0)], GOOD_TOKENS.column_names + ["query_input_ids"]),
    # a corrupt data page behind an intact footer: token_columns reads only the schema; then
    # DatasetGenerationError ("Couldn't deserialize thrift") in load_splits
    "corrupt data page": _corrupt_first_page(GOOD_TOKENS),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TOKEN_FILES))
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # numpy, on the nulls
def test_training_side_on_broken_token_columns(workdir, case):
    folder = fresh(workdir)
    path = os.path.join(folder, "msmarco.parquet")
    make_file(path, BROKEN_TOKEN_FILES[case])
    outcome = training_outcome(folder)
    assert isinstance(outcome, UserError) and path in str(outcome), outcome
