"""A scripted fault run: one training job killed again and again, as operators and schedulers kill
jobs, and relaunched each time with the same command and "resume_from": "latest"; it must end with
the weights and the loss curve of the same run left alone.

    python bench/fault_run.py [--kills 12] [--seed 0] [--work /tmp/fault_run]

The job is a 2-process DDP launch (float32, so that numbers compare) of a tiny Qwen3 on the demo's
data, 40 epochs of 24 steps, checkpointing every 10 steps. Each relaunch draws one fault: SIGKILL of
the whole process group (a lost node), SIGTERM of the group (preemption), SIGKILL of one worker
(torch elastic then stops the other), SIGKILL of the launcher alone (the workers' parent-death
signal stops them), or SIGKILL of the group while a checkpoint is being written. One relaunch goes
through the published ZeRO-2 yaml instead (a change of launch: the checkpoint is converted both
ways). Prints one line per launch and a verdict. Passes when every curve point logged before the
ZeRO-2 relaunch equals the uninterrupted DDP run's, none is missing, and the final weights are no
farther from that run's than an uninterrupted ZeRO-2 run's are (the two launches sum float32 in
other orders, and training amplifies the 1e-7 differences over the steps;
tests/test_resume_faults.py pins the conversion itself to 1e-5 over a short run); exits 1 otherwise.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import benchutil  # noqa: F401 - the repository on sys.path

import demo

BIN = os.path.dirname(sys.executable)
EPOCHS = 40  # 960 steps: about 30 s of training here, room for the kills
FAULTS = ("kill_group", "term_group", "kill_worker", "kill_launcher", "kill_while_saving")


def build(work):
    """Backbone and tokenized data, as the tests' `tiny` fixture."""
    texts = demo.write_sample_data(f"{work}/raw", f"{work}/eval", people_per_dataset=60, num_negatives=10)
    tokenizer = demo.build_tokenizer(f"{work}/backbone", texts, vocab_size=400)
    demo.build_backbone(f"{work}/backbone", len(tokenizer), hidden_size=32, num_layers=2)
    subprocess.run([sys.executable, "tokenize_data_qwen.py", "--model_path", f"{work}/backbone", "--input_dir",
                    f"{work}/raw", "--output_dir", f"{work}/tokenized", "--max_seq_length", "64", "--num_proc", "1"],
                   cwd=benchutil.REPO_DIR, check=True, capture_output=True)


def config(work, name):
    import json

    values = dict(model_path=f"{work}/backbone", train_data_path=f"{work}/tokenized", experiment_id="run",
                  output_dir=f"{work}/{name}/out", tb_dir=f"{work}/{name}/tb", cache_dir=f"{work}/cache",
                  train_batch_size=32, max_seq_length=32, num_hard_neg=2, learning_rate=2e-3, min_lr=1e-5,
                  warmup_steps=3, train_epochs=EPOCHS, log_interval=1, checkpointing_steps=10, validation_steps=0,
                  gradient_checkpointing=False, save_total_limit=2, resume_from="latest")
    path = f"{work}/{name}.json"
    with open(path, "w") as f:
        json.dump(values, f)
    return path, values


def command(path, yaml="configs/accelerate_ddp.yaml", port=29650):
    return [os.path.join(BIN, "accelerate"), "launch", "--config_file", yaml, "--num_processes", "2",
            "--main_process_port", str(port), "--mixed_precision", "no", "run.py", "--config", path]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": BIN + os.pathsep + os.environ["PATH"]}


def workers(pid):
    """The training processes under the launcher `pid` (its children running run.py)."""
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid and any(part.endswith(b"run.py") for part in cmd):
                out.append(int(stat))
    return sorted(out)


def training_started(run_dir, since):
    path = os.path.join(run_dir, "args.json")
    return os.path.isfile(path) and os.path.getmtime(path) >= since


def saving(run_dir):
    return any(name.startswith(".step_") and name.endswith(".partial") for name in os.listdir(run_dir))


def launch(path, run_dir, fault, rng, yaml, port):
    """One launch of the job, faulted as `fault` says (None: left to finish): (fault done, status)."""
    start = time.time()
    proc = subprocess.Popen(command(path, yaml, port), cwd=benchutil.REPO_DIR, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done = None
    while proc.poll() is None and fault is not None and done is None:
        if not (os.path.isdir(run_dir) and training_started(run_dir, start)):
            time.sleep(0.05)
            continue
        if fault == "kill_while_saving":
            deadline = time.time() + 20
            while proc.poll() is None and not saving(run_dir) and time.time() < deadline:
                time.sleep(0.002)
            if proc.poll() is None and saving(run_dir):
                signal_all(proc, signal.SIGKILL)
                done = fault
            break
        time.sleep(rng.uniform(0.3, 4.0))
        if proc.poll() is not None:
            break
        if fault == "kill_group":
            signal_all(proc, signal.SIGKILL)
        elif fault == "term_group":
            signal_all(proc, signal.SIGTERM)
        elif fault == "kill_worker":
            pids = workers(proc.pid)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
        elif fault == "kill_launcher":
            alive = workers(proc.pid)
            proc.kill()
            deadline = time.time() + 120
            while any(os.path.exists(f"/proc/{p}") for p in alive) and time.time() < deadline:
                time.sleep(0.2)
            if any(os.path.exists(f"/proc/{p}") for p in alive):
                raise SystemExit(f"workers {alive} outlived their launcher by 120 s")
        done = fault
    left = workers(proc.pid)
    status = proc.wait(timeout=600)
    deadline = time.time() + 120
    while any(os.path.exists(f"/proc/{p}") for p in left) and time.time() < deadline:
        time.sleep(0.2)
    return done, status, time.time() - start


def signal_all(proc, sig):
    """`sig` to the launcher's group and to its workers (torch elastic starts each in a session of
    its own, so the group alone misses them), as a scheduler signals every process of a job."""
    pids = workers(proc.pid)
    os.killpg(proc.pid, sig)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def compare(reference, other, split):
    """(largest weight difference, largest relative difference of the curve points up to step `split`
    and after it, points missing) of two runs."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = load_file(os.path.join(reference["output_dir"], "run", f"epoch_{EPOCHS}", "model.safetensors"))
    b = load_file(os.path.join(other["output_dir"], "run", f"epoch_{EPOCHS}", "model.safetensors"))
    weights = max((a[k] - b[k]).abs().max().item() for k in a)

    def curve(values):
        events = EventAccumulator(os.path.join(values["tb_dir"], "run"))
        events.Reload()
        return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
                if tag.startswith("train/") and not tag.endswith("_per_s")}

    ca, cb = curve(reference), curve(other)
    worst, missing = [0.0, 0.0], 0
    for tag, points in ca.items():
        for step, value in points.items():
            if step not in cb.get(tag, {}):
                missing += 1
            else:
                after = step > split
                worst[after] = max(worst[after], abs(value - cb[tag][step]) / max(abs(value), 1e-6))
    return weights, worst, missing


def newest_checkpoint(run_dir):
    import checkpoint

    return max([step for step, path in checkpoint.candidates(run_dir) if checkpoint.problem_with(path) is None],
               default=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/fault_run")
    args = p.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    build(args.work)
    ref_path, reference = config(args.work, "reference")
    _, status, took = launch(ref_path, os.path.join(reference["output_dir"], "run"), None, rng,
                             "configs/accelerate_ddp.yaml", 29650)
    print(f"reference: status {status}, {took:.0f} s", flush=True)
    # The same run under ZeRO-2, left alone: how far float32 sums in another order carry a run from
    # the DDP reference over its steps (training amplifies 1e-7 differences).
    spread_path, spread = config(args.work, "zero2_reference")
    _, status, took = launch(spread_path, os.path.join(spread["output_dir"], "run"), None, rng,
                             "configs/accelerate_config.yaml", 29649)
    print(f"ZeRO-2 reference: status {status}, {took:.0f} s", flush=True)
    path, job = config(args.work, "job")
    run_dir = os.path.join(job["output_dir"], "run")
    faults = [FAULTS[i % len(FAULTS)] for i in range(args.kills)]
    rng.shuffle(faults)
    change = rng.randrange(args.kills * 2 // 3, args.kills)  # the launch that goes through ZeRO-2
    # ... and is stopped by SIGTERM, so that it leaves a checkpoint of its own for the next launch
    term = faults.index("term_group")
    faults[term], faults[change - 1] = faults[change - 1], faults[term]
    done, launches, kinds, split = [], 0, [], None
    while True:
        launches += 1
        fault = faults[len(done)] if len(done) < len(faults) else None
        yaml = "configs/accelerate_config.yaml" if launches == change else "configs/accelerate_ddp.yaml"
        kinds.append(yaml)
        if launches == change:  # from here on the run went once through ZeRO-2's float32 sums, not DDP's
            split = newest_checkpoint(run_dir)
        if launches == change + 1:
            print(f"the ZeRO-2 launch resumed from step {split} and saved step {newest_checkpoint(run_dir)}",
                  flush=True)
        did, status, took = launch(path, run_dir, fault, rng, yaml, 29651 + launches % 40)
        finished = os.path.isdir(os.path.join(run_dir, f"epoch_{EPOCHS}")) and status == 0 and did is None
        print(f"launch {launches} ({os.path.basename(yaml)}): fault {did or '-'}, status {status}, {took:.0f} s",
              flush=True)
        if did is not None:
            done.append(did)
        if finished or launches > 3 * args.kills + 5:
            break
    weights, (exact, close), missing = compare(reference, job, split)
    apart, _, _ = compare(reference, spread, 0)
    ok = exact == 0 and missing == 0 and weights <= apart
    print(f"{len(done)} faults ({', '.join(f'{f} x{done.count(f)}' for f in FAULTS)}) in {launches} launches, "
          f"{sum('accelerate_config' in k for k in kinds)} through ZeRO-2 (resumed from step {split}). Against the "
          f"uninterrupted DDP run: curve points up to step {split} "
          f"{'identical' if exact == 0 else f'off by {exact:.1e}'}, after it off by at most {close:.1e} (relative); "
          f"none missing: {missing == 0}; final weights apart by "
          f"{weights:.2e}, where the uninterrupted ZeRO-2 run is {apart:.2e} apart; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
