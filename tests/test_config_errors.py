"""Config loading (config.py) and run.py's handling of bad input, which all happens before training.

A run.py subprocess pays ~5 s of imports, so the real CLI is used for a few cases, run
concurrently by one module fixture; the others call run.main(argv) in this process through
`call_main`, which reports what the CLI would print (an exception escaping main() shows as a
traceback with exit status 1). In-process cases that reach the data use --prepare_only, which
stops before accelerate is set up.
"""
import dataclasses
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import run
from config import TASK_TYPES, Config, config_keys, load_config, load_dataset_types
from conftest import REPO_DIR, assert_user_error, call_main, run_cli, write_config
from errors import UserError

# The published configs/config.json of F2LLM (RECIPE.md, "Config ... keys and published values").
PUBLISHED = {
    "experiment_id": "4b+lr.8e-6+bs.16x32+context.1024+2epochs", "output_dir": "output", "tb_dir": "output/tb",
    "cache_dir": "cache", "train_batch_size": 16, "checkpointing_steps": 5000, "validation_steps": 5000,
    "max_seq_length": 1024, "learning_rate": 8e-6, "min_lr": 1e-7, "weight_decay": 0.01, "warmup_steps": 500,
    "train_epochs": 2, "log_interval": 100, "num_hard_neg": 7, "train_steps": -1,
}


def run_main(config_path, prepare_only=True):
    return call_main(run.main, ["--config", str(config_path)] + (["--prepare_only"] if prepare_only else []))


def prepared(proc):
    """{dataset: (task, train rows, validation rows)} from the lines --prepare_only prints (after the
    tokenizer's, for a raw folder)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    lines = proc.stdout.splitlines()
    tokenizer_done = [i for i, line in enumerate(lines) if line.startswith("tokenized ")]
    for line in lines[tokenizer_done[-1] + 1 if tokenizer_done else 0:]:
        name, task, train, n_train, validation, n_valid = line.split()
        assert (train, validation) == ("train", "validation"), line
        out[name] = (task, int(n_train), int(n_valid))
    return out


@pytest.fixture(scope="module")
def env(tiny, tokenized, tmp_path_factory):
    """Folders for the configs: data sets made from the `tokenized` fixture, and a base config."""
    root = tmp_path_factory.mktemp("config_errors")

    def folder(name, files):
        path = root / name
        os.makedirs(path)
        for target, source in files.items():
            shutil.copy(source, path / f"{target}.parquet")
        return str(path)

    dirs = {
        "mydata": folder("mydata", {"mydata": f"{tokenized}/msmarco.parquet"}),
        "raw": folder("raw", {"msmarco": f"{tiny}/raw/msmarco.parquet"}),
        "imdb": folder("imdb", {"imdb": f"{tokenized}/imdb.parquet"}),
        "empty": folder("empty", {}),
    }
    (root / "empty" / "notes.txt").write_text("not data")
    one_row = root / "one_row"
    os.makedirs(one_row)
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(f"{tokenized}/msmarco.parquet").slice(0, 1), one_row / "msmarco.parquet")
    dirs["one_row"] = str(one_row)
    corrupt = root / "corrupt"
    os.makedirs(corrupt)
    (corrupt / "msmarco.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    dirs["corrupt"] = str(corrupt)
    os.makedirs(root / "no_tokenizer_model")
    base = {"model_path": f"{tiny}/backbone", "train_data_path": tokenized, "cache_dir": str(root / "cache"),
            "output_dir": str(root / "output"), "tb_dir": str(root / "output" / "tb")}
    return {"root": root, "dirs": dirs, "base": base, "no_tokenizer_model": str(root / "no_tokenizer_model")}


def config(env, name, drop=(), **values):
    """A config file `name`.json: the base config with `values` on top and the keys in `drop` removed."""
    cfg = {**env["base"], **values}
    for key in drop:
        cfg.pop(key)
    return write_config(env["root"] / f"{name}.json", **cfg)


# ---- the real CLI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(env):
    """{case: (CompletedProcess, config path)} of concurrent run.py runs through the real CLI."""
    d = env["dirs"]
    cases = {
        "missing_config": ([str(env["root"] / "nope.json")], None),
        "raw_parquet": (["--prepare_only"], config(env, "cli_raw", train_data_path=d["raw"],
                                                   cache_dir=str(env["root"] / "cache_cli_raw"))),
        "declared": (["--prepare_only"], config(env, "cli_declared", train_data_path=d["mydata"],
                                                 dataset_types={"mydata": "retrieval"},
                                                 cache_dir=str(env["root"] / "cache_cli"))),
        "few_negatives": ([], config(env, "cli_few_negatives", num_hard_neg=12)),
        "no_tokenizer": ([], config(env, "cli_no_tokenizer", model_path=env["no_tokenizer_model"])),
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(run_cli, "run.py", "--config", *([path] if path else []), *extra)
                   for name, (extra, path) in cases.items()}
        return {name: (future.result(), cases[name][1]) for name, future in futures.items()}


def test_cli_config_file_missing(cli, env):
    proc, _ = cli["missing_config"]
    assert_user_error(proc, str(env["root"] / "nope.json"), "not found", "--config")


def test_cli_raw_parquet_as_training_data(cli, env):
    """A folder of raw files is tokenized into cache_dir (tokenized/NAME-HASH), then prepared."""
    proc, _ = cli["raw_parquet"]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert prepared(proc) == {"msmarco": ("retrieval", 30, 30)}  # min_eval_queries 50: half of the 60 rows
    [folder] = os.listdir(env["root"] / "cache_cli_raw" / "tokenized")
    assert folder.startswith("raw-") and "tokenized 1 file(s)" in proc.stdout


def test_cli_declared_dataset_accepted(cli, env):
    proc, _ = cli["declared"]
    assert "Traceback" not in proc.stderr
    assert prepared(proc) == {"mydata": ("retrieval", 30, 30)}  # 60 rows: min_eval_queries 50, at most half
    assert os.listdir(env["root"] / "cache_cli")  # the split cache was built where the config says


def test_cli_fewer_negatives_than_num_hard_neg(cli, env):
    proc, _ = cli["few_negatives"]
    # banking77 (clustering, sorted first) has 10 negatives, the config asks for 12
    assert_user_error(proc, "banking77.parquet", "10 hard negatives", "12", "num_hard_neg")


def test_cli_model_path_without_tokenizer(cli, env):
    proc, _ = cli["no_tokenizer"]  # an empty folder: its config.json, read first for the family, is missing
    assert_user_error(proc, env["no_tokenizer_model"], "has no config.json", "tokenizer")


# ---- run.main in-process: config errors --------------------------------------------------------

def raw_config(env, name, text):
    path = env["root"] / f"{name}.json"
    path.write_text(text)
    return path


def test_invalid_json(env):
    path = raw_config(env, "invalid", '{"model_path": "m",\n "train_batch_size": }')
    assert_user_error(run_main(path), str(path), "not valid JSON", "line 2")


def test_json_not_an_object(env):
    path = raw_config(env, "list", "[1, 2]")
    assert_user_error(run_main(path), str(path), "one JSON object")


def test_unknown_key_lists_valid_keys(env):
    """A key near no valid one (batch_size is near train_batch_size: tests/test_cli.py)."""
    path = config(env, "unknown_key", bogus_key=4)
    line = assert_user_error(run_main(path), str(path), "unknown key 'bogus_key'")
    for key in config_keys():
        assert key in line


@pytest.mark.parametrize("key, value, fragments", [
    ("train_batch_size", "16", ["'train_batch_size'", "type int", '"16"']),
    ("train_batch_size", True, ["'train_batch_size'", "type int", "true"]),
    ("train_batch_size", 16.5, ["'train_batch_size'", "type int"]),
    ("train_batch_size", None, ["'train_batch_size'", "null"]),
    ("learning_rate", "8e-6", ["'learning_rate'", "type float"]),
    ("gradient_checkpointing", 1, ["'gradient_checkpointing'", "type bool"]),
    ("dataset_types", ["mydata"], ["'dataset_types'", "type dict"]),
    ("model_path", 3, ["'model_path'", "type str"]),
])
def test_wrong_type(env, key, value, fragments):
    path = config(env, f"type_{key}_{type(value).__name__}", **{key: value})
    assert_user_error(run_main(path), str(path), *fragments)


@pytest.mark.parametrize("key, value, fragments", [
    ("attention_mask_from", "foo", ["'attention_mask_from'", "'lengths' or 'pad_token_id'"]),
    ("temperature", 0, ["'temperature'", "positive"]),
    ("temperature", -0.05, ["'temperature'", "positive"]),
    ("train_batch_size", 0, ["'train_batch_size'", "at least 1"]),
    ("max_seq_length", 1, ["'max_seq_length'", "at least 2"]),
    ("num_hard_neg", -1, ["'num_hard_neg'", "0 or more"]),
    ("train_steps", 0, ["'train_steps'"]),
    ("train_steps", -2, ["'train_steps'"]),
    ("validation_fraction", 1.0, ["'validation_fraction'"]),
    ("validation_fraction", 0, ["'validation_fraction'"]),
    ("dtype", "fp16", ["'dtype'"]),
    ("adam_betas", [0.9], ["'adam_betas'"]),
    ("adam_betas", [0.9, 1.0], ["'adam_betas'"]),
    ("dataset_types", {"mydata": "retrival"}, ["'dataset_types'", "'mydata'", "'retrival'",
                                               "retrieval, classification, clustering"]),
    ("num_hard_neg_clustering", -2, ["'num_hard_neg_clustering'", "-1"]),
    ("eval_queries", -1, ["'eval_queries'"]),
    ("mrl_dims", [], ["'mrl_dims'", "positive integers"]),
    ("mrl_dims", [64, 0], ["'mrl_dims'", "positive integers"]),
    ("mrl_dims", [64.5], ["'mrl_dims'", "positive integers"]),
    ("kd_weight", -1.0, ["'kd_weight'"]),
    ("contrastive_loss", "mnrl", ["'contrastive_loss'", "'f2llm' or 'joint'"]),
    ("false_negative_margin", -0.1, ["'false_negative_margin'", "0 or more"]),
    ("false_negative_margin", "0.1", ["'false_negative_margin'"]),
    ("inbatch_gradient", "some", ["'inbatch_gradient'", "'all', 'own' or 'none'"]),
    ("gather_with_grad", False, ["'gather_with_grad'", "replaced by inbatch_gradient", '"own"']),
    ("prompts", {"passage": "x"}, ["'prompts'", "'query' and/or 'document'", "'passage'"]),
    ("prompts", {"query": 3}, ["'prompts'", "'query'"]),
    ("lora", {"rank": 8}, ["'lora'", "unknown key 'rank'", "target_modules"]),
    ("lora", {"r": "8"}, ["'lora'", "'r'", "type int"]),
    ("lora", {"r": 0}, ["'lora'", "r >= 1"]),
    ("lora", {"dropout": 1.0}, ["'lora'", "dropout"]),
    ("lora", {"target_modules": []}, ["'lora'", "target_modules"]),
    ("lora", {"target_modules": ["q_proj", 3]}, ["'lora'", "target_modules"]),
])
def test_bad_value(env, key, value, fragments):
    path = config(env, f"value_{key}_{str(value)[:12]}", **{key: value})
    assert_user_error(run_main(path), str(path), *fragments)


def failed_before_the_run(env, name, fragments, **values):
    """run.main (training, not --prepare_only) on the base config plus `values`, with an output_dir of
    its own: one error line with `fragments`, and no output folder made. The training data is a folder
    without parquet files, so that a value let through fails fast on that (another line), not by
    training."""
    out = env["root"] / name / "output"
    path = config(env, name, output_dir=str(out), train_data_path=env["dirs"]["empty"], **values)
    assert_user_error(run_main(path, prepare_only=False), str(path), *fragments)
    assert not os.path.exists(out)


NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


@pytest.mark.parametrize("shown", NON_FINITE)
@pytest.mark.parametrize("key", ["learning_rate", "max_grad_norm", "weight_decay", "temperature", "min_lr",
                                 "kd_weight", "validation_fraction", "train_batch_size", "false_negative_margin"])
def test_non_finite_number(env, key, shown):
    """Python's JSON reader takes NaN, Infinity and -Infinity: each is an error naming the key (a NaN
    passes every comparison of the range checks; NaN weight_decay was an AdamW traceback)."""
    failed_before_the_run(env, f"nonfinite_{key}_{shown}", [f"key '{key}' is {shown};", "finite number"],
                          **{key: NON_FINITE[shown]})


@pytest.mark.parametrize("key, value, where, shown", [
    ("lora", {"alpha": float("nan")}, "lora.alpha", "NaN"),
    ("lora", {"r": 8, "dropout": float("inf")}, "lora.dropout", "Infinity"),
    ("adam_betas", [0.9, float("nan")], "adam_betas[1]", "NaN"),
    ("mrl_dims", [64, float("-inf")], "mrl_dims[1]", "-Infinity"),
    ("prompts", {"query": float("nan")}, "prompts.query", "NaN"),
    ("dataset_types", {"my-data": float("inf")}, 'dataset_types["my-data"]', "Infinity"),
])
def test_non_finite_number_inside_a_value(env, key, value, where, shown):
    failed_before_the_run(env, f"nonfinite_in_{key}_{len(where)}",
                          [f"key '{key}' has {where} = {shown};", "finite number"], **{key: value})


@pytest.mark.parametrize("text, shown", [("1e400", "1e400, beyond the range of a float"),
                                         ("-1E+999", "-1E+999, beyond the range of a float"),
                                         ("1" + "0" * 400, "a number of 401 digits, beyond the range of a float")])
def test_number_beyond_the_float_range(env, text, shown):
    """json reads 1e400 as Infinity: the error shows what the file says."""
    path = raw_config(env, f"huge_{len(text)}", '{"model_path": "m", "train_data_path": "d", "learning_rate": '
                      + text + "}")
    assert_user_error(run_main(path), str(path), f"key 'learning_rate' is {shown}", "finite number")


def test_integer_too_long_for_json_is_one_line(env):
    """Python refuses integers of over 4300 digits with a ValueError that is not a JSONDecodeError."""
    path = raw_config(env, "long_int", '{"model_path": "m", "train_data_path": "d", "seed": ' + "7" * 5000 + "}")
    assert_user_error(run_main(path), str(path), "not valid JSON", "4300 digits")


@pytest.mark.parametrize("key, value, fragments", [
    ("temperature", 1e-30, ["'temperature'", "at least 0.001", "+-1000", "got 1e-30"]),
    ("temperature", 1e-4, ["'temperature'", "at least 0.001", "got 0.0001"]),
    ("seed", 2**32, ["'seed'", "4294967295", "got 4294967296"]),
    ("seed", -1, ["'seed'", "4294967295", "got -1"]),
    ("learning_rate", 0, ["'learning_rate'", "positive"]),
    ("min_lr", 1e-5, ["'min_lr'", "above learning_rate", "8e-06"]),
])
def test_out_of_range(env, key, value, fragments):
    """temperature 1e-30 makes the logits cos/temperature 1e30 (the gradient norm overflows); seed
    2**32 was numpy's traceback in set_seed; learning_rate 0 or below min_lr would run at min_lr."""
    failed_before_the_run(env, f"range_{key}_{value}", fragments, **{key: value})


def test_range_bounds_accepted(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", model_path="m", train_data_path="d", temperature=1e-3,
                                   seed=2**32 - 1, learning_rate=1e-5, min_lr=1e-5, weight_decay=0, kd_weight=0,
                                   max_grad_norm=1e-3, adam_betas=[0, 0.999], lora={"alpha": 1e-3}))
    assert cfg.temperature == 1e-3 and cfg.seed == 2**32 - 1 and cfg.min_lr == cfg.learning_rate


@pytest.mark.parametrize("drop, listed", [(["model_path"], ["model_path"]),
                                          (["model_path", "train_data_path"], ["model_path", "train_data_path"])])
def test_missing_required_key(env, drop, listed):
    path = config(env, "missing_" + "_".join(drop), drop=drop)
    line = assert_user_error(run_main(path), str(path), "missing required key", *listed)
    if "train_data_path" not in drop:
        assert "train_data_path" not in line


def test_dataset_types_file_missing(env):
    path = config(env, "no_types_file", dataset_types_file=str(env["root"] / "types.json"))
    assert_user_error(run_main(path), "dataset_types_file", str(env["root"] / "types.json"))


def test_dataset_types_file_with_unknown_task(env):
    types = env["root"] / "bad_types.json"
    types.write_text(json.dumps({"retrieval": ["a"], "ranking": ["b"]}))
    assert_user_error(run_main(config(env, "bad_types_file", dataset_types_file=str(types))),
                      str(types), "'ranking'")


# ---- run.main in-process: data errors ----------------------------------------------------------

def test_train_data_path_missing_folder(env):
    missing = str(env["root"] / "no_such_folder")
    assert_user_error(run_main(config(env, "no_data_dir", train_data_path=missing)), missing, "not found")


def test_train_data_path_without_parquet(env):
    folder = env["dirs"]["empty"]
    assert_user_error(run_main(config(env, "no_parquet", train_data_path=folder)), folder, "no *.parquet",
                      "tokenize_data_qwen.py")


def test_raw_parquet_with_too_few_negatives(env):
    """Raw files are tokenized first; their checks then apply as to tokenized ones."""
    folder = env["dirs"]["raw"]
    assert_user_error(run_main(config(env, "raw", train_data_path=folder, num_hard_neg=12)),
                      "msmarco.parquet", "10 hard negatives per row", "fewer than the 12", "lower num_hard_neg")


def test_unknown_dataset_name_shows_how_to_declare_it(env):
    folder = env["dirs"]["mydata"]
    line = assert_user_error(run_main(config(env, "undeclared", train_data_path=folder)),
                             os.path.join(folder, "mydata.parquet"), "unknown dataset 'mydata'")
    assert '"dataset_types": {"mydata": "retrieval"}' in line
    # the suggestion is valid config JSON that names a task type
    snippet = json.loads("{" + line[line.index('"dataset_types"'):line.index("}") + 1] + "}")
    assert snippet["dataset_types"]["mydata"] in TASK_TYPES


def test_declared_dataset_accepted(env):
    path = config(env, "declared", train_data_path=env["dirs"]["mydata"], dataset_types={"mydata": "clustering"},
                  cache_dir=str(env["root"] / "cache_declared"))
    assert prepared(run_main(path)) == {"mydata": ("clustering", 59, 1)}


def test_dataset_types_override_published_type(env):
    """`dataset_types` in the config wins over dataset_types.json: imdb as retrieval needs 7 negatives."""
    path = config(env, "override", train_data_path=env["dirs"]["imdb"], dataset_types={"imdb": "retrieval"})
    assert_user_error(run_main(path), "imdb.parquet", "1 hard negatives", "7")


def test_fewer_negatives_than_num_hard_neg(env):
    line = assert_user_error(run_main(config(env, "few_negatives", num_hard_neg=11)),
                             "10 hard negatives", "negative_10", "11", "num_hard_neg")
    assert "imdb" not in line


def test_classification_needs_one_negative_only(env):
    path = config(env, "imdb_only", train_data_path=env["dirs"]["imdb"], num_hard_neg=12,
                  cache_dir=str(env["root"] / "cache_imdb"))
    assert prepared(run_main(path)) == {"imdb": ("classification", 297, 3)}


def test_all_sample_datasets_prepare_with_published_types(env):
    path = config(env, "all", num_hard_neg=10, cache_dir=str(env["root"] / "cache_all"))
    assert prepared(run_main(path)) == {"banking77": ("clustering", 297, 3), "imdb": ("classification", 297, 3),
                                        "msmarco": ("retrieval", 30, 30), "natural_questions": ("retrieval", 30, 30)}


def test_one_row_dataset(env):
    folder = env["dirs"]["one_row"]
    assert_user_error(run_main(config(env, "one_row", train_data_path=folder,
                                      cache_dir=str(env["root"] / "cache_one_row"))),
                      os.path.join(folder, "msmarco.parquet"), "1 row(s)")


def test_corrupt_training_file(env):
    folder = env["dirs"]["corrupt"]
    assert_user_error(run_main(config(env, "corrupt", train_data_path=folder)),
                      os.path.join(folder, "msmarco.parquet"), "not a readable parquet file")


# ---- config.load_config and friends, unit level ------------------------------------------------

def test_published_config_loads_and_equals_defaults():
    path = os.path.join(REPO_DIR, "configs", "config.json")
    with open(path) as f:
        raw = json.load(f)
    assert set(raw) == set(PUBLISHED) | {"model_path", "train_data_path"}  # exactly the published keys
    cfg = load_config(path)
    defaults = Config(model_path=raw["model_path"], train_data_path=raw["train_data_path"])
    assert cfg == defaults  # every value of the published file is the default
    for key, value in PUBLISHED.items():
        assert getattr(Config, key) == value, key  # and the defaults are the published values


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_published_args_json_loads(tmp_path, version):
    """The args.json the published run.py writes: every Args field, num_processes filled in (v2 also
    teacher_model_path null and the v2 keys); it loads unchanged, num_processes configuring nothing."""
    args = {**PUBLISHED, "model_path": "models/qwen3-4b", "train_data_path": "training_data/data_tokenized_qwen",
            "output_dir": f"output/{PUBLISHED['experiment_id']}", "tb_dir": f"output/tb/{PUBLISHED['experiment_id']}",
            "num_processes": 32}
    if version == "v2":
        args.update(num_hard_neg_clustering=9, scheduler_type="cosine", use_mrl=True, teacher_model_path=None,
                    kd_weight=1.0, warmup_steps=500 * 32)
    cfg = load_config(write_config(tmp_path / "args.json", **args))
    assert cfg.teacher_model_path is None and cfg.warmup_steps == args["warmup_steps"]
    assert cfg.use_mrl == (version == "v2") and not hasattr(cfg, "num_processes")


def test_added_option_defaults():
    cfg = Config(model_path="m", train_data_path="d")
    assert cfg.temperature == 0.05 and cfg.adam_betas == [0.9, 0.98] and cfg.dataset_types == {}
    assert cfg.validation_fraction == 0.01 and cfg.seed == 0 and cfg.max_grad_norm == 1.0
    other = Config(model_path="m", train_data_path="d")
    other.adam_betas.append(0.1)
    other.dataset_types["x"] = "retrieval"
    assert cfg.adam_betas == [0.9, 0.98] and cfg.dataset_types == {}  # no shared mutable defaults
    assert cfg.run_dir == os.path.join("output", PUBLISHED["experiment_id"])


def test_demo_config_loads():
    cfg = load_config(os.path.join(REPO_DIR, "configs", "demo.json"))
    assert cfg.model_path == "demo_out/backbone" and cfg.train_data_path == "demo_out/tokenized"
    assert cfg.gradient_checkpointing is False and cfg.max_seq_length == 128 and cfg.num_hard_neg == 7


def test_null_takes_the_default_for_optional_keys(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", model_path="m", train_data_path="d", adam_betas=None,
                                   dataset_types=None))
    assert cfg.adam_betas == [0.9, 0.98] and cfg.dataset_types == {}


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", model_path="m", train_data_path="d", temperature=1,
                                   train_steps=-1, adam_betas=[0, 0.5]))
    assert cfg.temperature == 1 and cfg.adam_betas == [0, 0.5]


@pytest.mark.parametrize("key, value", [("learning_rate", -8e-6), ("weight_decay", -0.01), ("max_grad_norm", -1.0)])
def test_negative_optimizer_values_rejected(tmp_path, key, value):
    """BUG: learning_rate and weight_decay < 0 pass load_config, then torch.optim.AdamW raises
    ValueError (a traceback, after the model is loaded); a negative max_grad_norm is not caught at
    all and flips every clipped gradient. They should be user errors, like adam_betas."""
    path = write_config(tmp_path / "c.json", model_path="m", train_data_path="d", **{key: value})
    with pytest.raises(UserError, match=key):
        load_config(path)


def test_published_dataset_types():
    types = load_dataset_types(Config(model_path="m", train_data_path="d"))
    assert types["msmarco"] == types["natural_questions"] == "retrieval"
    assert types["banking77"] == "clustering" and types["imdb"] == "classification"
    assert set(types.values()) == set(TASK_TYPES)
    with open(os.path.join(REPO_DIR, "configs", "dataset_types.json")) as f:
        by_type = json.load(f)
    names = [n for ns in by_type.values() for n in ns]
    assert len(names) == len(set(names)) == len(types)  # each dataset has one type


def test_v2_dataset_types_are_a_superset_of_v1_with_no_type_changed():
    v1 = load_dataset_types(Config(model_path="m", train_data_path="d"))
    v2 = load_dataset_types(Config(model_path="m", train_data_path="d",
                                   dataset_types_file="configs/dataset_types_v2.json"))
    assert all(v2[name] == task for name, task in v1.items())
    counts = {task: sum(1 for t in v2.values() if t == task) for task in TASK_TYPES}
    assert counts == {"retrieval": 459, "classification": 10, "clustering": 33}
    assert v2["webfaq_eng"] == "retrieval" and v2["sib200"] == "clustering" and v2["waimai"] == "classification"


def test_dataset_types_file_found_from_another_folder(tmp_path, monkeypatch):
    """The default relative dataset_types_file is looked up in the repository when the working
    folder has none (run.py launched from elsewhere)."""
    monkeypatch.chdir(tmp_path)
    types = load_dataset_types(Config(model_path="m", train_data_path="d", dataset_types={"new": "clustering",
                                                                                          "imdb": "retrieval"}))
    assert types["msmarco"] == "retrieval" and types["new"] == "clustering" and types["imdb"] == "retrieval"


def test_config_keys_are_the_dataclass_fields():
    assert config_keys() == [f.name for f in dataclasses.fields(Config)]
    assert {"model_path", "train_data_path"} | set(PUBLISHED) <= set(config_keys())


def test_accelerate_configs_parse_with_the_published_settings():
    from accelerate.commands.config.config_args import load_config_from_file

    published = load_config_from_file(os.path.join(REPO_DIR, "configs/accelerate_config.yaml"))
    assert published.distributed_type == "DEEPSPEED" and published.mixed_precision == "bf16"
    assert published.deepspeed_config["zero_stage"] == 2 and published.deepspeed_config["gradient_clipping"] == 1.0
    assert published.num_processes == 8 and published.rdzv_backend == "static"
    assert published.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # one job across nodes
    cpu = load_config_from_file(os.path.join(REPO_DIR, "configs/accelerate_cpu.yaml"))
    assert cpu.distributed_type == "NO" and cpu.use_cpu and cpu.mixed_precision == "no"
