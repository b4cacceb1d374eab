"""What `fedsim eval` leaves in a run directory can be trusted and kept: results survive the
trainer's resume, a report never shows a result of an adapter the round no longer has, files are
readable by whoever the umask allows, and credentials in the judge's URL are never recorded or
printed. Real runs (trained once per session), real generation, the judge over real HTTP."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import pytest

from fedsim import checkpoint
from fedsim.cli import main
from tests.eval.conftest import copy_run, judge_settings, leaks

pytestmark = pytest.mark.ray

EVAL_FILE = "eval.jsonl"  # a documented file name (README): users and their tools read it


def eval_section(report: Path) -> str:
    """The `## Evaluation` part of a single-run report.md."""
    text = report.read_text()
    return text[text.index("## Evaluation") : text.index("## Client participation")]


def eval_row(line: dict) -> str:
    """The start of a report's evaluation table row for one eval.jsonl line."""
    return f"| {line['round']} | {line['loss']:.4f} |"


def test_eval_results_survive_the_trainer_rewriting_metrics(runs, tmp_path, capsys):
    """`fedsim run --resume` rewrites metrics.jsonl (checkpoint.truncate_metrics); a concurrent
    `fedsim eval --watch` must not lose its results to that."""
    run_dir = copy_run(runs["fed"], tmp_path)
    assert main(["eval", str(run_dir), "--all"]) == 0
    before = (run_dir / EVAL_FILE).read_text()
    lines = [json.loads(x) for x in before.splitlines()]
    assert [m["round"] for m in lines] == [1, 2]

    checkpoint.truncate_metrics(run_dir, 0)  # a resume from round 0 redoes every round

    assert (run_dir / EVAL_FILE).read_text() == before
    assert main(["report", str(run_dir)]) == 0
    section = eval_section(run_dir / "report" / "report.md")
    assert all(eval_row(m) in section for m in lines), section


def test_report_reads_eval_lines_of_older_run_directories(runs, tmp_path):
    """Run directories from before eval.jsonl kept eval lines in metrics.jsonl."""
    run_dir = copy_run(runs["fed"], tmp_path)
    assert main(["eval", str(run_dir), "--all"]) == 0
    eval_file = run_dir / EVAL_FILE
    lines = [json.loads(x) for x in eval_file.read_text().splitlines()]
    with open(run_dir / "metrics.jsonl", "a") as f:  # as older fedsim appended them
        for m in lines:
            old = {k: v for k, v in m.items() if k != "adapter_sha256"}
            f.write(json.dumps(old) + "\n")
    eval_file.unlink()

    assert main(["report", str(run_dir)]) == 0
    section = eval_section(run_dir / "report" / "report.md")
    assert all(eval_row(m) in section for m in lines), section


def test_report_drops_results_of_an_adapter_the_round_no_longer_has(runs, tmp_path):
    """A resumed run redoes rounds: a result scored on the old round 2 describes an adapter that
    is gone, and the report says nothing rather than something false about round 2."""
    run_dir = copy_run(runs["fed"], tmp_path)
    assert main(["eval", str(run_dir), "--all"]) == 0
    lines = [json.loads(x) for x in (run_dir / EVAL_FILE).read_text().splitlines()]
    info_path = run_dir / "rounds" / checkpoint.round_name(2) / "round.json"
    info = json.loads(info_path.read_text())
    info["files"]["adapter_model.safetensors"] = "0" * 64  # round 2 redone: another adapter
    info_path.write_text(json.dumps(info))

    assert main(["report", str(run_dir)]) == 0
    section = eval_section(run_dir / "report" / "report.md")
    assert eval_row(lines[0]) in section
    assert "| 2 |" not in section and eval_row(lines[1]) not in section


def test_eval_files_follow_the_umask(runs, tmp_path, judge_server, judge_key):
    """Another user on a shared cluster reads what eval wrote when the umask allows it."""
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server()
    args = judge_settings(
        server, tmp_path, **{"eval.judge.single": "true", "eval.max_questions": "4"}
    )
    old = os.umask(0o022)
    try:
        assert main(["eval", str(run_dir), "--rounds", "2", *args]) == 0
    finally:
        os.umask(old)
    eval_dir = run_dir / "rounds" / checkpoint.round_name(2) / "eval"
    written = [run_dir / EVAL_FILE, *eval_dir.iterdir(), *(tmp_path / "judge-cache").rglob("*")]
    modes = {p.name: p.stat().st_mode & 0o777 for p in written if p.is_file()}
    assert "judgments_test.jsonl" in modes and "summary.json" in modes
    assert set(modes.values()) == {0o644}, modes
    assert eval_dir.stat().st_mode & 0o777 == 0o755


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_url_credentials_are_never_recorded_or_printed(
    runs, tmp_path, capsys, judge_server, judge_key
):
    """A base_url with `user:password@` and `?key=`: the judge is used as the URL says, and
    neither secret reaches a file of the run directory, the cache, or the output, whether the
    server answers or cannot be reached."""
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server()
    password, query_key = f"pw-{uuid.uuid4().hex}", f"qk-{uuid.uuid4().hex}"
    port = server.httpd.server_address[1]
    settings = {"eval.judge.single": "true", "eval.max_questions": "4"}

    url = f"http://judge:{password}@127.0.0.1:{port}/v1?key={query_key}"
    args = judge_settings(server, tmp_path, **settings, **{"eval.judge.base_url": url})
    assert main(["eval", str(run_dir), "--rounds", "2", *args]) == 0, capsys.readouterr().err
    assert server.requests and all(r["query"] == f"key={query_key}" for r in server.requests)
    summary = json.loads((run_dir / "rounds/round_0002/eval/summary.json").read_text())
    assert summary["sets"]["test"]["judge"]["base_url"] == f"http://127.0.0.1:{port}/v1"
    first = capsys.readouterr()

    closed = _closed_port()
    url = f"http://judge:{password}@127.0.0.1:{closed}/v1?key={query_key}"
    args = judge_settings(
        server,
        tmp_path,
        **settings,
        **{"eval.judge.base_url": url, "eval.judge.max_retries": "0"},
    )
    assert main(["eval", str(run_dir), "--rounds", "2", "--force", *args]) == 1
    second = capsys.readouterr()
    assert f"cannot connect to http://127.0.0.1:{closed}/v1" in second.err

    outputs = [first.out, first.err, second.out, second.err]
    assert leaks([password, query_key], [run_dir, tmp_path / "judge-cache"], outputs) == []
