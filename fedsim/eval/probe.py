"""The per-round held-out probe: exact match of each round's global adapter on a few test records
per category, decoded on a worker while the run goes on (`eval.probe_per_category`).

`fedsim eval` scores a finished round on the whole test split; the probe is its cheap sibling
that makes the round line say what the model can do, not only its loss. Its figures sit beside
the round's record in metrics.jsonl (not in round.json, which the aggregator writes before the
probe runs) and `fedsim report` draws them as the per-round heat map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fedsim.config import ExperimentConfig
from fedsim.data.templates import get_template
from fedsim.eval.metrics import exact_match_by_category, probe_records


@dataclass(frozen=True)
class HeldoutProbe:
    """The probe's fixed questions: the first `eval.probe_per_category` test records of each
    category, their rendered prompts, and how many tokens an answer may take."""

    records: tuple[dict[str, Any], ...]
    prompts: tuple[str, ...]
    max_new_tokens: int

    @classmethod
    def of_run(
        cls, cfg: ExperimentConfig, table: pa.Table, test: np.ndarray
    ) -> HeldoutProbe | None:
        """The probe of a run whose records are `table` and test split `test` (row positions);
        None when the config leaves it off or there is no test record."""
        if cfg.eval.probe_per_category <= 0 or len(test) == 0:
            return None
        rows = table.select(["instruction", "context", "response", "category"]).take(test)
        records = probe_records(rows.to_pylist(), cfg.eval.probe_per_category)
        template = get_template(cfg.data.template)
        prompts = [template.render(r["instruction"], r.get("context") or "") for r in records]
        return cls(tuple(records), tuple(prompts), cfg.eval.generation.max_new_tokens)

    def score(self, answers: list[str]) -> dict[str, Any]:
        """The metrics-line fields of one round's answers (in the order of `prompts`)."""
        em = exact_match_by_category(answers, self.records)
        return {
            "heldout_exact_match": round(em["mean"], 6),
            "exact_match_by_category": {c: round(v, 6) for c, v in em["by_category"].items()},
        }
