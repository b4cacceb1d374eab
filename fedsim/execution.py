"""Running clients on the Ray worker pool, and what a failure means; the Ray session and the
pool's placement.

`WorkerPool` owns the ClientWorker actors. Ray restarts a worker whose process dies (up to
`cluster.max_worker_restarts` times, reloading the base model), and the pool retries the client it
was training; `FailurePolicy` decides, per outcome, whether a client is retried or dropped. A
client whose training raised is dropped at once (its traceback is in the outcome): the same input
would fail again. Outcomes are values, never exceptions across the actor boundary.

A task whose *input* could not be computed (a reference returned by an actor that has since died,
such as the aggregator's client contexts) fails although its worker is alive and well: the pool
raises `TaskInputLost` for it instead of counting a worker as dead, and the caller redoes the work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from fedsim import console, ray_auth
from fedsim.actors import ClientWorkerActor
from fedsim.client.spec import WorkerSpec, pack_directory
from fedsim.config import ClusterConfig, ExperimentConfig
from fedsim.data.shards import INDEX_FILE
from fedsim.errors import FedsimInputError
from fedsim.protocol import ClientOutcome, ClientTask

Log = Callable[[str], None]
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
"""Environment of every Ray worker process fedsim starts (quiet, single-threaded tokenizers)."""
VERBOSE_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", console.VERBOSE_ENV: "1"}
"""The workers' environment under `--verbose`: the libraries log as they would on their own."""

REVIVE_SECONDS = 120.0
"""How long a restarting worker may take to come back (it reloads the base model)."""


class TaskInputLost(Exception):
    """An input of a client's task came from an actor that died (its worker is fine)."""

    def __init__(self, client_id: int, cause: ray.exceptions.RayActorError) -> None:
        super().__init__(f"an input of client {client_id}'s task was lost ({type(cause).__name__})")
        self.actor_id = cause.actor_id


@dataclass(frozen=True)
class FailurePolicy:
    """Retry a client whose worker died, up to `max_client_retries` times; drop it after that,
    and drop a client whose own training raised."""

    max_client_retries: int = 2

    def should_retry(self, outcome: ClientOutcome) -> bool:
        return outcome.worker_lost and outcome.attempts <= self.max_client_retries


Batch = list[tuple[ClientTask, int]]
"""Clients handed to a worker in one task, each with the try it is on."""


class WorkerPool:
    """The ClientWorker actors of a run; a free worker takes the next clients of the round.

    A worker is handed a batch of clients per Ray task (`batch_size`): a round of many clients
    of short local training would otherwise spend a good part of its time dispatching one task,
    fetching one outcome and folding one update per client while the worker waits."""

    max_batch: int = 16
    """The most clients in one task; 1 hands out one client per task."""

    def __init__(
        self,
        spec: WorkerSpec,
        size: int,
        options: dict[str, Any],
        restarts: int,
        placement_group: Any = None,
    ) -> None:
        def place(i: int) -> dict[str, Any]:
            # Worker i in bundle i of the reservation (a restarted worker returns to it).
            if placement_group is None:
                return {}
            strategy = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=i
            )
            return {"scheduling_strategy": strategy}

        self.actors = [
            ClientWorkerActor.options(
                **options, **place(i), max_restarts=restarts, max_task_retries=0
            ).remote(spec)
            for i in range(size)
        ]
        self.alive = list(range(size))

    def first(self) -> Any:
        """A live worker, for the one-off calls (initial adapter, adapter config)."""
        return self.actors[self.alive[0]]

    def batch_size(self, queued: int) -> int:
        """Clients for the next free worker when `queued` wait: half a fair share of them
        (guided self-scheduling, so batches shrink as the round ends and no worker is left
        with a long tail), at most `max_batch`."""
        share = math.ceil(queued / (2 * max(1, len(self.alive))))
        return max(1, min(self.max_batch, share))

    def run(
        self,
        tasks: list[ClientTask],
        global_ref: Any,
        on_update: Callable[[list[ClientTask], Any], None],
        policy: FailurePolicy,
        log: Callable[[str], None],
        show_progress: bool = False,
        contexts: dict[int, Any] | None = None,
    ) -> list[ClientOutcome]:
        """Train `tasks`, calling `on_update(succeeded, uploads_ref)` as each batch of clients
        returns: `uploads_ref` holds the uploads of the tasks `succeeded`, in their order.
        Returns the final outcome of every task, in task order. `contexts` maps a client id to
        its `ClientContext` (or a reference to one) for the worker."""
        contexts = contexts or {}
        queue = deque((t, 1) for t in tasks)
        free = list(self.alive)
        pending: dict[Any, tuple[int, Batch, Any]] = {}
        reviving: dict[Any, tuple[int, float]] = {}  # ping ref -> (worker, deadline)
        outcomes: dict[int, ClientOutcome] = {}
        with tqdm(
            total=len(tasks), desc="  clients", leave=False, disable=not show_progress
        ) as bar:
            while queue or pending:
                if not free and not pending and not reviving:  # every worker is gone
                    for task, attempt in queue:
                        outcomes[task.client_id] = ClientOutcome(
                            task.client_id, ok=False, attempts=attempt, error="no live worker left"
                        )
                    break
                while queue and free:
                    w = free.pop()
                    batch = [queue.popleft() for _ in range(self.batch_size(len(queue)))]
                    outcomes_ref, uploads_ref = self._submit(w, batch, global_ref, contexts)
                    pending[outcomes_ref] = (w, batch, uploads_ref)
                [done], _ = ray.wait([*pending, *reviving], num_returns=1)
                if done in reviving:
                    w, deadline = reviving.pop(done)
                    if self._revived(done, w, deadline, reviving, log):
                        free.append(w)
                    continue
                w, batch, uploads_ref = pending.pop(done)
                collected = self._collect(done, w, batch, log)
                if any(o.worker_lost for o in collected) and w in self.alive:
                    # Ray is restarting it: wait until it is up
                    reviving[self.actors[w].info.remote()] = (w, time.monotonic() + REVIVE_SECONDS)
                elif w in self.alive:
                    free.append(w)
                succeeded = []
                for (task, attempt), outcome in zip(batch, collected, strict=True):
                    if policy.should_retry(outcome):
                        log(f"client {task.client_id}: {outcome.error}; retry {attempt}")
                        queue.append((task, attempt + 1))
                        continue
                    if outcome.ok:
                        succeeded.append(task)
                    outcomes[task.client_id] = outcome
                    bar.update(1)
                    bar.set_postfix(loss=f"{outcome.mean_loss:.3f}", refresh=False)
                if succeeded:
                    on_update(succeeded, uploads_ref)
        return [outcomes[t.client_id] for t in tasks]

    def _submit(
        self, w: int, batch: Batch, global_ref: Any, contexts: dict[int, Any]
    ) -> tuple[Any, Any]:
        """Hand `batch` to worker `w`: (the reference of its outcomes, that of its uploads)."""
        clients = [task for task, _ in batch]
        # each context a top-level argument: Ray resolves it (a reference) before the call
        own = [contexts[t.client_id] for t in clients] if contexts else []
        train = self.actors[w].train_batch.options(num_returns=2)
        return train.remote(clients, global_ref, *own)

    def _revived(
        self,
        ping: Any,
        w: int,
        deadline: float,
        reviving: dict[Any, tuple[int, float]],
        log: Callable[[str], None],
    ) -> bool:
        """Whether worker `w` answered its ping after a restart; re-pings it while it is still
        restarting, and gives it up when it is dead for good or past its deadline."""
        try:
            ray.get(ping)
            return True
        except ray.exceptions.ActorDiedError:
            pass
        except ray.exceptions.RayActorError:
            if time.monotonic() < deadline:
                time.sleep(0.1)  # still restarting: ask again shortly
                reviving[self.actors[w].info.remote()] = (w, deadline)
                return False
        self.alive.remove(w)
        log(f"worker {w} did not come back; {len(self.alive)} left")
        return False

    def _collect(
        self, ref: Any, w: int, batch: Batch, log: Callable[[str], None]
    ) -> list[ClientOutcome]:
        """The outcome of each client of `batch`, in order. A worker that died mid-batch takes
        the whole batch with it: each of its clients is a client whose worker died."""
        try:
            outcomes: list[ClientOutcome] = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            # The actor error of an input arrives wrapped in a task error whose actor is the
            # input's owner; a worker's own death is never wrapped. Other task errors are bugs.
            if isinstance(err, ray.exceptions.RayActorError):
                raise TaskInputLost(batch[0][0].client_id, err) from None
            raise
        except ray.exceptions.ActorDiedError:  # restarts used up: the worker is gone for good
            self.alive.remove(w)
            log(f"worker {w} is gone for good; {len(self.alive)} left")
            why = "its worker died and cannot be restarted"
            outcomes = [_lost(task, why) for task, _ in batch]
        except ray.exceptions.RayActorError as err:  # died mid-task; Ray restarts the worker
            why = f"its worker died ({type(err).__name__})"
            outcomes = [_lost(task, why) for task, _ in batch]
        return [
            dataclasses.replace(outcome, attempts=attempt)
            for outcome, (_, attempt) in zip(outcomes, batch, strict=True)
        ]


def _lost(task: ClientTask, why: str) -> ClientOutcome:
    return ClientOutcome(task.client_id, ok=False, worker_lost=True, error=why)


# ------------------------------------------------------------------------------------------
# The Ray session and the pool's placement
# ------------------------------------------------------------------------------------------


def cluster_address(cluster: ClusterConfig) -> str | None:
    """The Ray cluster to attach to (`cluster.address`, else RAY_ADDRESS); None starts one."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


RAY_WARNINGS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(
            r"object store is using (\S+) instead of /dev/shm because /dev/shm has only "
            r"(\d+) bytes available.*--shm-size=([\d.]+)gb",
            re.S,
        ),
        lambda m: (
            f"fedsim: warning: Ray keeps its object store in {m[1]}, on disk, because /dev/shm "
            f"has only {int(m[2]) / 2**20:.0f} MB free: adapters and shards move between "
            f"processes more slowly; in Docker, start the container with --shm-size={m[3]}gb"
        ),
    ),
)
"""Ray warnings a user can act on, each with what fedsim says instead (see `_RayWarnings`)."""


class _RayWarnings(logging.Filter):
    """On the driver's "ray" log handlers when quiet: errors pass; a warning in `RAY_WARNINGS`
    is said in fedsim's words instead; anything else below an error (Ray's start-up banner, its
    notes for developers) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if getattr(record, "fedsim_said", False):  # the "ray" logger may have several handlers
            return False
        record.fedsim_said = True
        message = record.getMessage()
        for pattern, in_our_words in RAY_WARNINGS:
            if match := pattern.search(message):
                print(in_our_words(match), file=sys.stderr, flush=True)
        return False


def quiet_ray_logger(quiet: bool) -> None:
    """Install (or remove) `_RayWarnings` on the handlers of the driver's "ray" logger."""
    for handler in logging.getLogger("ray").handlers:
        for old in [f for f in handler.filters if isinstance(f, _RayWarnings)]:
            handler.removeFilter(old)
        if quiet:
            handler.addFilter(_RayWarnings())


def ray_init_options() -> dict[str, Any]:
    """ray.init's options for the driver's verbosity (fedsim.console), with the driver's "ray"
    logger set up to match.

    Quiet (the default): Ray's log lines below errors are dropped, except the warnings a user can
    act on, which fedsim rewrites (`RAY_WARNINGS`); what the workers print stays in Ray's log
    files (`log_to_driver`): a client's failure reaches the user as fedsim's own line, with its
    traceback, from its outcome. Verbose: Ray's defaults, and the workers' output with their
    pid."""
    quiet_ray_logger(not console.verbose())
    if console.verbose():
        return {"runtime_env": {"env_vars": VERBOSE_WORKER_ENV}, "log_to_driver": True}
    return {
        "runtime_env": {"env_vars": WORKER_ENV},
        "log_to_driver": False,
        "logging_level": logging.WARNING,  # for `_RayWarnings`, which drops what it does not say
    }


LOCAL_SYSTEM_CONFIG = {
    "_system_config": {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
}
"""Settings of a local Ray instance: no idle Python workers started ahead of need (Ray starts one
per CPU for tasks; fedsim runs only actors, which get processes of their own, so the prestarted
ones sat idle, ~45 MB each, issue 16)."""


@dataclass
class RaySession:
    """What `ray_session` did: whether it started a local instance, and whether it left that
    instance running for the process's exit to end (`end_process`)."""

    started_local: bool = False
    left_running: bool = False


@contextmanager
def ray_session(cluster: ClusterConfig, *, exit_follows: bool = False) -> Iterator[RaySession]:
    """Attach to `cluster.address`/RAY_ADDRESS, or start a local instance; shut down what we
    started, also on Ctrl-C. Token authentication is on unless `cluster.allow_unauthenticated`
    accepts a cluster without it (fedsim.ray_auth).

    `exit_follows`: the caller ends the process (`end_process`) right after a block that
    finished normally, so a local instance is left running instead of shut down (Linux only,
    where its processes share the driver's fate)."""
    session = RaySession()
    started = False
    if not ray.is_initialized():
        address = cluster_address(cluster)
        if not (address and cluster.allow_unauthenticated):
            ray_auth.require_token_auth()
        if address:
            ray.init(address=address, **ray_init_options())
        else:  # no dashboard: a local simulation needs none, and it costs seconds and a port
            ray.init(include_dashboard=False, **LOCAL_SYSTEM_CONFIG, **ray_init_options())
            session.started_local = True
        started = True
    finished = False
    try:
        yield session
        finished = True
    finally:
        if finished and exit_follows and session.started_local and sys.platform == "linux":
            session.left_running = True
        elif started:
            ray.shutdown()


def end_process(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process now, without the interpreter's teardown.

    Once a run's files are durable nothing is left to do, but the usual exit still costs 2-3 s
    on a small run (issue 16): Ray's graceful shutdown gives each of its processes up to a
    second to exit, then the interpreter tears down its modules. On Linux the processes of a
    local instance Ray started are the driver's fate-sharing children (PR_SET_PDEATHSIG), so the
    kernel ends them, and the workers with their raylet, as this process ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _node_capacity(node: dict[str, float], cluster: ClusterConfig) -> int:
    """Workers of `cluster`'s shape that fit on one node with resources `node`."""
    fits = math.floor(node.get("CPU", 0.0) / cluster.cpus_per_worker + 1e-9)
    if cluster.gpus_per_worker > 0:
        fits = min(fits, math.floor(node.get("GPU", 0.0) / cluster.gpus_per_worker + 1e-9))
    return max(fits, 0)


def pool_size(cluster: ClusterConfig, nodes: list[dict[str, float]], per_round: int) -> int:
    """Number of ClientWorkers: `cluster.num_workers`, or as many as the nodes hold (never more
    than the clients of one round). `nodes` holds the resources of each alive node: a worker
    lives on one node, so it is sized per node, not from the cluster's totals. An impossible
    request is an error, not a hang."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    shape = f"{cluster.cpus_per_worker:g} CPU and {cluster.gpus_per_worker:g} GPU"
    fits = sum(_node_capacity(n, cluster) for n in nodes)
    if fits < 1:
        field = "cluster.cpus_per_worker"
        most = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        largest = f"{most:g} CPU"
        if cluster.gpus_per_worker > 0:
            most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            if most_gpus < cluster.gpus_per_worker:
                field, largest = "cluster.gpus_per_worker", f"{most_gpus:g} GPU"
        raise FedsimInputError(
            f"{field}: a worker needs {shape}, but no node has that much (the largest has "
            f"{largest}; the cluster: {len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU)"
        )
    if cluster.num_workers is not None:
        if cluster.num_workers > fits:
            raise FedsimInputError(
                f"cluster.num_workers: {cluster.num_workers} workers do not fit; the cluster "
                f"({len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU) holds {fits} of {shape}"
            )
        return cluster.num_workers
    return min(fits, per_round)


def alive_nodes() -> list[dict[str, float]]:
    """Resources of each alive node of the connected cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


# How long to wait for resources that the nodes present do have but other work holds.
PLACEMENT_TIMEOUT_S = 120.0


def reserve_workers(cluster: ClusterConfig, per_round: int, log: Log) -> Any:
    """A placement group with one bundle per ClientWorker, reserved before any worker starts, so
    that a pool that cannot be placed is a clear error after a bounded wait, never a hang.

    With `cluster.wait_for_nodes_s` the wait covers an autoscaler starting nodes (the pending
    group is the demand it scales for); without it, a pool that fits no node present fails at once.
    """
    deadline = time.monotonic() + cluster.wait_for_nodes_s
    fits_now = True
    while True:
        try:
            n_workers = pool_size(cluster, alive_nodes(), per_round)
            break
        except FedsimInputError as err:
            if time.monotonic() >= deadline:
                raise
            if cluster.num_workers is not None:
                n_workers, fits_now = cluster.num_workers, False  # the autoscaler sees it all
                break
            log(f"waiting for nodes: {err}")
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    bundle = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker > 0:
        bundle["GPU"] = cluster.gpus_per_worker
    group = placement_group([dict(bundle) for _ in range(n_workers)], strategy="PACK")
    # Resources the nodes have but other work holds: a bounded wait. Nodes still to come: the
    # rest of wait_for_nodes_s.
    timeout = PLACEMENT_TIMEOUT_S if fits_now else max(1.0, deadline - time.monotonic())
    if not group.wait(timeout_seconds=timeout):
        remove_placement_group(group)
        raise FedsimInputError(
            f"cluster: could not reserve {n_workers} workers of {_short(bundle)} each within "
            f"{timeout:.0f} s (free now: {_short(ray.available_resources())}); other work holds "
            "the resources, or nodes are still starting: raise cluster.wait_for_nodes_s or "
            "lower cluster.num_workers"
        )
    return group


def _short(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "nothing"


@contextmanager
def worker_pool(
    cfg: ExperimentConfig,
    spec: WorkerSpec,
    per_round: int,
    options: dict[str, Any],
    log: Log,
) -> Iterator[WorkerPool]:
    """Reserve the pool's resources (`reserve_workers`) and start one ClientWorker per bundle;
    the shard index (and the built-in tiny model) travel through the object store unless
    `cluster.data_transport` is filesystem (the shard blocks then come with each task). On exit
    the reservation is removed, which ends the workers and frees their resources on a cluster
    that outlives the run."""
    group = reserve_workers(cfg.cluster, per_round, log)
    try:
        if cfg.cluster.data_transport == "object_store":
            tiny = cfg.model.name_or_path == "tiny"
            spec = dataclasses.replace(
                spec,
                shards_ref=ray.put((Path(spec.shards_dir) / INDEX_FILE).read_text()),
                model_files_ref=ray.put(pack_directory(spec.model_path)) if tiny else None,
            )
        # Ray's core worker notes once per process (to stderr, and its log file) that a restarted
        # worker needs its constructor's object refs; the pool holds them (`spec`) while it lives.
        with console.native_stderr_hidden():
            pool = WorkerPool(
                spec, group.bundle_count, options, cfg.cluster.max_worker_restarts, group
            )
        yield pool
    finally:
        remove_placement_group(group)
