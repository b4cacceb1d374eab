"""Running clients on the Ray worker pool, and what a failure means.

`WorkerPool` owns the ClientWorker actors. Ray restarts a worker whose process dies (up to
`cluster.max_worker_restarts` times, reloading the base model), and the pool retries the client it
was training; `FailurePolicy` decides, per outcome, whether a client is retried or dropped. A
client whose training raised is dropped at once (its traceback is in the outcome): the same input
would fail again. Outcomes are values, never exceptions across the actor boundary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from fedsim.client.worker import ClientOutcome, ClientTask, ClientWorkerActor, WorkerSpec

REVIVE_SECONDS = 120.0
"""How long a restarting worker may take to come back (it reloads the base model)."""


@dataclass(frozen=True)
class FailurePolicy:
    """Retry a client whose worker died, up to `max_client_retries` times; drop it after that,
    and drop a client whose own training raised."""

    max_client_retries: int = 2

    def should_retry(self, outcome: ClientOutcome) -> bool:
        return outcome.worker_lost and outcome.attempts <= self.max_client_retries


class WorkerPool:
    """The ClientWorker actors of a run; a free worker takes the next client of the round."""

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

    def run(
        self,
        tasks: list[ClientTask],
        global_ref: Any,
        on_update: Callable[[ClientTask, Any], None],
        policy: FailurePolicy,
        log: Callable[[str], None],
        show_progress: bool = False,
        contexts: dict[int, Any] | None = None,
    ) -> list[ClientOutcome]:
        """Train `tasks`, calling `on_update(task, adapter_ref)` as each client succeeds; returns
        the final outcome of every task, in task order. `contexts` maps a client id to its
        `ClientContext` (or a reference to one) for the worker."""
        contexts = contexts or {}
        queue = deque((t, 1) for t in tasks)
        free = list(self.alive)
        pending: dict[Any, tuple[int, ClientTask, int, Any]] = {}
        reviving: dict[Any, tuple[int, float]] = {}  # ping ref -> (worker, deadline)
        outcomes: dict[int, ClientOutcome] = {}
        bar = tqdm(total=len(tasks), desc="  clients", leave=False, disable=not show_progress)
        while queue or pending:
            if not free and not pending and not reviving:  # every worker is gone
                for task, attempt in queue:
                    outcomes[task.client_id] = ClientOutcome(
                        task.client_id, ok=False, attempts=attempt, error="no live worker left"
                    )
                break
            while queue and free:
                w, (task, attempt) = free.pop(), queue.popleft()
                meta_ref, adapter_ref = (
                    self.actors[w]
                    .train.options(num_returns=2)
                    .remote(task, global_ref, contexts.get(task.client_id))
                )
                pending[meta_ref] = (w, task, attempt, adapter_ref)
            [done], _ = ray.wait([*pending, *reviving], num_returns=1)
            if done in reviving:
                w, deadline = reviving.pop(done)
                if self._revived(done, w, deadline, reviving, log):
                    free.append(w)
                continue
            w, task, attempt, adapter_ref = pending.pop(done)
            outcome = self._collect(done, w, task, attempt, log)
            if outcome.worker_lost and w in self.alive:  # Ray is restarting it: wait until up
                reviving[self.actors[w].info.remote()] = (w, time.monotonic() + REVIVE_SECONDS)
            elif w in self.alive:
                free.append(w)
            if policy.should_retry(outcome):
                log(f"client {task.client_id}: {outcome.error}; retry {attempt}")
                queue.append((task, attempt + 1))
                continue
            if outcome.ok:
                on_update(task, adapter_ref)
            outcomes[task.client_id] = outcome
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.mean_loss:.3f}")
        bar.close()
        return [outcomes[t.client_id] for t in tasks]

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
        self, ref: Any, w: int, task: ClientTask, attempt: int, log: Callable[[str], None]
    ) -> ClientOutcome:
        try:
            outcome: ClientOutcome = ray.get(ref)
        except ray.exceptions.ActorDiedError:  # restarts used up: the worker is gone for good
            self.alive.remove(w)
            log(f"worker {w} is gone for good; {len(self.alive)} left")
            outcome = ClientOutcome(task.client_id, ok=False, worker_lost=True)
            outcome.error = "its worker died and cannot be restarted"
        except ray.exceptions.RayActorError as err:  # died mid-task; Ray restarts the worker
            outcome = ClientOutcome(task.client_id, ok=False, worker_lost=True)
            outcome.error = f"its worker died ({type(err).__name__})"
        outcome.attempts = attempt
        return outcome
