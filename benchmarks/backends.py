"""torch vs deepspeed client backends on the same client workload, side by side.

    python benchmarks/backends.py [--config experiments/quickstart.yaml] [--clients 4]
                                  [--steps 20] [--repeats 2]

The workload: the config's model, LoRA and batch settings, `--clients` clients of its partition
trained one after another by one worker (as a ClientWorker does), `--steps` local steps each.

* seconds per local optimizer step: one worker per variant in one process, after a warm-up
  client each, the variants take turns client by client (`--repeats` passes over the clients),
  so that a machine whose load drifts slows them all alike; the median over clients is reported;
* peak memory: each variant alone in a fresh process, the clients trained once: the process's
  peak RSS on CPU, and torch's peak allocated CUDA memory on a GPU;
* engine build time (`deepspeed.initialize`; JIT op builds are cached and not part of it);
* DeepSpeed engine reuse (fedsim's design: one engine per worker, reset per client) against
  re-initialising an engine for every client, taking turns the same way, in seconds per client.

Read the ratios to torch, which move less than the absolute times on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS: dict[str, tuple[str, dict | None]] = {
    "torch": ("torch", None),
    "ds-zero0": ("deepspeed", None),
    "ds-zero2": ("deepspeed", {"zero_optimization": {"stage": 2}}),
    "ds-zero2-bf16": ("deepspeed", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}),
    "ds-zero2-offload": (
        "deepspeed",
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    ),
}


def _workload(config: str, steps: int, out: str):
    """A WorkerSpec for `config` (shards written under `out`) with `steps` local steps."""
    from fedsim.config import load_config
    from fedsim.driver import worker_spec
    from fedsim.model import load_tokenizer
    from fedsim.prepare import materialise, prepare_run

    cfg = load_config(config, [f"run.output_dir={out}", f"client.local_steps={steps}"])
    if torch.cuda.is_available():
        cfg.cluster.gpus_per_worker = 1.0
    prep = prepare_run(cfg, log=lambda _: None)
    shards = materialise(prep, overwrite=False, log=lambda _: None)
    pad = load_tokenizer(prep.model_path).pad_token_id
    return worker_spec(cfg, prep.model_path, shards, pad), [len(c) for c in prep.data.clients]


def _peak_memory() -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _worker(spec, name: str):
    from fedsim.client.worker import ClientWorker

    backend, deepspeed = VARIANTS[name]
    settings = spec.settings.with_client(deepspeed=deepspeed)
    start = time.perf_counter()
    worker = ClientWorker(dataclasses.replace(spec, backend=backend, settings=settings))
    return worker, time.perf_counter() - start


def run_memory(name: str, config: str, clients: int, steps: int) -> dict[str, float]:
    """One variant alone in this process: its peak memory and engine build time."""
    from fedsim.protocol import ClientTask

    with tempfile.TemporaryDirectory() as out:
        spec, _ = _workload(config, steps, out)
        worker, start_s = _worker(spec, name)
        adapter = worker.initial_adapter()
        for c in range(clients):
            outcome, _ = worker.train(ClientTask(1, c, 1000 + c), adapter)
            assert outcome.ok, outcome.error
    return {
        "worker_start_s": start_s,
        "engine_init_s": getattr(worker.trainer, "init_seconds", 0.0),
        **_peak_memory(),
    }


def run_timing(names: list[str], config: str, clients: int, steps: int, repeats: int):
    """Seconds per step of every variant, the variants taking turns client by client."""
    from fedsim.protocol import ClientTask

    with tempfile.TemporaryDirectory() as out:
        spec, _ = _workload(config, steps, out)
        workers = {name: _worker(spec, name)[0] for name in names}
        adapter = workers[names[0]].initial_adapter()
        per_step: dict[str, list[float]] = {name: [] for name in names}
        for worker in workers.values():
            worker.train(ClientTask(1, 0, 999), adapter)  # warm-up
        for _ in range(repeats):
            for c in range(clients):
                for name, worker in workers.items():
                    outcome, _ = worker.train(ClientTask(1, c, 1000 + c), adapter)
                    assert outcome.ok, outcome.error
                    per_step[name].append(outcome.train_seconds / steps)
    return per_step


def run_reuse(config: str, clients: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per client: one ZeRO-2 engine reset per client vs a new engine for each client."""
    from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
    from fedsim.protocol import ClientTask

    with tempfile.TemporaryDirectory() as out:
        spec, _ = _workload(config, steps, out)
        reused, _ = _worker(spec, "ds-zero2")
        fresh, _ = _worker(spec, "ds-zero2")
        adapter = reused.initial_adapter()
        reused.train(ClientTask(1, 0, 999), adapter)  # warm-up
        times: dict[str, list[float]] = {"reuse": [], "reinit": []}
        for _ in range(repeats):
            for c in range(clients):
                start = time.perf_counter()
                reused.train(ClientTask(1, c, 1000 + c), adapter)
                times["reuse"].append(time.perf_counter() - start)
                start = time.perf_counter()
                fresh.trainer = DeepSpeedTrainer(fresh.spec.settings)  # a new engine
                fresh.trainer.prepare(fresh.model)
                fresh.train(ClientTask(1, c, 1000 + c), adapter)
                times["reinit"].append(time.perf_counter() - start)
    return times


def _child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # a child process: one measurement
    args = parser.parse_args()
    names = args.variants.split(",")
    if args.only:
        if args.only == "timing":
            result = run_timing(names, args.config, args.clients, args.steps, args.repeats)
        elif args.only == "reuse":
            result = run_reuse(args.config, args.clients, args.steps, args.repeats)
        else:
            result = run_memory(args.only, args.config, args.clients, args.steps)
        print(json.dumps(result))
        return

    common = ["--config", args.config, "--clients", str(args.clients), "--steps", str(args.steps)]
    common += ["--repeats", str(args.repeats), "--variants", args.variants]
    memory = {name: _child([*common, "--only", name]) for name in names}  # builds caches first
    timing = _child([*common, "--only", "timing"])
    reuse = _child([*common, "--only", "reuse"])

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{args.clients} clients x {args.steps} local steps x {args.repeats} passes, "
        f"{args.config}, {device}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    header = f"{'variant':<18} {'s/step':>8} {'x torch':>8} {'peak RSS MB':>12}"
    header += f" {'peak CUDA MB':>13}" if gpu else ""
    print(header + f" {'engine init s':>14}")
    base = statistics.median(timing[names[0]])
    for name in names:
        step = statistics.median(timing[name])
        line = f"{name:<18} {step:>8.4f} {step / base:>8.2f} {memory[name]['peak_rss_mb']:>12.0f}"
        line += f" {memory[name]['peak_cuda_mb']:>13.0f}" if gpu else ""
        print(line + f" {memory[name]['engine_init_s']:>14.2f}")
    kept, rebuilt = statistics.median(reuse["reuse"]), statistics.median(reuse["reinit"])
    print(
        f"ZeRO-2 engine reused: {kept:.3f} s per client; re-initialised per client: "
        f"{rebuilt:.3f} s per client ({rebuilt / kept:.2f}x)"
    )


if __name__ == "__main__":
    main()
