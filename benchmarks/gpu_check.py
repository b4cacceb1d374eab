"""fedsim's client trainers on one GPU: a ~1B LLaMA's LoRA tuning against a plain PEFT loop.

    python benchmarks/gpu_check.py [--shape auto|tiny|1b] [--budget-s 420] [--out gpu_check.json]
                                   [--variants plain,torch,deepspeed] [--procs 2,4]

One script for a machine with one GPU, torch, transformers and peft, and nothing else: no Ray
(fedsim's trainers are imported without it) and no network. DeepSpeed is optional: without it
its row says why it did not run.

The workload: a LLaMA of random weights, built once into a temporary directory (safetensors, as
`save_pretrained` writes them) and loaded by every variant from there, as fedsim's workers load
their base model. `--shape 1b` (the default where CUDA is available) is hidden 2048, 16 layers,
16 heads, intermediate 5632, vocab 32000, untied embeddings: 953,223,168 parameters, in bf16.
`--shape tiny` (the default elsewhere) is a CPU smoke test whose figures mean nothing. LoRA r 8,
alpha 16, no dropout on q_proj and v_proj; AdamW at lr 1e-4 with gradient clipping at 1.0 (fedsim's
default and Hugging Face Trainer's); batches of random token ids, every position a label, no
padding, no gradient accumulation.

Each variant is one or more fresh processes (each with its own CUDA context), started by this
one:

    plain           a plain PEFT loop: from_pretrained, get_peft_model, torch AdamW
    torch           fedsim's torch trainer (`TorchTrainer`, what a ClientWorker builds),
                    on the model `fedsim.model.load_base_model` + `attach_lora` make
    deepspeed       fedsim's DeepSpeed trainer, ZeRO stage 2 (bf16 mixed precision in bf16)
    torch-xN        N processes of the torch trainer sharing the device at once, as N workers
                    with `cluster.gpus_per_worker: 1/N` do (--procs)

Every process loads the model, runs warm-up steps (--warmup), tells this process it is ready and
how long one warm step took, and waits; when all of a variant's processes are ready they start
their timed steps together. The timed steps are one client's worth (one `Trainer.train` call for
fedsim's trainers); how many is decided here so that the whole script fits in --budget-s: the
seconds left are shared among the variants still to run, less each one's start-up cost as
measured so far (--max-steps caps them). Reported per variant: tokens/s over the timed steps
(for N processes, all their tokens over the span from the first start to the last end, and each
process's own rate), the ratio to the plain loop, and each process's peak memory
(`torch.cuda.max_memory_allocated` on a GPU, peak RSS on a CPU). The table is printed and, with
--out, written as JSON after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LR = 1e-4
MAX_GRAD_NORM = 1.0
DATA_SEED = 0
LORA_SEED = 0


@dataclass(frozen=True)
class Shape:
    """A LLaMA shape and the batch it trains on."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, intermediate=172, vocab=512, batch=4, seq=64),
    "1b": Shape(hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, batch=8, seq=512),
}
VARIANTS = ("plain", "torch", "deepspeed")


# ---------------------------------------------------------------------------------------------
# Planning: how many timed steps fit the budget
# ---------------------------------------------------------------------------------------------


def measure_seconds(left_s: float, overhead_s: float, variants: int) -> float:
    """Seconds of timed steps the next variant may take so that the `variants` still to run
    (it included), each costing `overhead_s` besides its timed steps, end within the `left_s`
    seconds of the budget left."""
    return max(0.0, left_s / max(1, variants) - overhead_s)


def plan_steps(seconds: float, step_s: float, procs: int, lo: int, hi: int) -> int:
    """Timed steps per process that fit `seconds` when `procs` processes share the device: a
    step then takes about `procs` times as long as alone (`step_s`, the fastest warm step)."""
    if step_s <= 0:
        return hi
    return max(lo, min(hi, int(seconds / (step_s * procs))))


# ---------------------------------------------------------------------------------------------
# Child processes: build the model, or train one variant
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: the other side polls for the file and must never read half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _quiet() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def resolve(shape: str, dtype: str, batch: int | None, seq: int | None) -> tuple[str, Shape, str]:
    """The shape's name, the shape and the dtype that `auto` (and no --batch/--seq) mean on this
    machine: the 1b shape in bf16 where CUDA is available, the tiny one in fp32 elsewhere."""
    import torch

    cuda = torch.cuda.is_available()
    name = shape if shape != "auto" else ("1b" if cuda else "tiny")
    chosen = SHAPES[name]
    chosen = dataclasses.replace(chosen, batch=batch or chosen.batch, seq=seq or chosen.seq)
    return name, chosen, dtype if dtype != "auto" else ("bfloat16" if cuda else "float32")


def build_model(shape: Shape, dtype: str, out: Path) -> dict[str, Any]:
    """A random-weight LLaMA of `shape` saved to `out` (built on the GPU where there is one: a
    billion CPU initialisations take minutes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(2048, shape.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)  # safetensors
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({_cores()} cores)",
        "cuda": cuda,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "peft", "deepspeed"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _batches(shape: Shape, steps: int) -> list[list[int]]:
    """`steps` batches of random token ids (ids 3.. : 0-2 are LLaMA's special tokens), one row
    per example; every process draws the same."""
    import numpy as np

    rng = np.random.default_rng(DATA_SEED)
    return rng.integers(3, shape.vocab, size=(steps * shape.batch, shape.seq)).tolist()


@dataclass(frozen=True)
class Run:
    """A trainer as the children drive it: `setup(steps)` readies the examples of `steps`
    optimizer steps (untimed), `train(them)` trains on them and returns the tokens it saw."""

    setup: Callable[[int], Any]
    train: Callable[[Any], int]


def plain_loop(model_dir: Path, shape: Shape, dtype: str, device: str) -> Run:
    """The plain PEFT loop: what one writes without fedsim."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.to(device), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def train(rows: torch.Tensor) -> int:
        for batch in rows.split(shape.batch):
            ids = batch.to(device)
            loss = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # a loop logs its loss; fedsim's trainer reads every one too
        return rows.numel()

    return Run(setup=lambda steps: torch.tensor(_batches(shape, steps)), train=train)


def fedsim_trainer(backend: str, model_dir: Path, shape: Shape, dtype: str, device: str) -> Run:
    """fedsim's trainer for `backend` on the model a ClientWorker builds, driven as the worker
    drives it: load the global adapter, then `Trainer.train` one client's examples."""
    # The classes themselves, not fedsim's backend registry (whose shape is being reworked):
    # the same classes a ClientWorker builds for `client.backend` torch and deepspeed.
    from fedsim.client.trainer import TorchTrainer, TrainSettings
    from fedsim.config import ClientConfig, LoraConfig
    from fedsim.model import attach_lora, get_adapter, load_base_model

    base = load_base_model(str(model_dir), dtype=dtype, device=device)
    model = attach_lora(base, LoraConfig(**LORA), seed=LORA_SEED)
    adapter = get_adapter(model)
    deepspeed = None
    if backend == "deepspeed":
        deepspeed = {"zero_optimization": {"stage": 2}}
        if dtype == "bfloat16":
            deepspeed["bf16"] = {"enabled": True}
    client = ClientConfig(
        backend=backend,
        local_steps=None,  # one pass over the examples given: steps = examples / batch
        local_epochs=1.0,
        batch_size=shape.batch,
        micro_batch_size=shape.batch,
        lr=LR,
        max_grad_norm=MAX_GRAD_NORM,
        deepspeed=deepspeed,
    )
    if backend == "deepspeed":
        from fedsim.client.deepspeed_trainer import DeepSpeedTrainer

        trainer: Any = DeepSpeedTrainer(TrainSettings(client))
    else:
        trainer = TorchTrainer(TrainSettings(client))
    trainer.prepare(model)

    def setup(steps: int) -> list[list[int]]:
        trainer.load_adapter(model, adapter)  # a new client, as the worker starts one
        return _batches(shape, steps)

    def train(rows: list[list[int]]) -> int:
        return trainer.train(model, rows, rows, seed=len(rows)).tokens

    return Run(setup=setup, train=train)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run: Run, steps: int) -> dict[str, float]:
    """Run `steps` steps; tokens, seconds, and wall-clock start and end (comparable across
    processes)."""
    examples = run.setup(steps)
    _sync()
    start, clock = time.time(), time.perf_counter()
    tokens = run.train(examples)
    _sync()  # the last step's kernels may still be queued
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - clock,
        "start": start,
        "end": time.time(),
    }


def _peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _wait_for_go(where: Path, index: int, ready: dict[str, Any]) -> dict[str, Any]:
    """Tell the parent this process is warm (`ready`) and wait for its go: the timed steps."""
    _write_json(where / f"ready-{index}.json", ready)
    go, parent = where / "go.json", os.getppid()
    while not go.exists():
        if os.getppid() != parent:  # the parent was killed: nobody will ever say go
            raise SystemExit("the parent process is gone")
        time.sleep(0.005)
    return json.loads(go.read_text())


def train_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One process of a variant: load, warm up, wait for the others, time the steps."""
    import torch

    _quiet()
    # N processes sharing the machine, as N fractional workers: each gets its share of cores.
    torch.set_num_threads(max(1, _cores() // args.sharing))
    shape, device = Shape(**json.loads(args.shape_json)), args.device
    start = time.perf_counter()
    if args.child == "plain":
        run = plain_loop(args.model, shape, args.dtype, device)
    else:
        run = fedsim_trainer(args.child, args.model, shape, args.dtype, device)
    load_s = time.perf_counter() - start
    if args.warmup > 1:
        _timed(run, args.warmup - 1)
    step_s = _timed(run, 1)["seconds"]  # a warm step: what the parent plans the timed ones by
    go = _wait_for_go(Path(args.barrier), args.index, {"step_s": step_s, "load_s": load_s})
    timed = _timed(run, go["steps"])
    return {
        **timed,
        "steps": go["steps"],
        "load_s": load_s,
        "warm_step_s": step_s,
        "peak_mb": _peak_mb(),
        "threads": torch.get_num_threads(),
        "ray_imported": "ray" in sys.modules,
    }


# ---------------------------------------------------------------------------------------------
# The parent: one variant at a time, its processes started together
# ---------------------------------------------------------------------------------------------


class VariantFailed(Exception):
    """A variant's process exited with an error, or the variant ran out of time."""


@dataclass
class Options:
    """What every child of the run is told, and the limits of the run."""

    model: Path
    shape: Shape
    dtype: str
    device: str
    warmup: int
    min_steps: int
    max_steps: int
    env: dict[str, str]


def _launch(opts: Options, kind: str, index: int, procs: int, where: Path) -> subprocess.Popen:
    args = [sys.executable, __file__, "--child", kind, "--index", str(index), "--sharing"]
    args += [str(procs), "--model", str(opts.model), "--barrier", str(where)]
    args += ["--shape-json", json.dumps(dataclasses.asdict(opts.shape)), "--dtype", opts.dtype]
    args += ["--device", opts.device, "--warmup", str(opts.warmup)]
    # Output to files, not pipes: a chatty child never blocks on a pipe nobody reads yet.
    with open(where / f"out-{index}", "w") as out, open(where / f"err-{index}", "w") as err:
        return subprocess.Popen(args, stdout=out, stderr=err, env=opts.env, cwd=ROOT)


def _failure(where: Path, index: int, what: str) -> VariantFailed:
    tail = (where / f"err-{index}").read_text()[-2000:]
    return VariantFailed(f"process {index} {what}:\n{tail}")


def _wait_ready(children: list[subprocess.Popen], where: Path, deadline: float) -> list[dict]:
    while True:
        ready = [where / f"ready-{i}.json" for i in range(len(children))]
        if all(p.exists() for p in ready):
            return [json.loads(p.read_text()) for p in ready]
        for i, child in enumerate(children):
            if child.poll() is not None:
                raise _failure(where, i, f"exited with {child.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise VariantFailed("out of time before every process was ready")
        time.sleep(0.05)


def _wait_done(children: list[subprocess.Popen], where: Path, deadline: float) -> list[dict]:
    results = []
    for i, child in enumerate(children):
        try:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise VariantFailed(f"process {i} out of time in its timed steps") from None
        if child.returncode != 0:
            raise _failure(where, i, f"exited with {child.returncode}")
        results.append(json.loads((where / f"out-{i}").read_text().strip().splitlines()[-1]))
    return results


def run_variant(
    opts: Options, kind: str, procs: int, where: Path, seconds: float, deadline: float
) -> list[dict[str, Any]]:
    """Start `procs` processes of `kind`, give them timed steps worth `seconds` once all are
    warm, and return each one's result; every process is ended on failure."""
    where.mkdir()
    children = [_launch(opts, kind, i, procs, where) for i in range(procs)]
    try:
        ready = _wait_ready(children, where, deadline)
        step_s = min(r["step_s"] for r in ready)
        steps = plan_steps(seconds, step_s, procs, opts.min_steps, opts.max_steps)
        _write_json(where / "go.json", {"steps": steps})
        return _wait_done(children, where, deadline)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def summarise(name: str, procs: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's row: aggregate tokens/s over the span of all its processes' timed steps,
    and each process's own rate and peak memory."""
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "variant": name,
        "ok": True,
        "procs": procs,
        "steps": results[0]["steps"],
        "tokens_per_s": sum(r["tokens"] for r in results) / span,
        "per_process_tokens_per_s": [r["tokens"] / r["seconds"] for r in results],
        "peak_mb": [r["peak_mb"] for r in results],
        "load_s": max(r["load_s"] for r in results),
        "ray_imported": any(r["ray_imported"] for r in results),
        "processes": results,
    }


def _child_json(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(cuda: bool) -> dict[str, str]:
    """The children's environment: fedsim importable from this checkout (it need not be
    installed), DeepSpeed told it runs on the CPU where there is no GPU (as fedsim's workers
    do)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    """The rows as a text table; ratios to the plain loop where it ran."""
    plain = next((r for r in rows if r["variant"] == "plain" and r["ok"]), None)
    memory = "peak CUDA MB/proc" if cuda else "peak RSS MB/proc"
    lines = [
        f"{'variant':<12} {'procs':>5} {'steps':>5} {'tokens/s':>11} {'per process':>19} "
        f"{'x plain':>7} {memory:>17}"
    ]
    for r in rows:
        if not r["ok"]:
            why = r["error"].strip().splitlines()[-1]  # the exception, for a traceback
            lines.append(f"{r['variant']:<12} {r['procs']:>5}  FAILED: {why[:80]}")
            continue
        rates = r["per_process_tokens_per_s"]
        per = f"{min(rates):,.0f}" + (f"-{max(rates):,.0f}" if len(rates) > 1 else "")
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}" if plain else "-"
        lines.append(
            f"{r['variant']:<12} {r['procs']:>5} {r['steps']:>5} {r['tokens_per_s']:>11,.0f} "
            f"{per:>19} {ratio:>7} {max(r['peak_mb']):>17,.0f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--batch", type=int, help="examples per step (default: the shape's)")
    p.add_argument("--seq", type=int, help="tokens per example (default: the shape's)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--procs", default="2,4", help="concurrent torch-trainer processes ('' none)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per process")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole script's seconds")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    # a child process: build the model, or one process of a variant
    for name in ("--child", "--model", "--barrier", "--shape-json", "--device"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sharing", type=int, default=1, help=argparse.SUPPRESS)  # processes at once
    return p


def _plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(row name, child kind, processes) in running order: DeepSpeed last, as the variant most
    likely to fail on a new machine, so that it cannot cost the others their time."""
    kinds = [v for v in args.variants.split(",") if v]
    unknown = set(kinds) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    plan = [(k, k, 1) for k in ("plain", "torch") if k in kinds]
    plan += [(f"torch-x{n}", "torch", n) for n in (int(x) for x in args.procs.split(",") if x)]
    return plan + ([("deepspeed", "deepspeed", 1)] if "deepspeed" in kinds else [])


def _build(args: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    """Build the model in a child process (the parent never touches CUDA); what it built."""
    flags = ["--child", "build", "--model", str(work / "model"), "--shape", args.shape]
    flags += ["--dtype", args.dtype]
    flags += ["--batch", str(args.batch)] if args.batch else []
    flags += ["--seq", str(args.seq)] if args.seq else []
    return _child_json(flags, _env(cuda=True), timeout)


def _child_main(args: argparse.Namespace) -> None:
    result: dict[str, Any]
    if args.child == "build":
        name, shape, dtype = resolve(args.shape, args.dtype, args.batch, args.seq)
        built = build_model(shape, dtype, Path(args.model))
        result = {"name": name, "shape": dataclasses.asdict(shape), "dtype": dtype, **built}
    else:
        result = train_variant(args)
    print(json.dumps(result))


class Budget:
    """The script's seconds: what is left, and what a variant costs besides its timed steps
    (its processes' start-up: imports, loading the model, warm-up; the largest seen so far)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.overhead = 0.0

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def saw(self, overhead: float) -> None:
        self.overhead = max(self.overhead, overhead)


def run_plan(
    opts: Options, plan: list[tuple[str, str, int]], budget: Budget, work: Path, save: Callable
) -> list[dict[str, Any]]:
    """Run the variants one after another, each row saved (`save(rows)`) as soon as it is in."""
    rows: list[dict[str, Any]] = []
    for i, (row, kind, procs) in enumerate(plan):
        began = time.monotonic()
        rows.append(_one(opts, row, kind, procs, budget, len(plan) - i, work))
        ok = "ok" if rows[-1]["ok"] else "FAILED"
        print(f"  {row}: {ok} in {time.monotonic() - began:.0f} s", flush=True)
        save(rows)
    return rows


def _one(
    opts: Options, row: str, kind: str, procs: int, budget: Budget, variants: int, work: Path
) -> dict[str, Any]:
    """One variant's row, given its share of the budget left (`variants` still to run)."""
    began, left = time.monotonic(), budget.left()
    if left < budget.overhead:  # it could not even start: say so rather than overrun
        error = f"skipped: {left:.0f} s left, a variant takes ~{budget.overhead:.0f} s to start"
        return {"variant": row, "ok": False, "procs": procs, "error": error}
    seconds = measure_seconds(left, budget.overhead, variants)
    deadline = began + max(60.0, left) + 30.0  # a hung process is killed, the rest goes on
    try:
        results = run_variant(opts, kind, procs, work / row, seconds, deadline)
    except VariantFailed as err:
        return {"variant": row, "ok": False, "procs": procs, "error": str(err)}
    timed = max(x["end"] for x in results) - min(x["start"] for x in results)
    budget.saw(time.monotonic() - began - timed)
    return summarise(row, procs, results)


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        _child_main(args)
        return
    budget = Budget(args.budget_s)
    plan = _plan(args)
    with tempfile.TemporaryDirectory(prefix="fedsim-gpu-check-") as tmp:
        work = Path(tmp)
        built = _build(args, work, timeout=max(60.0, budget.left()))
        budget.saw(time.monotonic() - budget.start)  # until a variant has run: a child's cost
        cuda = built["cuda"]
        opts = Options(
            model=work / "model",
            shape=Shape(**built["shape"]),
            dtype=built["dtype"],
            device="cuda" if cuda else "cpu",
            warmup=args.warmup,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            env=_env(cuda),
        )
        report: dict[str, Any] = {
            "shape": built["name"],
            **built["shape"],
            "dtype": built["dtype"],
            "lora": LORA,
            "parameters": built["parameters"],
            "device": built["device"],
            "versions": built["versions"],
            "budget_s": args.budget_s,
        }
        print(_header(report), flush=True)

        def save(rows: list[dict[str, Any]]) -> None:
            report["rows"] = rows
            report["elapsed_s"] = time.monotonic() - budget.start
            report["ray_imported"] = "ray" in sys.modules or any(
                r.get("ray_imported") for r in rows
            )
            if args.out:
                args.out.write_text(json.dumps(report, indent=1))

        rows = run_plan(opts, plan, budget, work, save)
        save(rows)
    print(table(rows, cuda))
    for r in rows:
        if not r["ok"]:
            print(f"\n{r['variant']} failed: {r['error']}")
    print(f"elapsed {report['elapsed_s']:.0f} s (budget {args.budget_s:.0f} s)")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


def _header(report: dict[str, Any]) -> str:
    v = report["versions"]
    return (
        f"LLaMA {report['shape']} (hidden {report['hidden']}, {report['layers']} layers, "
        f"{report['heads']} heads, intermediate {report['intermediate']}, vocab "
        f"{report['vocab']}): {report['parameters']:,} parameters, {report['dtype']}, on "
        f"{report['device']}\nLoRA r {LORA['r']} on {'/'.join(LORA['target_modules'])}; batch "
        f"{report['batch']} x {report['seq']} tokens; torch {v['torch']}, transformers "
        f"{v['transformers']}, peft {v['peft']}, deepspeed {v['deepspeed']}"
    )


if __name__ == "__main__":
    main()
