"""The README tells the truth: the two commands first, and every config key with its real default."""
import dataclasses
import json
import os
import re

from conftest import REPO_DIR

from config import Config, config_keys

README = open(os.path.join(REPO_DIR, "README.md")).read()


def test_first_screen_has_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen


def test_config_table_lists_every_key_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \| .+ \|$", README, flags=re.M))
    assert set(config_keys()) <= set(rows), set(config_keys()) - set(rows)
    defaults = Config(model_path="m", train_data_path="t")
    for field in dataclasses.fields(Config):
        if field.default is dataclasses.MISSING:
            assert rows[field.name] == "required"
        else:
            assert json.loads(rows[field.name]) == getattr(defaults, field.name), field.name
