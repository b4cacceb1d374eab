"""fedsim's own cost over the compute floor, measured side by side in one process.

    python benchmarks/overhead.py [--config experiments/quickstart.yaml] [--rounds 10]

(a) floor: the same federated workload as a plain loop in this process: the base model built once,
    the same clients selected, trained with the same trainer and averaged, no Ray, no checkpoints.
(b) fedsim: `run_experiment` on the same config, which starts a local Ray instance, the worker
    pool and the aggregator, and writes every round's checkpoint.

Both are run for 1 worker (the floor on 1 thread) and for 2 workers (the floor on 2 threads), and
the ratios b/a are printed, for the whole job and for the round loop alone. Run it on an otherwise
idle machine: absolute times are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedsim.client.trainer import TorchTrainer
from fedsim.config import clients_per_round, load_config
from fedsim.data.shards import ShardStore
from fedsim.driver import run_experiment, worker_spec
from fedsim.model import attach_lora, get_adapter, load_base_model, load_tokenizer, set_adapter
from fedsim.prepare import build_shards, materialise, prepare_model, prepare_run
from fedsim.seeds import Stream, seed_of
from fedsim.server.aggregation import WeightedDeltaSum
from fedsim.server.selection import client_seed, select_clients
from fedsim.server.strategies import FedAvg


def floor_loop(cfg, threads: int) -> dict[str, float]:
    """The workload as a plain loop; returns total and round-loop seconds."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    prep = prepare_run(cfg, log=lambda _: None)
    shards = materialise(prep, overwrite=False, log=lambda _: None)
    build_shards(prep, shards, log=lambda _: None)  # the loop reads any client's block
    spec = worker_spec(cfg, prep.model_path, shards, load_tokenizer(prep.model_path).pad_token_id)
    model = attach_lora(
        load_base_model(spec.model_path), spec.lora, seed=seed_of(spec.seed, Stream.LORA_INIT)
    )
    store, trainer, strategy = ShardStore(shards), TorchTrainer(spec.settings), FedAvg()
    global_adapter = get_adapter(model)
    sizes = [len(c) for c in prep.data.clients]
    rounds_start = time.perf_counter()
    for r in range(1, cfg.run.rounds + 1):
        selected = select_clients(cfg.run.seed, r, cfg.data.num_clients, clients_per_round(cfg))
        acc = WeightedDeltaSum(global_adapter, sum(sizes[c] for c in selected))
        for c in selected:
            set_adapter(model, global_adapter)
            ids, labels = store.client_examples(c).to_lists()
            trainer.train(model, ids, labels, client_seed(cfg.run.seed, r, c))
            acc.add(get_adapter(model), sizes[c])
        global_adapter = strategy.apply(global_adapter, acc.mean())
    end = time.perf_counter()
    return {"total": end - start, "rounds": end - rounds_start, "adapter": global_adapter}


def fedsim_run(cfg) -> dict[str, float]:
    start = time.perf_counter()
    result = run_experiment(cfg, log=lambda _: None, show_progress=False)
    total = time.perf_counter() - start
    rounds = sum(m["seconds"] for m in result.metrics)
    train = 0.0
    for r in range(1, cfg.run.rounds + 1):
        info = json.loads((result.run_dir / f"rounds/round_{r:04d}/round.json").read_text())
        train += sum(c["train_seconds"] for c in info["client_results"])
    return {"total": total, "rounds": rounds, "client_train": train, "run_dir": result.run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = parser.parse_args()
    prepare_model(load_config(args.config), log=lambda _: None)  # build the tiny model untimed

    print(
        f"{'workers':>7} {'floor s':>8} {'fedsim s':>9} {'b/a total':>9} "
        f"{'floor rounds':>12} {'fedsim rounds':>13} {'b/a rounds':>10} {'same adapter':>12}"
    )
    for workers in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                f"run.rounds={args.rounds}",
                f"run.output_dir={tmp}",
                f"cluster.num_workers={workers}",
                "cluster.cpus_per_worker=1",
            ]
            floor_cfg = load_config(args.config, [*overrides, "run.name=floor"])
            fedsim_cfg = load_config(args.config, [*overrides, "run.name=fedsim"])
            a = floor_loop(floor_cfg, threads=workers)
            b = fedsim_run(fedsim_cfg)
            final = load_file(
                Path(b["run_dir"]) / f"rounds/round_{args.rounds:04d}/adapter_model.safetensors"
            )
            same = all(torch.equal(final[k], a["adapter"][k]) for k in final)
            print(
                f"{workers:>7} {a['total']:>8.1f} {b['total']:>9.1f} "
                f"{b['total'] / a['total']:>9.2f} "
                f"{a['rounds']:>12.1f} {b['rounds']:>13.1f} {b['rounds'] / a['rounds']:>10.2f} "
                f"{same!s:>12}"
            )
            print(
                f"        fedsim: start-up (Ray, workers, model loads) "
                f"{b['total'] - b['rounds']:.1f} s; clients trained "
                f"{b['client_train'] / workers:.1f} s per worker in {b['rounds']:.1f} s of rounds "
                "(the rest: scheduling, aggregation, checkpoints)"
            )


if __name__ == "__main__":
    main()
