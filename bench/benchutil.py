"""Shared helpers of the benchmarks: import paths, machine description, timing, tables.

Importing this module puts the repository root (for data, model, loss, demo, ...) on sys.path, so
that `python bench/<script>.py` works from anywhere (Python puts bench/ itself there, the script's
folder), and sets two environment defaults (an explicit setting wins). It does no other work:

- HF_HUB_OFFLINE=1: nothing is downloaded.
- DS_ACCELERATOR=cpu where no NVIDIA device exists: DeepSpeed (imported by transformers'
  integrations) then skips its accelerator probe and the warning it prints to stdout.

OpenMP is left at its default (threads spin a while at barriers), as training runs it. On a
machine shared with other busy processes that default hurts the packed layout, which runs many
small kernels: with one other process busy on a 2-core machine, a packed step took ~4x longer
(over 10x under heavier load), a padded one ~2x. `OMP_WAIT_POLICY=PASSIVE` makes both robust there,
at ~2x slower packed steps on a quiet machine. The machine line prints the load average.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """One line: CPU model, cores usable by this process, torch threads, Python, date (UTC)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"machine: {cpu_model()}, {cores} cores ({os.cpu_count()} logical CPUs), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'default'}), "
            f"Python {platform.python_version()}; date: {now}; {load()}")


def proc_status_kb(field, pid="self"):
    """A kB field of /proc/PID/status (VmHWM, VmRSS, RssAnon, ...); None where there is none (not
    Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# A child's ru_maxrss starts at its parent's peak RSS (Linux records the forked copy of the parent's
# pages at exec), so a command's own peak comes from a small process in between: it starts the
# command and writes the command's ru_maxrss (kB: the command and its waited children) to a file.
_PEAK_RSS_LAUNCHER = ("import os, subprocess, sys\n"
                      "child = subprocess.Popen(sys.argv[2:])\n"
                      "_, status, usage = os.wait4(child.pid, 0)\n"
                      "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
                      "sys.exit(os.waitstatus_to_exitcode(status))")


def with_peak_rss(cmd, rss_path):
    """`cmd` run through the launcher that writes its own peak RSS (kB) to rss_path."""
    return [sys.executable, "-c", _PEAK_RSS_LAUNCHER, rss_path, *cmd]


def load_average():
    """The 1-minute load average (other processes compete for the cores), or None."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load():
    value = load_average()
    return "load average unknown" if value is None else f"load average {value:.2f}"


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def alternate(models, batches, warmup, step):
    """Run `step(*models[layout], batch)` for every layout on the same batches, the layouts taking turns
    within each batch in an order that swaps every batch (drift and caches hit both alike):
    {layout: [step's result for each batch after the first `warmup`]}."""
    layouts = list(models)
    out = {layout: [] for layout in layouts}
    for i, batch in enumerate(batches):
        for layout in layouts if i % 2 == 0 else layouts[::-1]:
            result = step(*models[layout], batch)
            if i >= warmup:
                out[layout].append(result)
    return out


def two_decimals(value):
    """A number for a report line: two decimals, "?" when unknown (a load average /proc did not give)."""
    return "?" if value is None else f"{value:.2f}"


def median(values):
    return statistics.median(values)


def table(header, rows):
    """A plain text table: header is a list of column names, rows lists of cells (str or number)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              for r in cells]
    return "\n".join(lines)


def add_quick_flag(parser):
    parser.add_argument("--quick", action="store_true", help="small sizes (the whole suite in < 5 min on 2 cores)")
    return parser


def print_json(result):
    print(json.dumps(result, sort_keys=False), flush=True)


def emit(result, report):
    """A benchmark's ending: its human-readable report, then its JSON line; returns the result."""
    print(report(result))
    print_json(result)
    return result
