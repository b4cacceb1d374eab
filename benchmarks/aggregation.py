"""Streaming FedAvg throughput against a memory-copy baseline of the same bytes.

    python benchmarks/aggregation.py [--sizes-mb 1,16,256,1024] [--clients 5] [--threads 1,2]
    python benchmarks/aggregation.py --cluster [--threads 1,2] [--gpus 64] [--round-clients 1000]
    python benchmarks/aggregation.py --profile

For each adapter size, folds `--clients` float32 adapters into `WeightedDeltaSum` (the
aggregator's exact, order-independent accumulator) with each of `--threads` thread counts, and
times it against `torch.Tensor.copy_` of the same adapters into a preallocated buffer. Prints GB/s
of adapter bytes for both and their ratio (target: the fold at least 0.25 of the copy). Same
process, interleaved repeats, best of each.

For scale, `f32/copy` is a plain float32 `acc.add_(update, alpha=weight)`: the fastest streaming
weighted sum there is (it reads 12 bytes per 4-byte element against the copy's 8), but its bits
depend on the arrival order. The exact fold reads the update and the global adapter and reads and
writes an int64 accumulator: 24 bytes per element, so a memory-bound machine caps it near 1/3 of
the copy.

`--cluster` folds a 7B model's adapter instead (LoRA r 16 on q_proj and v_proj of 32 layers, 4096
wide: 8.4M float32 parameters, 34 MB) and sets the fold's time per client against the rate at
which `--gpus` GPUs finish clients, each client taking `--local-steps` steps of `--batch` x
`--seq-len` tokens at `--tokens-per-s` per GPU, for rounds of `--round-clients` clients.

`--clock cpu` times CPU time instead of wall time, everything on one thread, so that other work
on a shared machine slows the figures less. `--profile` times each step of the fold on one block:
the torch fold it replaced beside numpy's.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from fedsim.server.aggregation import WeightedDeltaSum

TensorDict = dict[str, torch.Tensor]


def _adapter(total_bytes: int, seed: int) -> TensorDict:
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


def _lora_7b(seed: int, layers: int = 32, hidden: int = 4096, rank: int = 16) -> TensorDict:
    """The LoRA factors of a LLaMA-7B-shaped model on q_proj and v_proj (34 MB in float32)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=gen) * 0.02
    return tensors


def _updates(reference: TensorDict, clients: int) -> list[TensorDict]:
    """Synthetic client adapters: the reference plus a small step, as local training leaves."""
    gen = torch.Generator().manual_seed(1)
    return [
        {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in reference.items()}
        for _ in range(clients)
    ]


def _best_times(
    fns: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Best time of each function, the functions interleaved so that load hits them alike."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def _contenders(
    reference: TensorDict, updates: list[TensorDict], threads: list[int]
) -> dict[str, Callable[[], None]]:
    """The copy baseline, the exact fold at each thread count, and the float32 add."""
    sink = {k: torch.empty_like(v) for k, v in reference.items()}

    def copy() -> None:
        for u in updates:
            for k, v in u.items():
                sink[k].copy_(v)

    # one sum per thread count for the whole run, as a round makes one for all its clients: the
    # accumulator's allocation and the reference's float64 copy (the first add) are set-up, not
    # per-client work, like the copy's preallocated buffer
    sums = {n: WeightedDeltaSum(reference, 1 << 30, threads=n) for n in threads}

    def fold(n_threads: int) -> None:
        for i, u in enumerate(updates):
            sums[n_threads].add(u, 10 + i)

    def float_add() -> None:
        acc = {k: torch.zeros_like(v) for k, v in reference.items()}
        for i, u in enumerate(updates):
            for k, v in u.items():
                acc[k].add_(v, alpha=float(10 + i))

    fns: dict[str, Callable[[], None]] = {"copy": copy}
    for n in threads:
        fns[f"fold t{n}"] = lambda n=n: fold(n)
    fns["f32 add"] = float_add
    return fns


def sizes(args: argparse.Namespace, threads: list[int]) -> None:
    """fold/copy over adapter sizes, one column per thread count."""
    folds = "".join(f" {f't{n} GB/s':>9} {f't{n}/copy':>8}" for n in threads)
    print(f"{'adapter MB':>10} {'copy GB/s':>10}{folds} {'f32/copy':>9}")
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        reference = _adapter(mb << 20, 0)
        updates = [_adapter(mb << 20, 1 + i) for i in range(args.clients)]
        nbytes = args.clients * sum(v.numel() * 4 for v in reference.values())
        best = _best_times(_contenders(reference, updates, threads), args.repeats, args.timer)
        cols = "".join(
            f" {nbytes / best[f'fold t{n}'] / 1e9:>9.2f} {best['copy'] / best[f'fold t{n}']:>8.2f}"
            for n in threads
        )
        print(
            f"{mb:>10} {nbytes / best['copy'] / 1e9:>10.2f}{cols} "
            f"{best['copy'] / best['f32 add']:>9.2f}"
        )


def cluster(args: argparse.Namespace, threads: list[int]) -> None:
    """Whether the fold keeps up with `--gpus` GPUs finishing 7B LoRA clients."""
    reference = _lora_7b(0)
    updates = _updates(reference, args.clients)
    numel = sum(v.numel() for v in reference.values())
    print(
        f"adapter: LoRA r 16 on q_proj, v_proj of 32 layers x 4096: {len(reference)} tensors, "
        f"{numel / 1e6:.1f}M parameters, {numel * 4 / 1e6:.1f} MB float32"
    )
    tokens = args.local_steps * args.batch * args.seq_len
    train_s = tokens / args.tokens_per_s
    arrivals = args.gpus / train_s
    waves = math.ceil(args.round_clients / args.gpus)
    print(
        f"assumed client: {args.local_steps} local steps x batch {args.batch} x {args.seq_len} "
        f"tokens = {tokens:,} tokens at {args.tokens_per_s:,.0f} tokens/s on one GPU = "
        f"{train_s:.1f} s; {args.gpus} GPUs finish {arrivals:.1f} clients/s"
    )
    print(
        f"round of {args.round_clients:,} clients: {waves} waves of {args.gpus}, "
        f"{waves * train_s:.0f} s of training"
    )
    best = _best_times(_contenders(reference, updates, threads), args.repeats, args.timer)
    per_client = {name: t / len(updates) for name, t in best.items()}
    print(f"copy: {per_client['copy'] * 1e3:.1f} ms/client")
    print(
        f"{'threads':>7} {'ms/client':>9} {'fold/copy':>9} {'clients/s':>9} "
        f"{'busy':>5} {'round folds s':>13} {'wave s':>6}"
    )
    for n in threads:
        t = per_client[f"fold t{n}"]
        # busy: the share of the aggregator's time that folding takes at the GPUs' arrival rate;
        # wave: folding one wave of clients that finish together, the round's tail after the last
        print(
            f"{n:>7} {t * 1e3:>9.1f} {per_client['copy'] / t:>9.2f} {1 / t:>9.1f} "
            f"{arrivals * t:>5.2f} {args.round_clients * t:>13.1f} {args.gpus * t:>6.1f}"
        )


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def profile(calls: int = 500) -> None:
    """Each step's time on one block of 65,536 elements, in this process's torch threads: the
    torch fold this module replaced (a chunk at a time) and the numpy fold's block steps."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(n, generator=gen)
    upd = ref + torch.randn(n, generator=gen) * 1e-3
    acc = torch.zeros(n, dtype=torch.int64)
    scale = 37.0 * 2.0**40
    x64 = upd.double() - ref  # a scratch float64 block; multiplying by 1.0 keeps it finite
    ints = (x64 * scale).round().to(torch.int64)
    steps = {
        "torch: to float64": lambda: upd.to(torch.float64),
        "torch: sub (float32 reference)": lambda: x64.sub_(ref),
        "torch: check (aminmax, item)": lambda: [v.item() for v in torch.aminmax(x64)],
        "torch: mul": lambda: x64.mul_(1.0),
        "torch: round": lambda: x64.round_(),
        "torch: to int64": lambda: x64.to(torch.int64),
        "torch: add to int64": lambda: acc.add_(ints, alpha=1),
    }
    u, r64, a = upd.numpy(), ref.double().numpy(), acc.numpy()
    x, bits = np.empty(n), ints.numpy().copy()
    steps |= {
        "numpy: widen the update": lambda: np.copyto(x, u),
        "numpy: sub (float64 reference)": lambda: np.subtract(x, r64, out=x),
        "numpy: mul": lambda: np.multiply(x, 1.0, out=x),
        "numpy: check (min, max)": lambda: (x.min(), x.max()),
        "numpy: round (add 1.5 * 2**52)": lambda: np.add(x, 0.0, out=x),
        "numpy: to int64 (sub its bits)": lambda: np.subtract(bits, 0, out=bits),
        "numpy: add to int64": lambda: np.add(a, bits, out=a),
    }
    print(f"per step, one block of {n:,} elements (us; best of 5 x {calls} calls)")
    for name, fn in steps.items():
        print(f"{name:>42} {_per_call_us(fn, calls):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1,16,256,1024")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="fold thread counts, comma-separated")
    parser.add_argument("--cluster", action="store_true", help="the 7B LoRA, 64-GPU comparison")
    parser.add_argument("--profile", action="store_true", help="per-step times of one block")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--round-clients", type=int, default=1000)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=10_000.0,
        help="one GPU's LoRA training throughput on a 7B model (10,000: ~6 x 7e9 FLOP a token "
        "at 420 TFLOP/s, ~40%% of an H100's dense bf16 peak; fast clients make it a hard case)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this thread's CPU time, with torch and the fold on one thread (shared machines)",
    )
    args = parser.parse_args()
    threads = [int(x) for x in args.threads.split(",")]
    # cpu: this thread's CPU time, which time spent preempted by other processes does not inflate
    args.timer = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)
        threads = [1]
    print(f"torch threads: {torch.get_num_threads()}")
    if args.profile:
        profile()
    elif args.cluster:
        cluster(args, threads)
    else:
        sizes(args, threads)


if __name__ == "__main__":
    main()
