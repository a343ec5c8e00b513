"""Train an F2LLM embedding model on a Ray cluster.

    python ray_train.py --config configs/config.json --num_workers 16 --use_gpu

Ray Train's TorchTrainer starts the workers and their process group; each worker runs run.py's
training (run.train: the same checks, data draw, loop, checkpoints and resume) under the
accelerate config's distribution, the published DeepSpeed ZeRO-2 by default (--accelerate_config
configs/accelerate_ddp.yaml for DDP), exactly as `accelerate launch --num_processes N` would.
Each complete checkpoint is reported to Ray Train by its path; a worker that dies
makes Ray restart the whole group (--max_failures times), which resumes from the checkpoint last
reported. The run folder (output_dir) must be storage every node sees, as for a multi-node
accelerate launch. Ray is optional: pip install -r requirements-ray.txt.
"""
# ruff: noqa: E402 - the imports follow the --help block, which prints before torch and Ray load
import sys

from config import CONFIG_OPTION  # light: no torch, so that --help stays fast

# Ray Train's worker options (argparse keyword arguments), beside --config and the config keys.
RAY_OPTIONS = {
    **CONFIG_OPTION,
    "num_workers": dict(type=int, default=1, metavar="N", help="training processes (one per GPU with --use_gpu)"),
    "use_gpu": dict(action="store_true", help="one GPU per worker (NCCL); without it the workers run on CPUs (gloo)"),
    "cpus_per_worker": dict(type=float, default=1, metavar="N", help="CPU cores Ray reserves for each worker"),
    "accelerate_config": dict(default="configs/accelerate_config.yaml", metavar="YAML",
                              help="accelerate config whose distribution the workers use, as `accelerate launch "
                                   "--config_file`: DeepSpeed ZeRO-2 (the default, published) or "
                                   "configs/accelerate_ddp.yaml"),
    "mixed_precision": dict(choices=("no", "fp16", "bf16"), default=None, metavar="no|fp16|bf16",
                            help="override the accelerate config's mixed_precision, as accelerate launch does"),
    "address": dict(default=None, metavar="ADDR",
                    help="Ray cluster to join (default: RAY_ADDRESS, else the cluster `ray start` began on this "
                         "machine, else a new one on this machine)"),
    "max_failures": dict(type=int, default=3, metavar="N",
                         help="restarts after a worker or node dies, each from the last checkpoint (-1: no limit)"),
    "storage_path": dict(default=None, metavar="DIR",
                         help="where Ray Train keeps its run state (default: output_dir/ray; storage every node "
                              "sees)"),
}

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    from config import cli_help

    print(cli_help(__doc__.split("\n\n")[0], "ray_train.py", RAY_OPTIONS), end="")
    sys.exit(0)

import json
import os
import signal
import socket
import tempfile
import threading
import time

from checkpoint import check_fresh_start
from config import REPO_DIR, load_config, parse_run_args
from errors import INTERRUPTED, UserError, exit_on_user_error

REPORT = "report.json"  # the file of each checkpoint reported to Ray Train (see report)
INTERRUPTED_LINE = ("interrupted before the workers started: the checkpoints already written are intact; run the "
                    "same command again")
INTERRUPTED_AGAIN = ("interrupted again: Ray kills the workers without a checkpoint; the checkpoints already written "
                     'are intact, and "resume_from": "latest" continues from the newest')


@exit_on_user_error(interrupted=INTERRUPTED_LINE)
def main(argv=None):
    args, overrides = parse_run_args(argv, __doc__.split("\n\n")[0], "ray_train.py", RAY_OPTIONS)
    status = train_on_ray(args.config, overrides, **{key: val for key, val in vars(args).items() if key != "config"})
    if status:
        sys.exit(status)


def train_on_ray(config_path, overrides=None, num_workers=1, use_gpu=False, cpus_per_worker=1,
                 accelerate_config="configs/accelerate_config.yaml", mixed_precision=None, address=None,
                 max_failures=3, storage_path=None):
    """Train as the config says on `num_workers` Ray Train workers; returns the exit status (0, or the
    workers' after a stop). Input errors, found by the driver or by any worker, are UserErrors."""
    cfg = load_config(config_path, overrides)  # a config's mistakes before the cluster is touched
    check_fresh_start(cfg.resume_from, cfg.run_dir)
    overrides = dict(overrides or {})
    if cfg.resume_from == "":  # the run folder holds no checkpoint: any a restart finds, this run wrote
        overrides["resume_from"] = "latest"
    if num_workers < 1:
        raise UserError(f"--num_workers {num_workers}: give at least 1")
    env = accelerate_env(accelerate_config, num_workers, mixed_precision)

    # Ray Train sends each print through a logger as well, and the workers' lines came out twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as err:
        raise UserError(f"ray_train.py needs Ray Train ({err}): pip install -r requirements-ray.txt")

    connect(ray, address)
    try:
        check_resources(ray.cluster_resources(), num_workers, cpus_per_worker, use_gpu)
        stop = ray.remote(num_cpus=0)(StopRequest).remote()
        trainer = TorchTrainer(
            worker,
            train_loop_config={"config": os.path.abspath(config_path), "overrides": overrides,
                               "env": env, "cwd": os.getcwd(), "stop": stop},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu
                                                                                           else {})}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=cfg.experiment_id,
                                 storage_path=os.path.abspath(storage_path or os.path.join(cfg.output_dir, "ray")),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 logging_config=LoggingConfig(log_level="WARNING")),  # else a line per report
        )
        result = fit_with_stops(trainer, stop)
    except ray.train.TrainingFailedError as err:
        raise UserError(f"training failed on the Ray cluster after {max_failures} restart(s): "
                        f"{last_line(err)} (the workers' output above has the details)")
    finally:
        ray.shutdown()
    outcome = result.metrics or {}
    if outcome.get("error"):
        raise UserError(outcome["error"])
    return outcome.get("status", 0)


class StopRequest:
    """A stop that the driver asks of the workers (a Ray actor, polled by the first worker)."""

    def __init__(self):
        self.signal = None

    def ask(self, name):
        self.signal = self.signal or name

    def asked(self):
        return self.signal


def fit_with_stops(trainer, stop):
    """trainer.fit() in a thread of its own (so that Ray leaves SIGINT to us), while this one takes
    Ctrl-C and SIGTERM as run.py does: the workers finish their step, save a checkpoint and stop
    (exit status 130 after Ctrl-C); a second one exits at once (Ray then kills the workers)."""
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in the main thread
            outcome["error"] = err

    def on_signal(signum, frame):
        if stop_asked:
            print(f"\n{INTERRUPTED_AGAIN}", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED)
        stop_asked.append(signum)
        print(f"\n{signal.Signals(signum).name}: the workers finish their step and save a checkpoint "
              "(Ctrl-C again stops them at once)", file=sys.stderr, flush=True)
        stop.ask.remote(signal.Signals(signum).name)

    stop_asked = []
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def accelerate_env(config_file, num_processes, mixed_precision=None):
    """The ACCELERATE_* variables `accelerate launch --config_file config_file --num_processes N` gives
    its workers (the distribution, DeepSpeed's settings, mixed precision), computed by accelerate's own
    launcher code, so that a Ray worker's Accelerator is the launched one's. The process group's
    variables (ranks, addresses) are Ray's."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    if not os.path.isfile(config_file):
        raise UserError(f"--accelerate_config {config_file} not found: use configs/accelerate_config.yaml "
                        "(DeepSpeed ZeRO-2) or configs/accelerate_ddp.yaml (DDP)")
    argv = ["--config_file", config_file, "--num_processes", str(num_processes), "--main_process_port", "0"]
    if mixed_precision:
        argv += ["--mixed_precision", mixed_precision]
    try:
        args, defaults, mixed_precision_from_file = _validate_launch_command(launch_command_parser().parse_args(
            [*argv, "run.py"]))
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"--accelerate_config {config_file}: accelerate cannot read it ({err})")
    if args.use_deepspeed:  # as accelerate's launch_command: which DeepSpeed fields the file set
        fields = list(defaults.deepspeed_config) if defaults else []
        fields += ["mixed_precision"] if mixed_precision_from_file else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


def check_resources(cluster, num_workers, cpus_per_worker, use_gpu):
    """One line, instead of Ray waiting for ever, when the cluster lacks what the workers ask for."""
    need = {"CPU": num_workers * cpus_per_worker, **({"GPU": num_workers} if use_gpu else {})}
    short = [f"{amount:g} {kind} (the cluster has {cluster.get(kind, 0):g})" for kind, amount in need.items()
             if cluster.get(kind, 0) < amount]
    if short:
        raise UserError(f"{num_workers} worker(s) need {' and '.join(short)}: lower --num_workers or "
                        "--cpus_per_worker, or add nodes to the cluster (ray start --address HEAD:PORT on each)")


NO_CLUSTER = "is `ray start --head` running there, and is --address its GCS address (HEAD:6379)?"


def connect(ray, address):
    """ray.init, or one line: a cluster that cannot be reached, or one that wants a token this process
    does not send (Ray's `ray start --head` turns token authentication on by itself when
    ~/.ray/auth_token exists, but a client given an explicit address sends the token only when told)."""
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # Ray retries an address where nothing listens for minutes, deaf to Ctrl-C.
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as err:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {err.strerror or err}; {NO_CLUSTER}")
    try:
        ray.init(address=address, log_to_driver=True, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [REPO_DIR,
                                                                                       os.environ.get("PYTHONPATH")]))}})
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        causes, cause = [], err
        while cause is not None and len(causes) < 10:
            causes.append(f"{type(cause).__name__}: {cause}")  # Ray keeps the GCS client's refusal as text
            cause = cause.__cause__ or cause.__context__
        if any("AuthenticationError" in cause or "InvalidAuthToken" in cause for cause in causes):
            raise UserError(f"the Ray cluster at {address} uses token authentication and refused this driver: "
                            "export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token (or "
                            "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), and run again (docs/ray.md)")
        raise UserError(f"cannot connect to the Ray cluster at {address}: {last_line(err)}; {NO_CLUSTER}")


def last_line(err):
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def worker(spec):
    """One Ray Train worker: run.train in the launch's folder and accelerate environment. A restarted
    worker (Ray restarts the whole group) resumes from the checkpoint last reported (or, before any
    report, as resume_from says: "latest" for a run that started afresh). The outcome goes
    to the driver as the final report: the exit status, and a UserError's line (found by one process;
    the others stop with SystemExit(2) at the same point)."""
    import ray.train

    import run

    if os.path.isdir(spec["cwd"]):  # the same folder on every node: relative paths in the config hold
        os.chdir(spec["cwd"])
    os.environ.update(spec["env"])
    overrides = dict(spec["overrides"])
    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as folder, open(os.path.join(folder, REPORT)) as f:
            path = json.load(f).get("path")
        if path:
            overrides["resume_from"] = path
            if ray.train.get_context().get_world_rank() == 0:
                print(f"Ray Train restarted the workers: resuming from the checkpoint last reported, {path}",
                      flush=True)
    hooks = run.Hooks(saved=lambda path, step: report({"step": step}, os.path.abspath(path)),
                      stop_requested=Poll(spec["stop"]) if ray.train.get_context().get_world_rank() == 0 else None)
    status, error = 0, ""
    try:
        status = run.train(spec["config"], overrides=overrides, hooks=hooks) or 0
    except UserError as err:
        status, error = 2, str(err)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    report({"status": status, "error": error})


class Poll:
    """The driver's StopRequest, asked at most once a second (a call to the actor takes a few ms)."""

    def __init__(self, stop):
        self.stop, self.last, self.signal = stop, 0.0, None

    def __call__(self):
        import ray

        if self.signal is None and time.monotonic() - self.last >= 1:
            self.last = time.monotonic()
            self.signal = ray.get(self.stop.asked.remote())
        return self.signal


def report(metrics, path=None):
    """Report `metrics` to Ray Train (from every worker, as Ray's report is collective), with a
    checkpoint from rank 0: a folder holding only REPORT, the metrics and `path`, the checkpoint folder
    a restart resumes from (Ray's copy of it costs nothing). Ray keeps the metrics of checkpoints only:
    the driver reads the final status and error from the last one."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, REPORT), "w") as f:
            json.dump({**metrics, "path": path}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


if __name__ == "__main__":
    main()
