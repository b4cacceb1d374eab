"""The per-round held-out probe: which records it asks, how it scores, and when it is refused."""

import pytest

from fedsim.config import config_from_dict
from fedsim.data.pipeline import prepare_data
from fedsim.errors import ConfigError
from fedsim.eval.probe import HeldoutProbe
from tests.conftest import tiny_experiment


def _cfg(tmp_path, **sections):
    return config_from_dict(tiny_experiment(tmp_path, **sections))


def test_probe_asks_the_first_test_records_of_each_category(tmp_path) -> None:
    cfg = _cfg(tmp_path, data={"test_per_category": 3}, eval={"probe_per_category": 2})
    data = prepare_data(cfg.data, cfg.run.seed)

    probe = HeldoutProbe.of_run(cfg, data.table, data.test)

    assert probe is not None
    test_rows = data.table.take(data.test).to_pylist()
    categories = {r["category"] for r in test_rows}
    assert [r["category"] for r in probe.records].count(next(iter(categories))) == 2
    assert len(probe.records) == 2 * len(categories)
    test_instructions = [r["instruction"] for r in test_rows]
    assert all(r["instruction"] in test_instructions for r in probe.records)
    assert all(r["instruction"] in p for r, p in zip(probe.records, probe.prompts, strict=True))
    assert probe.max_new_tokens == cfg.eval.generation.max_new_tokens


def test_probe_is_off_by_default(tmp_path) -> None:
    cfg = _cfg(tmp_path, data={"test_per_category": 3})
    data = prepare_data(cfg.data, cfg.run.seed)

    assert HeldoutProbe.of_run(cfg, data.table, data.test) is None


def test_score_is_exact_match_per_category(tmp_path) -> None:
    cfg = _cfg(tmp_path, data={"test_per_category": 2}, eval={"probe_per_category": 1})
    data = prepare_data(cfg.data, cfg.run.seed)
    probe = HeldoutProbe.of_run(cfg, data.table, data.test)
    assert probe is not None
    answers = [r["response"] for r in probe.records]
    answers[0] = "certainly wrong"

    scored = probe.score(answers)

    n = len(probe.records)
    assert scored["heldout_exact_match"] == pytest.approx((n - 1) / n, abs=1e-6)
    first = probe.records[0]["category"]
    assert scored["exact_match_by_category"][first] == 0.0
    assert all(v == 1.0 for c, v in scored["exact_match_by_category"].items() if c != first)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"data": {"test_per_category": 0}}, "data.test_per_category is 0"),
        ({"eval": {"exact_match": False}}, "exact match needs answers with one right form"),
        ({"eval": {"probe_per_category": -1}}, "eval.probe_per_category"),
    ],
)
def test_probe_that_cannot_score_is_refused(tmp_path, sections, expected) -> None:
    raw = tiny_experiment(tmp_path, data={"test_per_category": 2}, eval={"probe_per_category": 2})
    for section, values in sections.items():
        raw[section].update(values)

    with pytest.raises(ConfigError, match=expected):
        config_from_dict(raw)
