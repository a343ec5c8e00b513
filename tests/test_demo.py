"""`make demo`, the README's first command: demo.py's whole pipeline on its shipped config (paths moved
under a temporary folder), through the same scripts and launcher it runs for a user."""
import json
import os
import re

from conftest import REPO_DIR, run_cli, write_config


def test_demo_runs_end_to_end_and_training_helps(tmp_path):
    """The demo reads the training's `final checkpoint: PATH` line (a line added after it once broke
    it), evaluates before and after training and loads the result in sentence-transformers."""
    work = tmp_path / "demo"
    with open(os.path.join(REPO_DIR, "configs", "demo.json")) as f:
        values = {key: value.replace("demo_out", str(work)) if isinstance(value, str) else value
                  for key, value in json.load(f).items()}
    config = write_config(tmp_path / "demo.json", **values)
    proc = run_cli("demo.py", "--work_dir", str(work), "--config", config, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = map(float, re.search(r"MRR@10: before training ([\d.]+), after training ([\d.]+)",
                                         proc.stdout).groups())
    assert after > before + 0.2, proc.stdout[-2000:]
    assert "lowest cosine to our encoder" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == f"final checkpoint: {work}/output/demo/epoch_2"
