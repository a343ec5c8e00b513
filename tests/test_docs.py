"""The docs tell the truth: the README starts with the two commands and stays short, docs/config.md is what
config.py generates (every key with its real default), and every relative link lands on a file and heading."""
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_DIR

from config import Config, config_keys, config_reference

README_PATH = os.path.join(REPO_DIR, "README.md")
CONFIG_DOC = os.path.join(REPO_DIR, "docs", "config.md")
MAKE_REFERENCE = os.path.join(REPO_DIR, "docs", "make_config_reference.py")
README = open(README_PATH).read()
README_MAX_LINES = 250  # the detail goes to docs/


def read(path):
    with open(path) as f:
        return f.read()


def test_first_screen_has_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_stays_short():
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_config_table_lists_every_key_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \| .+ \|$", read(CONFIG_DOC), flags=re.M))
    assert set(config_keys()) <= set(rows), set(config_keys()) - set(rows)
    defaults = Config(model_path="m", train_data_path="t")
    for field in dataclasses.fields(Config):
        if field.default is dataclasses.MISSING:
            assert rows[field.name] == "required"
        else:
            assert json.loads(rows[field.name]) == getattr(defaults, field.name), field.name


def test_config_reference_is_up_to_date():
    assert read(CONFIG_DOC) == config_reference(), (
        "docs/config.md is stale (not what the Config fields of config.py give): "
        "run `python docs/make_config_reference.py`")


def test_config_reference_has_every_key_once_with_its_help():
    text = config_reference()
    for field in dataclasses.fields(Config):
        rows = [line for line in text.splitlines() if line.startswith(f"| `{field.name}` |")]
        assert len(rows) == 1, field.name
        assert field.metadata["help"].replace("|", "\\|") in rows[0], field.name


def test_make_config_reference_check(tmp_path):
    """--check: exit 0 on the file as generated, exit 1 with one line naming the command on a stale one;
    without it, the script writes the file."""
    def make(*args):
        return subprocess.run([sys.executable, MAKE_REFERENCE, *args], capture_output=True, text=True, timeout=120)

    out = tmp_path / "config.md"
    assert make("--output", str(out), "--check").returncode == 1  # missing
    written = make("--output", str(out))
    assert written.returncode == 0, written.stderr
    assert out.read_text() == config_reference()
    assert make("--output", str(out), "--check").returncode == 0
    out.write_text(out.read_text().replace("| `seed` | 0 |", "| `seed` | 1 |"))
    stale = make("--output", str(out), "--check")
    assert stale.returncode == 1
    assert stale.stdout == "" and len(stale.stderr.splitlines()) == 1, stale.stderr
    assert "stale" in stale.stderr and "python docs/make_config_reference.py" in stale.stderr


def slug(heading):
    """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(markdown):
    """(line number, line) of each line of a Markdown text outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(markdown.splitlines(), 1):
        marker = re.match(r"\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            fence = marker.group(1) if fence is None else None
        elif fence is None:
            lines.append((number, line))
    return lines


def anchors(path):
    """The anchors of a Markdown file's headings, a repeated one numbered as GitHub does (x, x-1, ...)."""
    seen, found = {}, set()
    for _, line in prose(read(path)):
        heading = re.match(r"#{1,6} (.+?)#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def links(path):
    """(line number, target) of each inline Markdown link outside code blocks and code spans."""
    out = []
    for number, line in prose(read(path)):
        line = re.sub(r"`[^`]*`", "``", line)
        out += [(number, target) for target in re.findall(r"\]\(([^()\s]+)\)", line)]
    return out


DOCS = [README_PATH] + sorted(glob.glob(os.path.join(REPO_DIR, "docs", "*.md")))


def test_slug_follows_github():
    assert slug("Launches: what runs where") == "launches-what-runs-where"
    assert slug("evaluate.py: the same table for any checkpoint") == "evaluatepy-the-same-table-for-any-checkpoint"
    assert slug("2. Tokenize") == "2-tokenize"
    assert slug("Hard-negative mining (figure 9)") == "hard-negative-mining-figure-9"
    assert slug("The `v2` layout_x") == "the-v2-layout_x"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO_DIR))
def test_relative_links_resolve(path):
    broken = []
    for line, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(f"line {line}: {target} (no file {os.path.relpath(dest, REPO_DIR)})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"line {line}: {target} (no heading with anchor #{anchor})")
    assert not broken, f"{os.path.relpath(path, REPO_DIR)}: " + "; ".join(broken)


def test_long_runs_promises_name_tests_that_exist():
    """Each promise of the README's "Long runs" table names the tests that pin it: they must exist."""
    text = open(os.path.join(REPO_DIR, "README.md")).read()
    section = text.split("## Long runs", 1)[1].split("\n## ", 1)[0]
    named, module = [], None
    for cell in re.findall(r"`(test_\w+(?:\.py::\w+)?)`", section):
        if "::" in cell:
            module, cell = cell.split("::")
        named.append((module, cell))
    assert len(named) >= 20
    for module, name in named:
        with open(os.path.join(REPO_DIR, "tests", module)) as f:
            assert f"def {name}(" in f.read(), f"{module}::{name}"
