"""distributed.stop_together across two real gloo processes (accelerate's multi-CPU Accelerator):
whichever process finds a problem, both stop at the same point; the main process says it in one line
(its own problem, or the line for a problem found elsewhere) after its clean-up, the other exits
quietly with status 2, and when no process has a problem both go on."""
import json

from conftest import run_two_gloo_workers

WORKER = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO_DIR"])
rank = os.environ["RANK"]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], WORLD_SIZE="2", LOCAL_RANK=rank)
from accelerate import Accelerator
from distributed import close, stop_together
from errors import UserError

accelerator = Accelerator(cpu=True)
outcome = {"world": accelerator.num_processes, "cleaned": []}
for case, who in (("none", None), ("main", 0), ("other", 1)):
    problem = f"{case}: found by rank {rank}" if who == int(rank) else None
    try:
        stop_together(accelerator, problem, elsewhere=f"{case}: elsewhere",
                      cleanup=lambda case=case: outcome["cleaned"].append(case))
        outcome[case] = "went on"
    except UserError as err:
        outcome[case] = f"UserError: {err}"
    except SystemExit as err:
        outcome[case] = f"SystemExit {err.code}"
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
    json.dump(outcome, f)
close(accelerator)  # gloo's threads left to the interpreter's exit can abort it (SIGABRT)
"""


def test_stop_together_stops_both_processes_with_one_line(tmp_path):
    run_two_gloo_workers(tmp_path, WORKER)
    main, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert main["world"] == other["world"] == 2
    assert main["none"] == other["none"] == "went on"
    # The main process's own problem: its line; the other process stops without one
    assert main["main"] == "UserError: main: found by rank 0"
    assert other["main"] == "SystemExit 2"
    # A problem only the other process found: the main process still says it (the `elsewhere` line)
    assert main["other"] == "UserError: other: elsewhere"
    assert other["other"] == "SystemExit 2"
    # Clean-up runs once, on the main process, and only when stopping
    assert main["cleaned"] == ["main", "other"]
    assert other["cleaned"] == []
