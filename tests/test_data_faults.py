"""Faults in the data and its folders, found by fault injection (issue 24): each goes through the real
CLI (run.py's main in-process, tokenize_data_qwen.py's too) and must give one clear line at
preparation, before a step is trained, or, for sequences longer than max_seq_length, one warning."""
import os
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import run
import tokenize_data_qwen
from conftest import assert_user_error, call_main, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

BIG = 10**9


def data_folder(root, tokenized, name, mutate=None, file="msmarco.parquet"):
    """A folder root/name/data with the `tokenized` fixture's `file` only, `mutate`(table) applied."""
    folder = root / name / "data"
    folder.mkdir(parents=True)
    table = pq.read_table(os.path.join(tokenized, file))
    pq.write_table(mutate(table) if mutate else table, folder / file)
    return str(folder), str(folder / file)


def replace(column, values):
    """A mutation: `column` replaced by values(its ChunkedArray) (an Array)."""
    def mutate(table):
        return table.set_column(table.schema.get_field_index(column), column, values(table.column(column)))
    return mutate


def with_id(row, position, value=BIG, type=None):
    """values() for replace: row `row` gets token id `value` at `position` (type: the list type)."""
    def values(col):
        lists = col.to_pylist()
        lists[row] = lists[row][:position] + [value] + lists[row][position:]
        return pa.array(lists, type or col.type)
    return values


def train(config, *extra):
    return call_main(run.main, ["--config", config, *extra])


def warnings(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]


# ---- 1. a negative column that is null throughout ------------------------------------------------

@pytest.mark.parametrize("column", ["negative_10_input_ids", "negative_1_input_ids"])
def test_null_negative_column_is_an_error_even_when_not_needed(tmp_path, tiny, tokenized, column):
    """num_hard_neg 1: negative_10 may never be drawn, but training samples from every negative
    column, so a null one must stop the run at preparation, naming file, column and rows."""
    folder, path = data_folder(tmp_path, tokenized, "d", replace(column, lambda c: pa.nulls(len(c), c.type)))
    config, _ = make_config(tmp_path, tiny, folder, "run", num_hard_neg=1, train_epochs=1)
    assert_user_error(train(config, "--prepare_only"), path, f"'{column}'", "60 null token list(s)", "rows 0, 1")


# ---- 2. token ids outside the vocabulary ----------------------------------------------------------

@pytest.mark.parametrize("case", ["cut", "undrawn", "int64", "query"])
def test_token_id_outside_the_vocabulary_is_refused_at_preparation(tmp_path, tiny, tokenized, case):
    """The id is checked at preparation, whatever the column, the split or the cut: on main it was
    trained on silently (past max_seq_length, so cut away before collate's check; in a negative never
    drawn), failed with a traceback (an int64 id beyond int32, collate's cast) or stopped the run
    halfway through its epoch, with a line that named neither column nor row."""
    column, position, over, type_ = {
        "cut": ("passage_input_ids", 6, {"max_seq_length": 4}, None),
        "undrawn": ("negative_10_input_ids", 0, {"num_hard_neg": 1}, None),
        "int64": ("passage_input_ids", 0, {}, pa.list_(pa.int64())),
        "query": ("query_input_ids", 1, {}, None),
    }[case]
    value = 10**10 if case == "int64" else BIG
    folder, path = data_folder(tmp_path, tokenized, "d", replace(column, with_id(7, position, value, type_)))
    config, _ = make_config(tmp_path, tiny, folder, "run", train_epochs=1, **over)
    proc = train(config)
    assert_user_error(proc, path, f"'{column}'", "row 7", str(value), "vocabulary size 400",
                      "tokenize_data_qwen.py --model_path")
    assert "train:" not in proc.stderr  # no step was trained


def test_token_id_outside_the_vocabulary_in_a_v2_corpus(tmp_path, tiny):
    """The v2 layout's documents are checked in their corpus file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(f"{tiny}/raw/msmarco.parquet", raw)
    folder = tmp_path / "v2"
    proc = call_main(tokenize_data_qwen.main, ["--model_path", f"{tiny}/backbone", "--input_dir", str(raw),
                                               "--output_dir", str(folder), "--layout", "v2", "--num_proc", "1"])
    assert proc.returncode == 0, proc.stderr
    corpus = folder / "corpus" / "msmarco.parquet"
    pq.write_table(replace("input_ids", with_id(5, 0))(pq.read_table(corpus)), corpus)
    config, _ = make_config(tmp_path, tiny, str(folder), "run")
    assert_user_error(train(config, "--prepare_only"), str(corpus), "'input_ids'", "row 5", str(BIG),
                      "vocabulary size 400")


# ---- 3. sequences longer than max_seq_length --------------------------------------------------------

def test_sequences_longer_than_max_seq_length_give_one_warning_per_file(tmp_path, tiny, tokenized):
    folder, path = data_folder(tmp_path, tokenized, "d")
    table = pq.read_table(path)
    config, _ = make_config(tmp_path, tiny, folder, "run", max_seq_length=8)
    proc = train(config, "--prepare_only")
    assert proc.returncode == 0, proc.stderr
    lines = warnings(proc)
    assert len(lines) == 1, proc.stderr
    lengths = pc.list_value_length(table.column("query_input_ids")).to_numpy()
    longer = int((lengths > 8).sum())
    first = int((lengths > 8).argmax())
    for fragment in (path, "'query_input_ids'", f"{longer} of {table.num_rows}", f"first row {first}",
                     "max_seq_length 8", "cut to 8 tokens", "closing token"):
        assert fragment in lines[0], lines[0]


def test_no_warning_when_every_sequence_fits(tmp_path, tiny, tokenized):
    """The fixture's data is tokenized at 64 and trained at 32, but its texts are shorter: nothing is cut."""
    folder, _ = data_folder(tmp_path, tokenized, "d")
    config, _ = make_config(tmp_path, tiny, folder, "run")
    proc = train(config, "--prepare_only")
    assert proc.returncode == 0, proc.stderr
    assert warnings(proc) == []


# ---- 4. lines that blamed the wrong thing ---------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unwritable_cache_dir_is_named(tmp_path, tiny, tokenized, where):
    folder, _ = data_folder(tmp_path, tokenized, "d")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    cache = blocker if where == "file" else blocker / "cache"
    config, _ = make_config(tmp_path, tiny, folder, "run", cache_dir=str(cache))
    line = assert_user_error(train(config, "--prepare_only"), f"cache_dir {cache}", "writable")
    assert "re-tokenize" not in line and "msmarco" not in line


@pytest.mark.parametrize("files", [(), ("config.json",)])
def test_model_folder_without_tokenizer_for_tokenize(tmp_path, tiny, files):
    """An empty folder gave transformers' cut-off "Couldn't instantiate the backend tokenizer from one
    of:"; one with config.json only gave an empty tokenizer and the texts were tokenized to eos alone."""
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        shutil.copy(f"{tiny}/backbone/{name}", model)
    proc = call_main(tokenize_data_qwen.main, ["--model_path", str(model), "--input_dir", f"{tiny}/raw",
                                               "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])
    line = assert_user_error(proc, f"model_path {model}", "no tokenizer", "tokenizer.json")
    assert line.rstrip()[-1] not in ":" and "Couldn't instantiate" not in line
    assert not os.path.exists(tmp_path / "out" / "msmarco.parquet")


def test_model_folder_without_tokenizer_for_training(tmp_path, tiny, tokenized):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny}/backbone/{name}", model)
    config, _ = make_config(tmp_path, tiny, tokenized, "run", model_path=str(model))
    assert_user_error(train(config), f"model_path {model}", "no tokenizer", "tokenizer.json")


@pytest.mark.parametrize("drop, missing", [(["negative_1_input_ids"], "negative_1_input_ids"),
                                           (["negative_4_input_ids"], "negative_4_input_ids")])
def test_negative_columns_numbered_from_one_without_gaps(tmp_path, tiny, tokenized, drop, missing):
    """Without negative_1 the line said "0 hard negatives per row (negative_1 ... negative_0)"; with a gap
    the columns after it were ignored without a word."""
    folder, path = data_folder(tmp_path, tokenized, "d", lambda t: t.drop_columns(drop))
    config, _ = make_config(tmp_path, tiny, folder, "run", num_hard_neg=1)
    line = assert_user_error(train(config, "--prepare_only"), path, f"no column '{missing}'",
                             "numbered from 1 without gaps")
    assert "negative_0" not in line
