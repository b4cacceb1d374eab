"""The judge's API key never leaves the process except in the Authorization header: `fedsim eval`
through the CLI, with a server that echoes the key back in errors and in its replies, and every
file, output and log line searched afterwards for any piece of it."""

from __future__ import annotations

import logging
import uuid

import pytest

from fedsim.cli import main
from tests.eval.conftest import ECHO_AUTHORIZATION, copy_run, judge_settings, leaks

pytestmark = pytest.mark.ray


@pytest.fixture
def canary(monkeypatch: pytest.MonkeyPatch) -> str:
    """A key no other test uses, in the variable the judge settings name."""
    key = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("FEDSIM_TEST_JUDGE_KEY", key)
    return key


def test_api_key_is_sent_and_found_nowhere_else(
    runs, tmp_path, capsys, caplog, judge_server, canary
):
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server(reply=lambda body: f"You sent Bearer {canary}. Rating: [[5]]")
    for pad in range(80, 200, 12):  # echoes cut at any point of a length limit
        server.fail_next(400, message="x" * pad + " invalid request, key " + ECHO_AUTHORIZATION)
    args = judge_settings(
        server, tmp_path, **{"eval.judge.single": "true", "eval.judge.max_retries": "0"}
    )
    caplog.set_level(logging.DEBUG)  # the HTTP libraries' own logging too

    code = main(["eval", str(run_dir), "--rounds", "2", *args])

    out, err = capsys.readouterr()
    assert code == 1, err  # the 400s are failed judgments
    assert "judge request failed: HTTP 400" in err
    assert len(server.requests) == 16  # every judged question was asked
    assert all(r["headers"]["authorization"] == f"Bearer {canary}" for r in server.requests)
    roots = [run_dir, tmp_path / "judge-cache"]
    assert leaks([canary], roots, [out, err, caplog.text]) == []


def test_key_with_a_line_end_is_refused_before_any_request(
    runs, tmp_path, capsys, caplog, judge_server, monkeypatch
):
    """A key file saved with CRLF gives `sk-...\\r`: no HTTP header can carry it, and the HTTP
    library's error would quote it. fedsim says so in one line, without the key."""
    key = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("FEDSIM_TEST_JUDGE_KEY", key + "\r")
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server()
    args = judge_settings(server, tmp_path, **{"eval.judge.single": "true"})
    caplog.set_level(logging.DEBUG)

    code = main(["eval", str(run_dir), "--rounds", "2", *args])

    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("fedsim: error: eval.judge.api_key_env:"), err
    assert "FEDSIM_TEST_JUDGE_KEY" in err and len(err.splitlines()) == 1
    assert server.requests == []
    assert leaks([key], [run_dir], [out, err, caplog.text]) == []
