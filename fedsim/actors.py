"""The Ray actors a run starts, as shells the driver can import without torch.

The driver process only schedules, tokenises and writes metrics; importing torch, transformers
and peft would cost it ~4 s and ~300 MB (issue 16's measurements) for nothing. Ray needs each
actor's class in the driver, though, so the classes here are shells: each builds the real object
(`fedsim.client.worker.ClientWorker`, `fedsim.server.aggregator.Aggregator`, plain classes that
tests use without Ray) in the actor's own process, and forwards every remote method to it. The
shells keep the real classes' names, which Ray shows in process titles and logs.

A method added to a real class that the driver or a worker calls remotely needs its forwarder
here; tests/test_actors.py checks that none is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from fedsim.client.spec import WorkerSpec
    from fedsim.config import ExperimentConfig


class ClientWorker:
    """A Ray worker actor: see `fedsim.client.worker.ClientWorker`."""

    def __init__(self, spec: WorkerSpec) -> None:
        from fedsim.client.worker import ClientWorker as Worker

        self._worker = Worker(spec)

    def initial_adapter(self) -> Any:
        return self._worker.initial_adapter()

    def adapter_config(self) -> dict[str, Any]:
        return self._worker.adapter_config()

    def info(self) -> dict[str, Any]:
        return self._worker.info()

    def generate(self, global_adapter: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self._worker.generate(global_adapter, prompts, max_new_tokens)

    def train(self, task: Any, global_adapter: Any, context: Any = None) -> tuple[Any, Any]:
        return self._worker.train(task, global_adapter, context)

    def train_batch(self, tasks: list[Any], global_adapter: Any, *contexts: Any) -> tuple[Any, Any]:
        return self._worker.train_batch(tasks, global_adapter, *contexts)


class Aggregator:
    """The aggregator actor: see `fedsim.server.aggregator.Aggregator`.

    `adapter_config` is the first worker's pending reply, boxed in a list: Ray would wait for a
    bare reference before starting this actor's process, and the point of starting it early is
    that its imports overlap the worker's model load."""

    def __init__(
        self,
        run_dir: str,
        cfg: ExperimentConfig,
        adapter_config: list[Any],
        provenance: dict[str, str],
    ) -> None:
        from fedsim.server.aggregator import Aggregator as Impl

        self._impl = Impl(run_dir, cfg, ray.get(adapter_config[0]), provenance)

    def set_global(self, adapter: Any, server_state: Any = None) -> None:
        self._impl.set_global(adapter, server_state)

    def restore(self, round_dir: str) -> Any:
        return self._impl.restore(round_dir)

    def read_adapter(self, round_dir: str) -> Any:
        return self._impl.read_adapter(round_dir)

    def global_nbytes(self) -> int:
        return self._impl.global_nbytes()

    def client_context(self, client_id: int, lora_rank: int | None = None) -> Any:
        return self._impl.client_context(client_id, lora_rank)

    def client_contexts(self, client_ids: list[int], lora_ranks: list[Any] | None = None) -> Any:
        return self._impl.client_contexts(client_ids, lora_ranks)

    def begin_round(self, sample_counts: dict[int, int], round_idx: int = 0) -> None:
        self._impl.begin_round(sample_counts, round_idx)

    def begin_step(self, step: int, weights: dict[int, int], units: dict[int, int]) -> None:
        self._impl.begin_step(step, weights, units)

    def fold(self, client_id: int, upload: Any, trained_from: Any = None) -> Any:
        return self._impl.fold(client_id, upload, trained_from)

    def fold_batch(
        self, client_ids: list[Any], uploads: list[Any], trained_from: Any = None
    ) -> Any:
        return self._impl.fold_batch(client_ids, uploads, trained_from)

    def finish_round(self, round_idx: int, info: dict[str, Any], trained: Any = None) -> Any:
        return self._impl.finish_round(round_idx, info, trained)

    def flush(self) -> list[dict[str, Any]]:
        return self._impl.flush()


ClientWorkerActor = ray.remote(ClientWorker)
AggregatorActor = ray.remote(num_cpus=0)(Aggregator)
