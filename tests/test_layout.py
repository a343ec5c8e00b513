"""The shape the code keeps (issue 22): libraries under the scripts, no reach into another module's
private names or its main(), run.py without evaluate.py, each script's main() a parse and a call, and
the training loop on one screen. These fail when a change quietly undoes one of them."""
import ast
import glob
import os

import pytest
from conftest import REPO_DIR

# The command-line scripts the README and docs/ run; every other module is a library (model.py, a library
# with a small command line of its own, included).
SCRIPTS = {"run", "ray_train", "tokenize_data_qwen", "mine_negatives", "evaluate", "mteb_eval", "merge_checkpoints",
           "demo"}
WITH_A_MAIN = SCRIPTS | {"model"}
FILES = sorted(glob.glob(os.path.join(REPO_DIR, "*.py")) + glob.glob(os.path.join(REPO_DIR, "bench", "*.py"))
               + glob.glob(os.path.join(REPO_DIR, "docs", "*.py")))
MODULES = {os.path.basename(path)[:-3]: path for path in FILES}


def tree(name):
    with open(MODULES[name]) as f:
        return ast.parse(f.read())


def imports(name):
    """{(module, name or None)} of the project modules `name` imports, and of their attributes it uses."""
    out = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            out |= {(alias.name, None) for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            out |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in MODULES:
            out.add((node.value.id, node.attr))
    return {(module, attr) for module, attr in out if module != name}


def test_the_module_lists_are_complete():
    assert SCRIPTS <= set(MODULES)
    assert {"config", "data", "model", "loss", "checkpoint", "metrics", "files", "distributed"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_reaches_into_private_names_or_another_main(name):
    wrong = sorted(f"{module}.{attr}" for module, attr in imports(name)
                   if attr and (attr == "main" or (attr.startswith("_") and not attr.startswith("__"))))
    assert not wrong, f"{name} uses {wrong}"


LIBRARIES = sorted(name for name, path in MODULES.items() if os.path.dirname(path) == REPO_DIR and name not in SCRIPTS)


@pytest.mark.parametrize("name", LIBRARIES)
def test_libraries_import_no_script(name):
    assert not {module for module, _ in imports(name)} & SCRIPTS


def test_run_does_not_import_evaluate():
    assert "evaluate" not in {module for module, _ in imports("run")}


def function(name, module):
    return next(node for node in tree(module).body if isinstance(node, ast.FunctionDef) and node.name == name)


@pytest.mark.parametrize("name", sorted(WITH_A_MAIN))
def test_a_script_main_parses_and_makes_one_call(name):
    """main() is at most: parse the arguments, one call, print what it returned."""
    body = function("main", name).body
    body = body[1:] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body
    assert len(body) <= 3, f"{name}.main has {len(body)} statements"


def test_the_training_loop_fits_on_one_screen():
    fit = function("fit", "run")
    assert fit.end_lineno - fit.lineno + 1 <= 60
