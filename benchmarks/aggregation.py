"""Streaming FedAvg throughput against a memory-copy baseline of the same bytes.

    python benchmarks/aggregation.py [--sizes-mb 1,16,256,1024] [--clients 5]

For each adapter size, folds `--clients` float32 adapters into `WeightedDeltaSum` (the
aggregator's exact, order-independent accumulator) and times it against `torch.Tensor.copy_` of
the same adapters into a preallocated buffer. Prints GB/s of adapter bytes for both and their
ratio (target: the fold at least 0.5 of the copy). Same process, same threads, interleaved
repeats, best of each.

For scale, `f32/copy` is a plain float32 `acc.add_(update, alpha=weight)`: the fastest streaming
weighted sum there is (it reads 12 bytes per 4-byte element against the copy's 8), but its bits
depend on the arrival order. The exact fold reads the update and the global adapter and reads and
writes an int64 accumulator: 24 bytes per element, so a memory-bound machine caps it near 1/3 of
the copy.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsim.server.aggregation import WeightedDeltaSum


def _adapter(total_bytes: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    numel = total_bytes // 4
    tensors, rest, i = {}, numel, 0
    while rest:  # LoRA-like: many 2-D tensors
        n = min(rest, 4096 * 64)
        tensors[f"layer{i}.lora_A.weight"] = torch.randn(
            n // 64 or 1, 64 if n >= 64 else n, generator=gen
        )
        rest -= tensors[f"layer{i}.lora_A.weight"].numel()
        i += 1
    return tensors


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1,16,256,1024")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"{'adapter MB':>10} {'copy GB/s':>10} {'fold GB/s':>10} {'fold/copy':>9} {'f32/copy':>9}"
    )
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        ref = _adapter(mb << 20, 0)
        updates = [_adapter(mb << 20, 1 + i) for i in range(args.clients)]
        sink = {k: torch.empty_like(v) for k, v in ref.items()}
        nbytes = args.clients * sum(v.numel() * 4 for v in ref.values())

        def copy(updates=updates, sink=sink) -> None:
            for u in updates:
                for k, v in u.items():
                    sink[k].copy_(v)

        def fold(updates=updates, ref=ref) -> None:
            acc = WeightedDeltaSum(ref, max_total_weight=100 * args.clients)
            for i, u in enumerate(updates):
                acc.add(u, 10 + i)

        def float_add(updates=updates, ref=ref) -> None:
            acc = {k: torch.zeros_like(v) for k, v in ref.items()}
            for i, u in enumerate(updates):
                for k, v in u.items():
                    acc[k].add_(v, alpha=float(10 + i))

        t_copy, t_fold = _time(copy, args.repeats), _time(fold, args.repeats)
        t_add = _time(float_add, args.repeats)
        print(
            f"{mb:>10} {nbytes / t_copy / 1e9:>10.2f} {nbytes / t_fold / 1e9:>10.2f} "
            f"{t_copy / t_fold:>9.2f} {t_copy / t_add:>9.2f}"
        )


if __name__ == "__main__":
    main()
