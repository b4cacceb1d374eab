"""Running clients on the Ray worker pool, and what a failure means.

`WorkerPool` owns the ClientWorker actors. Ray restarts a worker whose process dies (up to
`cluster.max_worker_restarts` times, reloading the base model), and the pool retries the client it
was training; `FailurePolicy` decides, per outcome, whether a client is retried or dropped. A
client whose training raised is dropped at once (its traceback is in the outcome): the same input
would fail again. Outcomes are values, never exceptions across the actor boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from tqdm import tqdm

from fedsim.client.worker import ClientOutcome, ClientTask, ClientWorkerActor, WorkerSpec


@dataclass(frozen=True)
class FailurePolicy:
    """Retry a client whose worker died, up to `max_client_retries` times; drop it after that,
    and drop a client whose own training raised."""

    max_client_retries: int = 2

    def should_retry(self, outcome: ClientOutcome) -> bool:
        return outcome.worker_lost and outcome.attempts <= self.max_client_retries


class WorkerPool:
    """The ClientWorker actors of a run; a free worker takes the next client of the round."""

    def __init__(self, spec: WorkerSpec, size: int, options: dict[str, Any], restarts: int) -> None:
        self.actors = [
            ClientWorkerActor.options(**options, max_restarts=restarts, max_task_retries=0).remote(
                spec
            )
            for _ in range(size)
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
    ) -> list[ClientOutcome]:
        """Train `tasks`, calling `on_update(task, adapter_ref)` as each client succeeds; returns
        the final outcome of every task, in task order."""
        queue = deque((t, 1) for t in tasks)
        free = list(self.alive)
        pending: dict[Any, tuple[int, ClientTask, int, Any]] = {}
        outcomes: dict[int, ClientOutcome] = {}
        bar = tqdm(total=len(tasks), desc="  clients", leave=False, disable=not show_progress)
        while queue or pending:
            if not free and not pending:  # every worker is gone: nothing can take the rest
                for task, attempt in queue:
                    outcomes[task.client_id] = ClientOutcome(
                        task.client_id, ok=False, attempts=attempt, error="no live worker left"
                    )
                break
            while queue and free:
                w, (task, attempt) = free.pop(), queue.popleft()
                meta_ref, adapter_ref = (
                    self.actors[w].train.options(num_returns=2).remote(task, global_ref)
                )
                pending[meta_ref] = (w, task, attempt, adapter_ref)
            [done], _ = ray.wait(list(pending), num_returns=1)
            w, task, attempt, adapter_ref = pending.pop(done)
            outcome = self._collect(done, w, task, attempt, log)
            if w in self.alive:
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
