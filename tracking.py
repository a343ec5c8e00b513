"""Experiment trackers (config key report_to): accelerate's tracker classes (accelerate.tracking), which
the main process starts, gives the config as the run's parameters, logs every metric to and finishes.

A resumed launch continues the tracker runs of the checkpoint it resumes: their ids are kept in the
checkpoint's TrainState (`tracker_runs`), not in the run folder, so that the tracker run follows the
line of checkpoints as the weights do: a launch that starts afresh (no checkpoint yet, or resume_from
none) starts new runs, even in a folder whose earlier launch logged some steps; a resume from an
older checkpoint or from a copy in another folder continues the run of that checkpoint. MLflow and
W&B continue a run by its id; TensorBoard's run is its folder, tb_dir/experiment_id, whose writer
drops the points of the steps the resumed launch logs again (purge_step). MLflow keeps every point
logged, so those steps are not logged to it again (W&B skips them itself: its history only takes
steps after its latest).
"""
import dataclasses
import importlib.util
import json
import os
import re
import sys

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, MLflowTracker, TensorBoardTracker, WandBTracker

from distributed import stop_together


def missing(names):
    """One line naming the package to install for the first tracker of `names` that this environment
    lacks (or that the installed accelerate does not know), or None."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            return (f"report_to has '{name}', which is not installed: pip install {name} (requirements-trackers.txt "
                    "lists the tested versions), or remove it from report_to")
        if name not in LOGGER_TYPE_TO_CLASS:
            import accelerate

            return (f"report_to has '{name}', which accelerate {accelerate.__version__} has no tracker for: "
                    "pip install -U accelerate")
    return None


@dataclasses.dataclass
class Tracker:
    """A started tracker of report_to: accelerate's object, and the last step its run held when this
    launch continued it (later steps only are logged). A tracker that fails to log (a server gone)
    is dropped with a warning: the training, the checkpoints and the other trackers go on."""

    name: str
    tracker: object
    logged_through: int = 0
    failed: bool = False

    def log(self, metrics, step):
        if self.failed or step <= self.logged_through:
            return
        # accelerate's trackers drop, silently, a value that is not an int or a float
        values = {metric_name(self.name, key): float(value) for key, value in metrics.items()}
        self.attempt(f"logging step {step}", self.tracker.log, values, step=step)

    def finish(self):
        if not self.failed:
            self.attempt("finishing its run", self.tracker.finish)

    def attempt(self, what, call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a tracker fails in its own ways (network, server, disk)
            self.failed = True
            print(f"warning: report_to {self.name}: {what} failed ({first_line(err)}); no more metrics go to it in "
                  "this launch (the training, its checkpoints and the other trackers go on)", file=sys.stderr,
                  flush=True)


def start(cfg, state, accelerator):
    """The trackers of report_to, started on the main process (and [] on the others), each given the
    run's parameters (run_params); state.tracker_runs records the runs they log into. A tracker that
    cannot start (a server out of reach, a run id it does not know, no login) stops every process,
    with one line."""
    started, problem = [], None
    if accelerator.is_main_process:
        for name in cfg.report_to:
            try:
                started.append(open_tracker(name, cfg, state))
            except Exception as err:  # noqa: BLE001 - see Tracker.attempt
                problem = (f"report_to {name}: cannot start its run ({first_line(err)}); see docs/trackers.md, or "
                           "remove it from report_to")
                break
    stop_together(accelerator, problem, cleanup=lambda: finish(started))
    return started


def open_tracker(name, cfg, state):
    """Tracker `name`, started (continuing the run state.tracker_runs names, where it can) and given
    the run's parameters."""
    previous = state.tracker_runs.get(name)
    tracker = make(name, cfg, state.step, previous)
    if hasattr(tracker, "start"):  # accelerate before 1.8 starts a tracker in its constructor
        tracker.start()
    run = run_of(name, tracker)
    continued = previous is not None and run == previous
    if values := run_params(cfg, state, continued):
        tracker.store_init_configuration(values)
    if run is not None:
        state.tracker_runs[name] = run
    return Tracker(name, tracker, logged_through(name, run) if continued else 0)


def make(name, cfg, step, previous):
    """accelerate's tracker `name` for this run, not started. `step`: the step this launch starts
    from; `previous`: the run to continue (its id, or TensorBoard's folder), or None. MLflow reads
    MLFLOW_TRACKING_URI, and MLFLOW_EXPERIMENT_NAME and MLFLOW_RUN_ID win over experiment_id and the
    run to continue; W&B reads WANDB_MODE, WANDB_DIR and the rest of its environment itself. Another
    tracker gets experiment_id as its project name, and output_dir where it needs a folder; it starts
    a new run at each launch."""
    if name == "tensorboard":
        # A launch that died after its last checkpoint logged steps this one redoes. The writer's
        # SessionLog START makes TensorBoard drop every point of earlier launches from step + 1 on;
        # without it both copies show (each event file starts with file_version 2, which turns off
        # TensorBoard's guess from steps going backwards).
        return TensorBoardTracker(cfg.experiment_id, cfg.tb_dir, purge_step=step + 1)
    if name == "mlflow":
        return MLflowTracker(experiment_name=cfg.experiment_id, run_id=previous, run_name=cfg.experiment_id)
    if name == "wandb":
        return WandBTracker(os.environ.get("WANDB_PROJECT") or cfg.experiment_id, name=cfg.experiment_id,
                            id=previous, resume="allow")
    tracker = LOGGER_TYPE_TO_CLASS[name]
    if tracker.requires_logging_directory:
        return tracker(cfg.experiment_id, cfg.output_dir)
    return tracker(cfg.experiment_id)


def run_of(name, tracker):
    """The run a started tracker logs into, as tracker_runs keeps it: MLflow's and W&B's run id,
    TensorBoard's folder; None for the trackers whose runs a resume does not continue."""
    if name == "tensorboard":
        return tracker.logging_dir
    if name == "mlflow":
        return tracker.active_run.info.run_id
    if name == "wandb":
        return tracker.run.id
    return None


def run_params(cfg, state, continued):
    """The parameters to give a tracker's run: the config (params), or, to a run this launch
    continues, the keys whose value changed since the checkpoint, each as from_step_N/KEY: the run
    keeps the parameters it started with (MLflow refuses to change one)."""
    now = params(dataclasses.asdict(cfg))
    if not continued:
        return now
    then = params(state.config)
    return {f"from_step_{state.step}/{key}": value for key, value in now.items() if then.get(key) != value}


def params(config):
    """A config's values as run parameters: numbers, strings and booleans as they are, lists, objects
    and null as JSON text (TensorBoard's hparams take no others; MLflow would write Python's repr)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config.items()}


def logged_through(name, run):
    """The last step a continued run holds already: MLflow's (see the module's docstring); 0 for the
    other trackers."""
    if name != "mlflow":
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    keys = client.get_run(run).data.metrics
    return max((point.step for key in keys for point in client.get_metric_history(run, key)), default=0)


def metric_name(tracker, key):
    """A metric's name as `tracker` takes it. MLflow's names hold letters, digits and _-. :/ only:
    mrr@10 is mrr_at_10 there (as MTEB names it), any other character an underscore."""
    if tracker != "mlflow":
        return key
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def finish(trackers):
    for tracker in trackers:
        tracker.finish()


def first_line(err):
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
