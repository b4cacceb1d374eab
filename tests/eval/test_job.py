"""`fedsim eval`, `generate` and `report` end to end: real runs trained on a real local Ray with
the tiny model, real generation, and the judge over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from fedsim import checkpoint
from fedsim.cli import main
from fedsim.eval.job import EVAL_FILE, Evaluator, open_run, watch
from fedsim.tb import tensorboard_available
from tests.eval.conftest import SECRET, copy_run, judge_settings, prefer_longer, write_prompts

pytestmark = pytest.mark.ray

TEST_QUESTIONS = 16  # 2 held out of each of the 8 built-in categories


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`fedsim eval` sets torch's thread count for its process; give the test process its own
    back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def trainer_files(run_dir: Path) -> dict[str, bytes]:
    """Every file the trainer owns (metrics.jsonl included): all but rounds/*/eval/,
    tensorboard/eval, eval.jsonl and report/."""
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
        and "eval" not in p.relative_to(run_dir).parts
        and p.name != EVAL_FILE
        and "report" not in p.relative_to(run_dir).parts
    }


def snapshot(root: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / EVAL_FILE).read_text().splitlines()]


# --- server.client_ids ----------------------------------------------------------------------------


def test_client_ids_train_only_those_clients(runs):
    for record in metrics_lines(runs["local"]):
        assert record["clients"] == [2]
    info = json.loads((runs["local"] / "rounds/round_0002/round.json").read_text())
    assert info["aggregation"]["accepted"] == [2]
    assert {c for r in metrics_lines(runs["fed"]) for c in r["clients"]} != {2}


# --- offline evaluation ---------------------------------------------------------------------------


def test_eval_all_rounds_offline(runs, tmp_path, capsys):
    run_dir = copy_run(runs["fed"], tmp_path)
    before = trainer_files(run_dir)
    train_lines = (run_dir / "metrics.jsonl").read_text()

    assert main(["eval", str(run_dir), "--all"]) == 0

    out = capsys.readouterr().out
    assert "round   1 test: 16 questions | loss" in out and "round   2 test:" in out
    for r in (1, 2):
        eval_dir = run_dir / "rounds" / checkpoint.round_name(r) / "eval"
        assert {p.name for p in eval_dir.iterdir()} == {
            "answers_test.jsonl",
            "summary.json",
            ".lock",
        }
        summary = json.loads((eval_dir / "summary.json").read_text())
        s = summary["sets"]["test"]
        assert summary["round"] == r and s["questions"] == TEST_QUESTIONS
        assert 0 < s["loss"] < 20 and s["perplexity"] == pytest.approx(math.exp(s["loss"]))
        assert s["exact_match"]["n"] == TEST_QUESTIONS  # built-in data: exact answers
        assert s["rouge_l"]["n"] == TEST_QUESTIONS and 0 <= s["rouge_l"]["mean"] <= 1
        assert "judge" not in s
        rows = [json.loads(x) for x in (eval_dir / "answers_test.jsonl").open()]
        assert len(rows) == TEST_QUESTIONS and all(len(row["answers"]) == 1 for row in rows)
        # loss per category over the questions whose answer survived cutoff_len
        scored = {row["category"] for row in rows if row["loss"] is not None}
        assert set(s["loss_by_category"]) == scored and len(scored) >= 6
        em = sum(row["exact_match"] for row in rows) / TEST_QUESTIONS
        assert s["exact_match"]["mean"] == pytest.approx(em)
    # the trainer's files, metrics.jsonl included, are untouched; results go to eval.jsonl
    assert trainer_files(run_dir) == before
    assert (run_dir / "metrics.jsonl").read_text() == train_lines
    evals = eval_lines(run_dir)
    assert [(m["kind"], m["round"], m["set"]) for m in evals] == [
        ("eval", 1, "test"),
        ("eval", 2, "test"),
    ]
    assert evals[1]["loss"] < evals[0]["loss"]  # the second round's adapter fits better
    for m in evals:  # which adapter was scored: a report can tell a redone round's results
        info = json.loads(
            (run_dir / "rounds" / checkpoint.round_name(m["round"]) / "round.json").read_text()
        )
        assert m["adapter_sha256"] == info["files"]["adapter_model.safetensors"]

    # a rerun finds everything up to date
    text = (run_dir / EVAL_FILE).read_text()
    assert main(["eval", str(run_dir), "--all"]) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert (run_dir / EVAL_FILE).read_text() == text


def test_batched_generation_matches_one_by_one(runs):
    from fedsim.config import GenerationConfig
    from fedsim.eval.job import ModelPool, load_adapter
    from fedsim.eval.questions import load_question_sets

    run = open_run(runs["fed"])
    (qset,) = load_question_sets(run.run_dir, run.cfg)
    model = ModelPool().get(run.cfg)
    model.use_adapter(load_adapter(run, 2)[0])
    gen = GenerationConfig(max_new_tokens=12, batch_size=16)
    batched = model.answer(qset.questions, run.template, gen)
    single = [model.answer([q], run.template, gen)[0] for q in qset.questions]
    assert [a.answers for a in batched] == [a.answers for a in single]


# --- the judge ------------------------------------------------------------------------------------


def test_eval_with_judge_single_and_pairwise(runs, tmp_path, capsys, judge_server, judge_key):
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server(reply=_verdict)
    args = judge_settings(
        server, tmp_path, **{"eval.judge.single": "true", "eval.judge.baseline": "round:1"}
    )

    assert main(["eval", str(run_dir), "--rounds", "2", *args]) == 0

    eval_dir = run_dir / "rounds/round_0002/eval"
    assert {p.name for p in eval_dir.iterdir()} == {
        "answers_test.jsonl",
        "baseline_answers_test.jsonl",
        "judgments_test.jsonl",
        "summary.json",
        ".lock",
    }
    judgments = [
        json.loads(x) for x in (eval_dir / "judgments_test.jsonl").read_text().splitlines()
    ]
    single = [j for j in judgments if j["kind"] == "single"]
    pairs = [j for j in judgments if j["kind"] == "pair"]
    assert len(single) == len(pairs) == TEST_QUESTIONS
    assert all(j["score"] == 6.0 and j["prompt"] == "single-v1" for j in single)
    assert all(len(p["games"]) == 2 for p in pairs)
    judge = json.loads((eval_dir / "summary.json").read_text())["sets"]["test"]["judge"]
    assert judge["single"]["mean"] == 6.0 and judge["single"]["excluded"] == 0
    assert judge["pairwise"]["baseline"] == "round_0001"
    assert judge["pairwise"]["n"] == TEST_QUESTIONS
    usage = judge["usage"]
    judged = 3 * TEST_QUESTIONS  # one grading and two orders of a pair per question
    assert usage["requests"] == len(server.requests)  # identical prompts were sent once
    assert usage["requests"] + usage["cached"] == judged
    assert usage["cost_usd"] == pytest.approx(
        (usage["prompt_tokens"] * 10 + usage["completion_tokens"] * 20) / 1e6
    )
    line = eval_lines(run_dir)[-1]
    assert line["kind"] == "eval" and line["judge_score"] == 6.0 and "win_rate" in line
    assert judge["base_url"] == server.base_url  # recorded: which server judged
    assert all(r["body"]["temperature"] == 0 for r in server.requests)

    # --force redoes the round, and the judge cache makes it free
    sent = len(server.requests)
    assert main(["eval", str(run_dir), "--rounds", "2", "--force", *args]) == 0
    assert len(server.requests) == sent
    again = json.loads((eval_dir / "summary.json").read_text())["sets"]["test"]["judge"]
    assert again["usage"]["requests"] == 0 and again["usage"]["cached"] == judged
    assert again["usage"]["cost_usd"] == 0
    assert again["single"] == judge["single"]

    # the key is nowhere: not in the run directory, the cache, or anything printed
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def _verdict(body: dict) -> str:
    if "[The Start of Assistant A's Answer]" in body["messages"][1]["content"]:
        return prefer_longer(body)
    return "Solid.\nRating: [[6]]"


def test_local_only_run_as_pairwise_baseline(runs, tmp_path, capsys, judge_server, judge_key):
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server(reply=prefer_longer)
    args = judge_settings(server, tmp_path, **{"eval.judge.baseline": str(runs["local"])})

    assert main(["eval", str(run_dir), *args]) == 0  # the latest round by default

    summary = json.loads((run_dir / "rounds/round_0002/eval/summary.json").read_text())
    pairwise = summary["sets"]["test"]["judge"]["pairwise"]
    assert pairwise["baseline"] == f"{runs['local']}@2"
    assert pairwise["wins"] + pairwise["losses"] + pairwise["ties"] == TEST_QUESTIONS
    assert len(server.requests) <= 2 * TEST_QUESTIONS
    assert "vs " in capsys.readouterr().out
    assert not (runs["local"] / "rounds/round_0002/eval").exists()  # the baseline run untouched


def test_failed_judgments_are_recorded_and_retried_on_rerun(
    runs, tmp_path, capsys, judge_server, judge_key
):
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server()
    server.fail_next(*[500] * 100)
    args = judge_settings(
        server,
        tmp_path,
        **{"eval.judge.single": "true", "eval.judge.max_retries": "0", "eval.max_questions": "8"},
    )

    assert main(["eval", str(run_dir), "--rounds", "2", *args]) == 1

    err = capsys.readouterr().err
    assert "judge request failed: HTTP 500" in err and "rerun" in err
    single = json.loads((run_dir / "rounds/round_0002/eval/summary.json").read_text())["sets"][
        "test"
    ]["judge"]["single"]
    assert single["mean"] is None and single["n"] == 0
    assert single["excluded"] == single["errors"] == 8
    # not up to date while judgments are missing: a rerun asks again, and now gets verdicts
    server.failures.clear()
    assert main(["eval", str(run_dir), "--rounds", "2", *args]) == 0
    single = json.loads((run_dir / "rounds/round_0002/eval/summary.json").read_text())["sets"][
        "test"
    ]["judge"]["single"]
    assert single["n"] == 8 and single["excluded"] == 0


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "client.lr=1"], "--set client.lr: evaluation takes eval.* overrides only"),
        (["--rounds", "9"], "has no round 9 (rounds 1..2)"),
        (["--rounds", "x"], "--rounds: expected numbers like 3,5"),
        (
            ["--set", "eval.question_sets=[nowhere.jsonl]"],
            "eval.question_sets: 'nowhere.jsonl' is neither test, vicuna, mtbench",
        ),
        (
            ["--set", "eval.judge.single=true", "--set", "eval.judge.api_key_env=FEDSIM_UNSET_KEY"],
            "eval.judge.api_key_env: environment variable FEDSIM_UNSET_KEY is not set",
        ),
        (
            ["--set", "eval.judge.api_key_env=sk-abc123"],
            "eval.judge.api_key_env: expected the NAME of an environment variable",
        ),
        (["--set", "eval.judge.baseline=/no/such/run"], "eval.judge.baseline: /no/such/run: not"),
        (["--set", "eval.judge.baseline=round:9"], "eval.judge.baseline: "),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    runs, tmp_path, capsys, judge_key, argv, expected
):
    run_dir = copy_run(runs["fed"], tmp_path)
    before = snapshot(run_dir)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    judge = ["--set", f"eval.judge.prompts={prompts}"]
    judge += ["--set", "eval.judge.api_key_env=FEDSIM_TEST_JUDGE_KEY"]

    code = main(["eval", str(run_dir), *judge, *argv])

    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error: "), err
    assert expected in err
    assert "sk-abc123" not in err
    assert snapshot(run_dir) == before


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"fedsim: error: {tmp_path}: not a run directory (no config.yaml)\n"
    )


# --- watch ----------------------------------------------------------------------------------------


def test_watch_scores_rounds_as_the_trainer_writes_them(runs, tmp_path):
    """A stand-in trainer publishes the rounds of a finished run one by one, exactly as the real
    one does (round directory renamed into place, `latest` replaced, a metrics line appended),
    while the watcher scores them; the watcher returns once the last round is scored."""
    source = runs["fed"]
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    for name in ("config.yaml", "partition.json"):
        shutil.copy(source / name, run_dir / name)
    (run_dir / "rounds").mkdir()
    train_lines = (source / "metrics.jsonl").read_text().splitlines(keepends=True)
    published: list[float] = []

    def trainer() -> None:
        for r in (1, 2):
            time.sleep(0.5)
            name = checkpoint.round_name(r)
            shutil.copytree(source / "rounds" / name, run_dir / "rounds" / f".{name}.tmp")
            os.rename(run_dir / "rounds" / f".{name}.tmp", run_dir / "rounds" / name)
            checkpoint.write_text_atomic(run_dir / "latest", name + "\n")
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(train_lines[r - 1])
            published.append(time.monotonic())

    thread = threading.Thread(target=trainer)
    run = open_run(run_dir, ["eval.poll_seconds=0.05"])
    evaluator = Evaluator(run, log=lambda _: None)
    thread.start()
    try:
        results = watch(evaluator, timeout=120)
    finally:
        thread.join()
        evaluator.close()

    assert [(r.round_idx, r.name, r.skipped) for r in results] == [
        (1, "test", False),
        (2, "test", False),
    ]
    assert len(published) == 2
    assert [m["round"] for m in metrics_lines(run_dir)] == [1, 2]  # the trainer's, alone
    assert [(m["kind"], m["round"]) for m in eval_lines(run_dir)] == [("eval", 1), ("eval", 2)]
    for r in (1, 2):
        assert (run_dir / "rounds" / checkpoint.round_name(r) / "eval/summary.json").is_file()


def test_watch_gives_up_after_its_timeout(runs, tmp_path):
    run_dir = tmp_path / "stalled"
    run_dir.mkdir()
    for name in ("config.yaml", "partition.json"):
        shutil.copy(runs["fed"] / name, run_dir / name)
    evaluator = Evaluator(open_run(run_dir, ["eval.poll_seconds=0.05"]), log=lambda _: None)
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.3 s"):
        watch(evaluator, timeout=0.3)


# --- generate and report --------------------------------------------------------------------------


def test_generate_answers_a_prompt(runs, capsys, monkeypatch):
    import io

    assert (
        main(["generate", str(runs["fed"]), "--round", "2", "--prompt", "What is 3 plus 4?"]) == 0
    )
    from_argument = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 3 plus 4?\n"))
    assert main(["generate", str(runs["fed"]), "--round", "2"]) == 0
    assert capsys.readouterr().out == from_argument and from_argument.endswith("\n")
    assert main(["generate", str(runs["fed"]), "--round", "7", "--prompt", "x"]) == 2
    assert "has no round 7" in capsys.readouterr().err


def test_report_for_one_run_and_a_comparison(runs, tmp_path, capsys):
    fed = copy_run(runs["fed"], tmp_path)
    local = copy_run(runs["local"], tmp_path)
    for run_dir in (fed, local):
        assert main(["eval", str(run_dir), "--all"]) == 0

    assert main(["report", str(fed)]) == 0
    single = (fed / "report" / "report.md").read_text()
    assert {p.name for p in (fed / "report").iterdir()} == {
        "report.md",
        "train_loss.png",
        "eval_test.png",
        "participation.png",
        "exact_match_heatmap.png",  # exact match per category and round
    }
    for png in (fed / "report").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Training" in single and "| 2 | 3 |" in single  # round 2, 3 clients
    assert "Per category, round 2:" in single and "| parity |" in single

    out = tmp_path / "compare"
    assert main(["report", str(fed), str(local), "--out", str(out)]) == 0
    compare = (out / "report.md").read_text()
    assert "2 runs compared" in compare
    fed_eval = eval_lines(fed)[-1]
    assert f"| fed | 2 | {fed_eval['loss']:.4f} |" in compare
    assert "| local | 2 |" in compare and "clients [2] every round" in compare
    assert "exact per category:" in compare
    assert (out / "eval_test.png").is_file()


@pytest.mark.skipif(not tensorboard_available(), reason="the tensorboard extra is not installed")
def test_tensorboard_event_files(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = copy_run(runs["fed"], tmp_path)
    assert main(["eval", str(run_dir), "--all"]) == 0

    train = EventAccumulator(str(run_dir / "tensorboard" / "train"))
    train.Reload()
    losses = [(e.step, e.value) for e in train.Scalars("train/train_loss")]
    expected = [(m["round"], m["train_loss"]) for m in metrics_lines(run_dir) if "train_loss" in m]
    assert [s for s, _ in losses] == [1, 2]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)
    scored = EventAccumulator(str(run_dir / "tensorboard" / "eval"))
    scored.Reload()
    assert [e.step for e in scored.Scalars("eval/test/loss")] == [1, 2]


@pytest.mark.slow
def test_watch_beside_a_real_trainer(experiment_file, tmp_path):
    """`fedsim run` and `fedsim eval --watch` started together as two processes: the watcher
    waits for the first round, scores all three as they appear, and exits when the run is done."""
    import subprocess
    import sys

    config = experiment_file(run={"rounds": 3}, data={"test_per_category": 2})
    run_dir = tmp_path / "runs" / "t"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "fedsim.cli"]
    watcher = subprocess.Popen(
        [*cli, "eval", str(run_dir), "--watch", "--set", "eval.poll_seconds=0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    trainer = subprocess.run([*cli, "run", str(config)], env=env, capture_output=True, text=True)
    out, err = watcher.communicate(timeout=300)

    assert trainer.returncode == 0, trainer.stderr
    assert watcher.returncode == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round")] == [
        "round   1 test",
        "round   2 test",
        "round   3 test",
    ]
    assert [m["round"] for m in metrics_lines(run_dir)] == [1, 2, 3]
    assert [m["round"] for m in eval_lines(run_dir)] == [1, 2, 3]


def test_mtbench_two_turns_with_fastchat_prompts(runs, tmp_path, data_dir, judge_server, judge_key):
    """The shipped MT-bench questions and FastChat judge prompts: both turns answered, math,
    reasoning and coding judged against GPT-4's reference, the second turn with the multi-turn
    prompt."""
    if not (data_dir / "eval" / "mtbench_questions.jsonl").is_file():
        pytest.skip(f"{data_dir / 'eval'} not present")
    run_dir = copy_run(runs["fed"], tmp_path)
    server = judge_server()
    args = judge_settings(
        server,
        tmp_path,
        **{
            "eval.judge.single": "true",
            "eval.judge.prompts": str(data_dir / "eval" / "judge_prompts.jsonl"),
            "eval.questions_dir": str(data_dir / "eval"),
            "eval.question_sets": "[mtbench]",
            "eval.max_questions": "8",  # one per category
            "eval.generation.max_new_tokens": "8",
        },
    )

    assert main(["eval", str(run_dir), *args]) == 0

    eval_dir = run_dir / "rounds/round_0002/eval"
    answers = [json.loads(x) for x in (eval_dir / "answers_mtbench.jsonl").open()]
    assert len(answers) == 8 and all(len(a["answers"]) == 2 for a in answers)
    assert len({a["category"] for a in answers}) == 8
    judgments = [json.loads(x) for x in (eval_dir / "judgments_mtbench.jsonl").open()]
    prompts = {(j["category"], j["turn"]): j["prompt"] for j in judgments}
    for category in ("math", "reasoning", "coding"):
        assert prompts[(category, 1)] == "single-math-v1"
        assert prompts[(category, 2)] == "single-math-v1-multi-turn"
    assert prompts[("writing", 1)] == "single-v1"
    assert prompts[("writing", 2)] == "single-v1-multi-turn"
    math_reference = next(a for a in answers if a["category"] == "math")["references"][0]
    assert any(math_reference in r["body"]["messages"][1]["content"] for r in server.requests)
    summary = json.loads((eval_dir / "summary.json").read_text())["sets"]["mtbench"]
    assert set(summary["judge"]["single"]["by_category"]) == {a["category"] for a in answers}
    assert summary["judge"]["single"]["n"] == 16  # two turns of eight questions
