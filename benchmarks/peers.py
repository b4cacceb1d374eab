"""fedsim beside its peers on one short workload: whole-process wall time and peak memory.

    python benchmarks/peers.py [--pairs 3] [--out runs/peers.json] [--variants plain,pfl,...]

Five variants run the same federated LoRA job, each as a fresh process, interleaved in paired
repetitions (pair i runs every variant once, the order rotated by one each pair):

    plain       a plain in-process loop: peft + torch, FedAvg of the LoRA tensors, the base model
                loaded once, no Ray, no checkpoints
    pfl         pfl-research (Apple, PyPI `pfl`): `SimulatedBackend` in one process
    flower      Flower (`flwr[simulation]`): `run_simulation`, 1 actor x 2 threads
    fedsim-1x2  `fedsim run`, 1 worker x 2 CPUs
    fedsim-2x1  `fedsim run`, 2 workers x 1 CPU

The workload (issue 16): a random-init LLaMA of ~4.2M parameters (hidden 256, 4 layers, 4 heads,
intermediate 688, vocab 2048); LoRA r 8, alpha 16, no dropout, on q_proj/v_proj; 20 clients x 64
records x 128 tokens; 3 rounds x 5 clients x 8 AdamW steps of batch 8 (one pass over a client's
records), lr 1e-3, no gradient clipping; 2 compute threads in total. Every variant reads the same
inputs, written once (untimed) into --work: the model directory (weights and tokenizer), the
records as text for fedsim (`data.jsonl`, split by `split.json`: client c holds records
64c..64c+63) and the same records tokenised exactly as fedsim tokenises them for the others
(`tokens.pt`). Each framework samples the 5 clients of a round with its own generator, so the
clients differ but the work does not: every client holds 64 records of 128 tokens.

Flower and pfl are not fedsim dependencies: each gets its own virtual environment under
--venvs (default ~/.cache/fedsim/bench-venvs/<name>), built once by this script with the torch,
transformers and peft versions of the running interpreter's. A variant whose environment cannot
be built or whose run fails stays in the table, marked as such.

Measured per run, from this (parent) process:
  wall      from starting the variant's process to its exit (imports, Ray start, data, model
            loading, rounds, shutdown: everything a researcher waits for)
  x plain   wall over the plain loop's wall in the same pair
  peak PSS  every ~50 ms, the sum of Pss in /proc/<pid>/smaps_rollup over the variant's process
            and all its descendants, the largest sum kept. This process makes itself a child
            subreaper (prctl PR_SET_CHILD_SUBREAPER), so a process that the variant starts and
            that detaches (double fork) is re-parented here and still counted: for Ray that is
            gcs_server, raylet, the dashboard and its agents, the log monitor and every worker,
            all started by the driver or by the raylet. Processes the variant did not start
            (another Ray instance on the machine, this parent) are not counted. A process that
            lives less than one sampling interval can be missed (--sample-ms sets the interval).
  sampler   this process's own CPU time during the run (reading smaps_rollup costs more the more
            processes there are, so it weighs more on the Ray variants), printed as a share of
            the wall time below the table
Run it on an otherwise idle machine; the figures are noisy, the paired ratios less so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DESCRIPTIONS = {
    "plain": "plain in-process loop (peft + torch, no Ray, no disk)",
    "pfl": "pfl-research `SimulatedBackend`, one process",
    "flower": "Flower `run_simulation`, 1 actor x 2 threads",
    "fedsim-1x2": "fedsim, 1 worker x 2 CPUs",
    "fedsim-2x1": "fedsim, 2 workers x 1 CPU",
}
VARIANTS = tuple(DESCRIPTIONS)


@dataclass(frozen=True)
class Workload:
    """The short workload of issue 16; every variant reads it from --work/workload.json."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    vocab: int = 2048
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    clients: int = 20
    records: int = 64
    seq_len: int = 128
    rounds: int = 3
    per_round: int = 5
    local_steps: int = 8
    batch: int = 8
    lr: float = 1e-3
    threads: int = 2
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Inputs, written once before anything is timed (fedsim's interpreter)
# ---------------------------------------------------------------------------------------------


def write_inputs(w: Workload, work: Path) -> None:
    """Model directory, records (text and tokens), split file and fedsim config under `work`."""
    import random

    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.data import records as rec
    from fedsim.data.shards import tokenize_records
    from fedsim.data.templates import get_template
    from fedsim.model import train_tiny_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    (work / "workload.json").write_text(json.dumps(dataclasses.asdict(w)))

    # Records of pseudo-words, long enough that every example is cut at seq_len tokens.
    rng = random.Random(w.seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(800)
    ]
    n = w.clients * w.records
    rows = [
        {
            "instruction": " ".join(rng.choices(words, k=12)),
            "context": "",
            "response": " ".join(rng.choices(words, k=90)),
            "category": "text",
        }
        for _ in range(n)
    ]
    with open(work / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    split = {"clients": [list(range(c * w.records, (c + 1) * w.records)) for c in range(w.clients)]}
    (work / "split.json").write_text(json.dumps(split))

    model_dir = work / "model"
    tokenizer = train_tiny_tokenizer(
        [r["instruction"] + " " + r["response"] for r in rows], w.vocab, w.seq_len
    )
    torch.manual_seed(w.seed)
    config = LlamaConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.heads,
        intermediate_size=w.intermediate,
        max_position_embeddings=w.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    # The peers get the token ids fedsim computes from the same text (template `plain`, loss on
    # every token), so that every variant trains on identical examples.
    table = pa.table({col: [r[col] for r in rows] for col in rec.TEXT_COLUMNS})
    ids, _ = tokenize_records(table, tokenizer, get_template("plain"), w.seq_len, True)
    if any(len(x) != w.seq_len for x in ids):
        raise RuntimeError("an example is shorter than seq_len: make the records longer")
    torch.save(torch.tensor(ids, dtype=torch.int64), work / "tokens.pt")

    fedsim_cfg = {
        "run": {
            "name": "peers",
            "output_dir": str(work / "runs"),
            "seed": w.seed,
            "rounds": w.rounds,
        },
        "data": {
            "source": str(work / "data.jsonl"),
            "template": "plain",
            "train_on_inputs": True,
            "cutoff_len": w.seq_len,
            "num_clients": w.clients,
            "partition": {"kind": "split_file", "path": str(work / "split.json")},
        },
        "model": {
            "name_or_path": str(model_dir),
            "lora": {
                "r": w.lora_r,
                "alpha": w.lora_alpha,
                "dropout": 0.0,
                "target_modules": list(w.targets),
            },
        },
        "client": {
            "backend": "torch",
            "local_steps": w.local_steps,
            "batch_size": w.batch,
            "micro_batch_size": w.batch,
            "lr": w.lr,
            "max_grad_norm": None,
        },
        "server": {"strategy": "fedavg", "clients_per_round": w.per_round},
    }
    (work / "fedsim.json").write_text(json.dumps(fedsim_cfg, indent=1))


# ---------------------------------------------------------------------------------------------
# What every peer shares: the LoRA model, one client's local training, the client's records
# ---------------------------------------------------------------------------------------------


def _workload(work: Path) -> Workload:
    raw = json.loads((work / "workload.json").read_text())
    return Workload(**{**raw, "targets": tuple(raw["targets"])})


def _client_tokens(tokens, w: Workload, client: int):
    return tokens[client * w.records : (client + 1) * w.records]


def _lora_model(w: Workload, work: Path):
    """The base model from disk, frozen, with LoRA on `w.targets` (the same init everywhere)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    torch.manual_seed(w.seed)
    lora = LoraConfig(
        r=w.lora_r,
        lora_alpha=w.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(w.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def _train_client(model, tokens, w: Workload, seed: int) -> float:
    """`w.local_steps` AdamW steps of batch `w.batch` over shuffled `tokens`; the last loss."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.lr)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    loss = torch.tensor(0.0)
    for step in range(w.local_steps):
        start = (step * w.batch) % len(tokens)  # 8 x 8 is one pass over a client's 64 records
        batch = tokens[order[start : start + w.batch]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# The variants: one function each, run in a fresh process (`--child NAME`)
# ---------------------------------------------------------------------------------------------


def run_plain(work: Path) -> None:
    """FedAvg as a loop: the model built once, each client trained in turn, adapters averaged."""
    import random

    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    w = _workload(work)
    torch.set_num_threads(w.threads)
    tokens = torch.load(work / "tokens.pt")
    model = _lora_model(w, work)
    global_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    rng = random.Random(w.seed)
    for r in range(w.rounds):
        updates = []
        for c in rng.sample(range(w.clients), w.per_round):
            set_peft_model_state_dict(model, global_adapter)
            _train_client(model, _client_tokens(tokens, w, c), w, seed=w.seed * 1000 + r * 100 + c)
            updates.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
        # Every client holds the same number of records, so the weighted mean is the mean.
        global_adapter = {k: torch.stack([u[k] for u in updates]).mean(0) for k in global_adapter}


def run_pfl(work: Path) -> None:
    """pfl-research: `FederatedAveraging` on a `SimulatedBackend`, all in this process; the
    central optimizer is SGD with lr 1, so a round adds the clients' mean update."""
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    w = _workload(work)
    torch.set_num_threads(w.threads)
    tokens = torch.load(work / "tokens.pt")

    class LoraLM(torch.nn.Module):
        """pfl trains `loss(*user_data)` and evaluates `metrics(*user_data)`."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def loss(self, input_ids):
            self.train()
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def metrics(self, input_ids):
            # pfl evaluates every user before and after local training in the first round
            # (iteration % evaluation_frequency == 0); no other variant evaluates, so this metric
            # does not run the model.
            return {"records": Weighted(len(input_ids), 1)}

    module = LoraLM(_lora_model(w, work))
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.AdamW,
        central_optimizer=torch.optim.SGD(
            [p for p in module.parameters() if p.requires_grad], lr=1.0
        ),
    )
    dataset = FederatedDataset(
        make_dataset_fn=lambda c: Dataset(raw_data=(_client_tokens(tokens, w, c),)),
        user_sampler=get_user_sampler("random", list(range(w.clients))),
    )
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=w.rounds,
            evaluation_frequency=w.rounds,
            train_cohort_size=w.per_round,
            val_cohort_size=0,
        ),
        backend=SimulatedBackend(training_data=dataset, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=w.lr,
            local_num_epochs=None,
            local_num_steps=w.local_steps,
            local_batch_size=w.batch,
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=w.batch),
    )


def run_flower(work: Path) -> None:
    """Flower: `run_simulation` of a ServerApp running FedAvg over 20 virtual SuperNodes, whose
    ClientApp runs in one Ray actor of 2 CPUs.

    As in a Flower project, the apps' functions live in an importable module (this file, put on
    PYTHONPATH for the actor too): the actor imports it once and keeps the base model between
    calls, as a module-level cache in a ClientApp module does."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, here)
    importlib.import_module("peers").flower_simulation(work)


def flower_simulation(work: Path) -> None:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from peft import get_peft_model_state_dict

    w = _workload(work)
    client_app = ClientApp()
    client_app.train()(flower_train)
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        initial = get_peft_model_state_dict(_lora_model(w, work))
        strategy = FedAvg(
            fraction_train=w.per_round / w.clients,
            fraction_evaluate=0.0,
            min_available_nodes=w.clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=w.rounds,
            train_config=ConfigRecord({"work": str(work)}),
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=w.clients,
        backend_config={
            "client_resources": {"num_cpus": w.threads, "num_gpus": 0.0},
            "init_args": {"num_cpus": w.threads},
        },
    )


@functools.cache
def _flower_client(work: str):
    """The actor's base model, LoRA and records, loaded on its first call."""
    import torch

    w = _workload(Path(work))
    torch.set_num_threads(w.threads)
    return w, _lora_model(w, Path(work)), torch.load(Path(work) / "tokens.pt")


def flower_train(msg, context):
    """The ClientApp's train: load the global adapter, train this node's client, reply."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = msg.content["config"]
    w, model, tokens = _flower_client(str(config["work"]))
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    client = int(context.node_config["partition-id"])
    seed = w.seed * 1000 + int(config.get("server-round", 0)) * 100 + client
    loss = _train_client(model, _client_tokens(tokens, w, client), w, seed)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(get_peft_model_state_dict(model)),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": w.records}),
        }
    )
    return Message(content=reply, reply_to=msg)


CHILD_FUNCTIONS = {"plain": run_plain, "pfl": run_pfl, "flower": run_flower}


def fedsim_command(work: Path, run_name: str, workers: int, cpus: int) -> list[str]:
    """`fedsim run` as a researcher types it, on the workload's config."""
    fedsim = Path(sys.executable).with_name("fedsim")
    return [
        str(fedsim),
        "run",
        str(work / "fedsim.json"),
        "--overwrite",
        "--set",
        f"run.name={run_name}",
        "--set",
        f"cluster.num_workers={workers}",
        "--set",
        f"cluster.cpus_per_worker={cpus}",
    ]


# ---------------------------------------------------------------------------------------------
# Virtual environments for the peers
# ---------------------------------------------------------------------------------------------


def peer_requirements() -> dict[str, list[str]]:
    """What each peer's environment installs besides torch: the framework, and the transformers
    and peft versions fedsim runs with."""
    from importlib.metadata import version

    shared = [f"transformers=={version('transformers')}", f"peft=={version('peft')}"]
    return {"pfl": ["pfl", *shared], "flower": ["flwr[simulation]", *shared]}


def ensure_venv(root: Path, name: str, packages: list[str]) -> tuple[Path | None, str]:
    """The Python of venv `root/name`, built once (torch pinned first, as the Makefile does),
    and a note: the framework's installed version, or why the environment could not be built."""
    from importlib.metadata import version

    venv = root / name
    python = venv / "bin" / "python"
    torch_pin = f"torch=={version('torch').split('+')[0]}"
    wanted = "\n".join([torch_pin, *packages])
    marker = venv / ".installed"
    if not (marker.is_file() and marker.read_text() == wanted):
        print(f"peers: building {venv} ({', '.join([torch_pin, *packages])}; minutes, once)")
        shutil.rmtree(venv, ignore_errors=True)
        pip = [str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check"]
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [*pip, "--upgrade", "pip"],
            [*pip, torch_pin],
            [*pip, *packages],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return (
                    None,
                    f"environment not built: `{' '.join(step[-2:])}` failed: {' '.join(tail)}",
                )
        marker.write_text(wanted)
    framework = packages[0].split("[")[0]
    got = subprocess.run(
        [
            str(python),
            "-c",
            f"from importlib.metadata import version; print(version('{framework}'))",
        ],
        capture_output=True,
        text=True,
    )
    return python, f"{framework} {got.stdout.strip()}"


# ---------------------------------------------------------------------------------------------
# Measuring a process tree: wall time and peak PSS
# ---------------------------------------------------------------------------------------------


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux >= 3.4), so a
    daemonised Ray process still counts as the variant's."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("peers: cannot become a child subreaper; detached processes will not be counted")


def children_of(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The child pids of `pid`, from /proc/<pid>/task/<tid>/children (Linux >= 3.5)."""
    kids: list[int] = []
    try:
        for task in (proc / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError):
                kids.extend(int(k) for k in (task / "children").read_text().split())
    except OSError:  # exited
        pass
    return kids


def descendants(root: int, children=children_of) -> set[int]:
    """`root` and every process below it."""
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children(pid))
    return found


def pss_kib(pid: int, proc: Path = Path("/proc")) -> int:
    """Proportional set size of `pid` in KiB (0 if it is gone or a zombie)."""
    try:
        for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_title(pid: int, proc: Path = Path("/proc")) -> str:
    """What `pid` runs, shortly: Ray's title for its workers (ray::ClientWorker.train), the
    script a Python process runs, else the program."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode(errors="replace").strip()).name for a in argv if a.strip()]
    if words and words[0].startswith("python"):  # a script: its name, past the flags
        words = [w for w in words[1:] if not w.startswith("-")] or words
    return words[0][:60] if words else "?"


def measure(cmd: list[str], log: Path, env: dict[str, str], interval_s: float = 0.05) -> dict:
    """Run `cmd` to its end; its wall seconds, exit code and the peak PSS of its process tree."""
    me = os.getpid()
    peak_kib, peak_procs, samples = 0, 0, 0
    at_peak: list[tuple[str, int]] = []
    with open(log, "w") as out:
        cpu_start, start = time.process_time(), time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while child.poll() is None:
            tree = descendants(me) - {me}
            sizes = {pid: pss_kib(pid) for pid in tree}
            total = sum(sizes.values())
            if total > peak_kib:
                peak_kib, peak_procs = total, len(tree)
                at_peak = [(process_title(pid), kib) for pid, kib in sizes.items() if kib]
            samples += 1
            _reap(tree - {child.pid})
            time.sleep(interval_s)
        wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 3),
        "rc": child.returncode,
        "peak_pss_mb": round(peak_kib / 1024, 1),
        "processes_at_peak": peak_procs,
        # where the peak is: each process's PSS in the peak sample, largest first
        "pss_at_peak_mb": [
            [title, round(kib / 1024, 1)] for title, kib in sorted(at_peak, key=lambda x: -x[1])
        ],
        "samples": samples,
        # this process's own CPU time while it sampled: the measurement's cost to the machine
        "sampler_cpu_s": round(time.process_time() - cpu_start, 3),
        "left_behind": _end_leftovers(me),
    }


def _reap(pids: set[int]) -> None:
    """Collect re-parented descendants that have exited (they are this process's children now)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _end_leftovers(me: int, grace_s: float = 10.0) -> int:
    """Processes the variant left running after its exit: given `grace_s` to go, then ended (they
    are ours: started by the variant, re-parented here). Returns how many there were."""
    deadline = time.monotonic() + grace_s
    left = descendants(me) - {me}
    while left and time.monotonic() < deadline:
        _reap(left)
        time.sleep(0.2)
        left = {p for p in descendants(me) - {me} if pss_kib(p) > 0}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return len(left)


# ---------------------------------------------------------------------------------------------
# The paired run and its table
# ---------------------------------------------------------------------------------------------


def summarise(runs: list[dict], variants: list[str], notes: dict[str, str]) -> str:
    """The markdown table: per variant the range over pairs of wall, wall / plain loop's wall in
    the same pair, and peak PSS."""

    def span(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"

    plain_wall = {r["pair"]: r["wall_s"] for r in runs if r["variant"] == "plain" and r["ok"]}
    lines = [
        "| variant | wall (whole process) | x plain loop (paired) | peak PSS (process tree) |",
        "|---|---|---|---|",
    ]
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and r["ok"]]
        failed = [r for r in runs if r["variant"] == v and not r["ok"]]
        label = f"{v}: {DESCRIPTIONS[v]}" + (f" ({notes[v]})" if notes.get(v) and ok else "")
        if not ok:
            why = failed[0]["error"] if failed else "not run"
            lines.append(f"| {label} | {why} | - | - |")
            continue
        ratios = [r["wall_s"] / plain_wall[r["pair"]] for r in ok if r["pair"] in plain_wall]
        extra = f" ({len(failed)} of {len(ok) + len(failed)} runs failed)" if failed else ""
        lines.append(
            f"| {label}{extra} | {span([r['wall_s'] for r in ok], '.1f')} s | "
            f"{span(ratios, '.2f')} | {span([r['peak_pss_mb'] for r in ok], ',.0f')} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="paired repetitions (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=Path("runs/peers.json"), help="raw figures")
    parser.add_argument("--work", type=Path, default=Path("runs/peers"), help="inputs and logs")
    parser.add_argument(
        "--venvs",
        type=Path,
        default=Path.home() / ".cache" / "fedsim" / "bench-venvs",
        help="where the peers' virtual environments are built",
    )
    parser.add_argument(
        "--sample-ms",
        type=float,
        default=50.0,
        help="PSS sampling interval (default 50); each sample costs this process CPU time, more "
        "the more processes the variant runs (see sampler CPU below the table)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=Workload.rounds,
        help=f"rounds of the workload (default {Workload.rounds}; 45 make a ~5-minute plain loop)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 round of 2 local steps: checks that every variant runs; the figures mean nothing",
    )
    parser.add_argument("--child", choices=sorted(CHILD_FUNCTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    if args.child:  # inside a variant's process
        CHILD_FUNCTIONS[args.child](work)
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(
            f"--variants: unknown {', '.join(sorted(unknown))}; expected {', '.join(VARIANTS)}"
        )
    from importlib.metadata import version

    w = Workload(rounds=1, local_steps=2) if args.smoke else Workload(rounds=args.rounds)
    write_inputs(w, work)
    notes: dict[str, str] = {}
    commands: dict[str, list[str] | None] = {}
    script = str(Path(__file__).resolve())
    for v in variants:
        if v == "plain":
            commands[v] = [sys.executable, script, "--child", v, "--work", str(work)]
        elif v.startswith("fedsim-"):
            workers, cpus = (int(x) for x in v.removeprefix("fedsim-").split("x"))
            commands[v] = fedsim_command(work, v, workers, cpus)
            notes[v] = f"fedsim {version('fedsim')}"
        else:
            python, notes[v] = ensure_venv(args.venvs.expanduser(), v, peer_requirements()[v])
            commands[v] = (
                None if python is None else [str(python), script, "--child", v, "--work", str(work)]
            )

    become_subreaper()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[dict] = []
    for pair in range(args.pairs):
        order = variants[pair % len(variants) :] + variants[: pair % len(variants)]
        for v in order:
            if commands[v] is None:
                runs.append({"pair": pair, "variant": v, "ok": False, "error": notes[v]})
                continue
            log = work / "logs" / f"{v}-pair{pair}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            r = {
                "pair": pair,
                "variant": v,
                **measure(commands[v], log, env, args.sample_ms / 1000),
                "log": str(log),
            }
            r["ok"] = r["rc"] == 0
            if not r["ok"]:
                r["error"] = f"run failed (exit {r['rc']}), see {log}"
            runs.append(r)
            print(
                f"pair {pair + 1}/{args.pairs} {v:<11} {r['wall_s']:7.1f} s "
                f"{r['peak_pss_mb']:8,.0f} MB{'' if r['ok'] else '  FAILED: ' + r['error']}",
                flush=True,
            )

    table = summarise(runs, variants, notes)
    print()
    print(table)
    print("\nsampler CPU (this process reading /proc while the variant ran, % of its wall):")
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and r["ok"]]
        if ok:
            share = sum(r["sampler_cpu_s"] for r in ok) / sum(r["wall_s"] for r in ok)
            print(f"  {v:<11} {100 * share:4.1f} %")
    print("\nwhere each variant's largest peak is (PSS of each process in that sample, MB):")
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and r["ok"]]
        if ok:
            top = max(ok, key=lambda r: r["peak_pss_mb"])["pss_at_peak_mb"]
            print(f"  {v:<11} " + ", ".join(f"{title} {mb:.0f}" for title, mb in top[:8]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "workload": dataclasses.asdict(w),
        "pairs": args.pairs,
        "variants": variants,
        "notes": notes,
        "runs": runs,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
