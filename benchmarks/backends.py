"""torch vs deepspeed client backends on the same client workload, side by side.

    python benchmarks/backends.py [--config experiments/quickstart.yaml] [--clients 4]
                                  [--steps 20] [--repeats 2]

The workload: the config's model, LoRA and batch settings, `--clients` clients of its partition
trained one after another by one worker (as a ClientWorker does), `--steps` local steps each. For
every backend variant, in a fresh process of its own (so that peak memory is that variant's):

* seconds per local optimizer step, over the clients after the first (warm engine, warm caches);
* peak memory: the process's peak RSS on CPU; on a GPU also torch's peak allocated CUDA memory;
* engine build time (`deepspeed.initialize`; JIT op builds are cached and not part of it).

Then DeepSpeed engine reuse (the fedsim design: one engine per worker, reset per client) against
re-initialising an engine for every client, in seconds per client.

Variants run interleaved, `--repeats` times each, and the median is reported; run it on a quiet
machine and read the ratios to torch, which move less than the absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    from fedsim.driver import materialise, prepare_run, worker_spec
    from fedsim.model import load_tokenizer

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


def run_variant(name: str, config: str, clients: int, steps: int) -> dict[str, float]:
    """One variant in this process: the clients one after another on one worker."""
    from fedsim.client.worker import ClientTask, ClientWorker

    backend, deepspeed = VARIANTS[name]
    with tempfile.TemporaryDirectory() as out:
        spec, _ = _workload(config, steps, out)
        spec = dataclasses.replace(
            spec, backend=backend, settings=dataclasses.replace(spec.settings, deepspeed=deepspeed)
        )
        start = time.perf_counter()
        worker = ClientWorker(spec)
        build = time.perf_counter() - start
        adapter = worker.initial_adapter()
        seconds = []
        for c in range(clients):
            outcome, _ = worker.train(ClientTask(1, c, 1000 + c), adapter)
            assert outcome.ok, outcome.error
            seconds.append(outcome.train_seconds)
        init = getattr(worker.trainer, "init_seconds", 0.0)
    return {
        "s_per_step": sum(seconds[1:]) / (steps * (clients - 1)),
        "worker_start_s": build,
        "engine_init_s": init,
        **_peak_memory(),
    }


def run_reuse(config: str, clients: int, steps: int) -> dict[str, float]:
    """Seconds per client: one engine reset per client vs a new engine for each client."""
    from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
    from fedsim.client.worker import ClientTask, ClientWorker

    with tempfile.TemporaryDirectory() as out:
        spec, _ = _workload(config, steps, out)
        zero2 = VARIANTS["ds-zero2"][1]
        spec = dataclasses.replace(
            spec, backend="deepspeed", settings=dataclasses.replace(spec.settings, deepspeed=zero2)
        )
        worker = ClientWorker(spec)
        adapter = worker.initial_adapter()
        worker.train(ClientTask(1, 0, 999), adapter)  # warm-up
        times = {"reuse": 0.0, "reinit": 0.0}
        for c in range(1, clients):
            start = time.perf_counter()
            worker.train(ClientTask(1, c, 1000 + c), adapter)
            times["reuse"] += time.perf_counter() - start
            start = time.perf_counter()
            worker.trainer = DeepSpeedTrainer(spec.settings)  # what re-initialising costs
            worker.trainer.prepare(worker.model)
            worker.train(ClientTask(1, c, 1000 + c), adapter)
            times["reinit"] += time.perf_counter() - start
    return {f"{k}_s_per_client": v / (clients - 1) for k, v in times.items()}


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
    if args.only == "reuse":
        print(json.dumps(run_reuse(args.config, args.clients, args.steps)))
        return
    if args.only:
        print(json.dumps(run_variant(args.only, args.config, args.clients, args.steps)))
        return

    common = ["--config", args.config, "--clients", str(args.clients), "--steps", str(args.steps)]
    names = args.variants.split(",")
    _child([*common, "--only", names[0]])  # untimed: builds the tiny model and JIT ops once
    results: dict[str, list[dict[str, float]]] = {n: [] for n in [*names, "reuse"]}
    for _ in range(args.repeats):
        for name in [*names, "reuse"]:  # interleaved, so drifting load hits all alike
            results[name].append(_child([*common, "--only", name]))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{args.clients} clients x {args.steps} local steps, {args.config}, {device}, "
        f"median of {args.repeats}"
    )
    gpu = torch.cuda.is_available()
    header = f"{'variant':<18} {'s/step':>8} {'x torch':>8} {'peak RSS MB':>12}"
    header += f" {'peak CUDA MB':>13}" if gpu else ""
    print(header + f" {'engine init s':>14}")
    base = med(names[0], "s_per_step")
    for name in names:
        line = (
            f"{name:<18} {med(name, 's_per_step'):>8.4f} "
            f"{med(name, 's_per_step') / base:>8.2f} {med(name, 'peak_rss_mb'):>12.0f}"
        )
        line += f" {med(name, 'peak_cuda_mb'):>13.0f}" if gpu else ""
        print(line + f" {med(name, 'engine_init_s'):>14.2f}")
    reuse, reinit = med("reuse", "reuse_s_per_client"), med("reuse", "reinit_s_per_client")
    print(
        f"ZeRO-2 engine reused: {reuse:.3f} s per client; re-initialised per client: "
        f"{reinit:.3f} s per client ({reinit / reuse:.2f}x)"
    )


if __name__ == "__main__":
    main()
