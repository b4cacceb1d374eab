"""The LLM judge against a real OpenAI-compatible HTTP server on 127.0.0.1, through the real
`openai` client: the requests it sends, verdict parsing, retries, the cache, concurrency, both
orders of a pair, usage and cost, replies that are no chat completion, and the key never
leaking."""

from __future__ import annotations

import json
import math
import os
import random
import socket
from pathlib import Path

import pytest

from fedsim.config import JudgeConfig
from fedsim.errors import FedsimInputError
from fedsim.eval import judge as judging
from fedsim.eval.questions import Question
from tests.eval.conftest import (
    PROMPTS,
    SECRET,
    SYSTEM,
    answer_of,
    fragments,
    prefer_longer,
    write_prompts,
)


@pytest.fixture
def prompts(tmp_path: Path) -> dict[str, judging.JudgePrompt]:
    return judging.load_judge_prompts(write_prompts(tmp_path / "judge_prompts.jsonl"))


def make_judge(
    server,
    tmp_path: Path,
    sleeps: list[float] | None = None,
    rng: random.Random | None = None,
    **settings,
) -> judging.Judge:
    cfg = JudgeConfig(
        base_url=settings.pop("base_url", server.base_url),
        model="test-judge",
        api_key_env="FEDSIM_TEST_JUDGE_KEY",
        backoff_seconds=0.01,
        **settings,
    )
    record = sleeps if sleeps is not None else []
    extra = {"rng": rng} if rng is not None else {}
    return judging.Judge(
        cfg,
        judging.JudgeCache(tmp_path / "cache"),
        judging.api_key(cfg),
        sleep=record.append,
        **extra,
    )


def q(qid: str, category: str = "writing", turns=("Write a haiku.",), references=()) -> Question:
    return Question(qid, category, tuple(turns), references=tuple(references))


# --- verdict parsing (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Good.\nRating: [[7]]", 7.0),
        ("Rating: [[8.5]]", 8.5),
        ("Rating: [6]", 6.0),  # FastChat's fallback form
        ("Rating: [[10]] and later [[3]]", 10.0),  # the first verdict counts
        ("Rating: [[11]]", None),  # out of the 1-10 scale
        ("Rating: [[0]]", None),
        ("I would give it a seven.", None),
        ("", None),
    ],
)
def test_parse_rating(text, expected):
    assert judging.parse_rating(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A is better. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Tie: [[C]]", "C"),
        ("[[A]] ... on reflection [[B]]", None),  # two different verdicts: unparseable
        ("[[A]] and again [[A]]", "A"),
        ("Assistant A", None),
    ],
)
def test_parse_pair(text, expected):
    assert judging.parse_pair(text) == expected


# --- single grading over HTTP -----------------------------------------------------------------


def test_single_grading_sends_the_prompt_and_parses_the_rating(
    judge_server, judge_key, tmp_path, prompts
):
    server = judge_server()
    judge = make_judge(server, tmp_path, max_tokens=321)
    questions = [q("1"), q("2", turns=("Name a colour.",)), q("3")]
    answers = {"1": ("four",), "2": ("seventeen chars!!",), "3": ("no verdict please",)}

    rows, replies = judging.grade_single(judge, prompts, questions, answers)

    assert [r["score"] for r in rows] == [1 + 4 % 10, 1 + 17 % 10, None]
    assert [r["status"] for r in rows] == ["ok", "ok", "unparseable"]
    summary = judging.summarize_single(rows)
    assert summary["mean"] == pytest.approx((5 + 8) / 2)  # the unparseable one is not a score
    assert (summary["n"], summary["excluded"], summary["unparseable"]) == (2, 1, 1)
    assert len(server.requests) == 3
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == f"Bearer {SECRET}"
    body = first["body"]
    assert body["model"] == "test-judge"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 321
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}
    sent = {r["body"]["messages"][1]["content"] for r in server.requests}
    assert (
        PROMPTS["single-v1"].format(question="Name a colour.", answer="seventeen chars!!") in sent
    )
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in replies)


def test_math_reasoning_coding_use_the_reference_answer(judge_server, judge_key, tmp_path, prompts):
    server = judge_server()
    judge = make_judge(server, tmp_path)
    questions = [
        q("m", "math", ("What is 2+2?",), references=("4",)),
        q("w", "writing", ("Write a poem.",), references=("A poem.",)),
    ]
    rows, _ = judging.grade_single(judge, prompts, questions, {"m": ("5",), "w": ("Roses",)})
    assert [r["prompt"] for r in rows] == ["single-math-v1", "single-v1"]
    sent = [r["body"]["messages"][1]["content"] for r in server.requests]
    math = next(s for s in sent if "2+2" in s)
    assert "[The Start of Reference Answer]\n4\n" in math
    assert "Reference" not in next(s for s in sent if "poem" in s)


def test_second_turn_uses_the_multi_turn_prompt(judge_server, judge_key, tmp_path, prompts):
    server = judge_server()
    judge = make_judge(server, tmp_path)
    two = q("t", turns=("First question?", "Second question?"))
    rows, _ = judging.grade_single(judge, prompts, [two], {"t": ("one", "two!")})
    assert [(r["turn"], r["prompt"]) for r in rows] == [
        (1, "single-v1"),
        (2, "single-v1-multi-turn"),
    ]
    second = next(
        r["body"]["messages"][1]["content"]
        for r in server.requests
        if "Second question?" in r["body"]["messages"][1]["content"]
    )
    assert "First question?" in second and "one" in second and answer_of(second) == "two!"


# --- retries, failures, timeouts ----------------------------------------------------------------


def test_retries_429_and_500_with_exponential_backoff(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(429, 500, 502)
    sleeps: list[float] = []
    judge = make_judge(server, tmp_path, sleeps=sleeps, max_retries=3)

    reply = judge.ask([{"role": "user", "content": "[[rate]] me"}])

    assert reply.error is None and reply.text is not None
    assert reply.attempts == 4 and len(server.requests) == 4
    # equal jitter: each wait is between half and all of the doubled delay
    for waited, ceiling in zip(sleeps, [0.01, 0.02, 0.04], strict=True):
        assert ceiling / 2 <= waited <= ceiling


def test_backoff_is_jittered(judge_server, judge_key, tmp_path):
    """Jobs rate-limited together must not all retry at the same instants: two judges with other
    dice wait differently, and no wait is the bare doubled delay."""
    waits = []
    for seed in (1, 2):
        server = judge_server()
        server.fail_next(*[503] * 5)
        sleeps: list[float] = []
        judge = make_judge(server, tmp_path / str(seed), sleeps, random.Random(seed), max_retries=5)
        assert judge.ask([{"role": "user", "content": "x"}]).error is None
        ceilings = [0.01 * 2**i for i in range(5)]
        assert all(c / 2 <= w <= c for w, c in zip(sleeps, ceilings, strict=True))
        assert all(w != c for w, c in zip(sleeps, ceilings, strict=True))
        waits.append(sleeps)
    assert waits[0] != waits[1]


def test_backoff_is_capped_however_many_retries(tmp_path):
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", api_key_env=None, backoff_seconds=2.0)
    judge = judging.Judge(cfg, judging.JudgeCache(tmp_path), judging.NO_KEY)
    delays = [judge._retry_delay(RuntimeError(), attempt) for attempt in (1, 7, 2000)]
    assert 1.0 <= delays[0] <= 2.0
    assert all(0 <= d <= judging.MAX_BACKOFF_SECONDS for d in delays)  # no overflow at 2**1999


def test_retry_after_header_sets_the_delay(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(429, retry_after="0.25")
    sleeps: list[float] = []
    judge = make_judge(server, tmp_path, sleeps=sleeps)
    assert judge.ask([{"role": "user", "content": "hello"}]).error is None
    assert sleeps == [0.25]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("nan", "backoff"),  # time.sleep(nan) raises: the job would crash
        ("NaN", "backoff"),
        ("inf", "backoff"),  # not a number of seconds anyone can wait
        ("-inf", "backoff"),
        ("-5", 0.0),
        ("1e308", judging.MAX_BACKOFF_SECONDS),  # huge: capped, not waited
        ("Wed, 21 Oct 2015 07:28:00 GMT", "backoff"),  # an HTTP date: our own backoff
        ("soon", "backoff"),
    ],
)
def test_unusable_retry_after_is_not_obeyed(judge_server, judge_key, tmp_path, header, expected):
    server = judge_server()
    server.fail_next(429, retry_after=header)
    sleeps: list[float] = []
    judge = make_judge(server, tmp_path, sleeps=sleeps)

    assert judge.ask([{"role": "user", "content": "hello"}]).error is None

    (waited,) = sleeps
    assert math.isfinite(waited) and 0 <= waited <= judging.MAX_BACKOFF_SECONDS
    if expected == "backoff":
        assert 0.005 <= waited <= 0.01  # the first backoff step, jittered
    else:
        assert waited == expected


def test_retry_after_nan_does_not_crash_the_real_sleep(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(503, retry_after="nan")
    cfg = JudgeConfig(
        base_url=server.base_url, api_key_env="FEDSIM_TEST_JUDGE_KEY", backoff_seconds=0.01
    )
    judge = judging.Judge(cfg, judging.JudgeCache(tmp_path), judging.api_key(cfg))  # time.sleep
    assert judge.ask([{"role": "user", "content": "hello"}]).error is None
    assert len(server.requests) == 2


def test_gives_up_after_max_retries_and_caches_no_failure(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(503, 503, 503)
    judge = make_judge(server, tmp_path, max_retries=2)
    messages = [{"role": "user", "content": "hello"}]

    failed = judge.ask(messages)

    assert failed.text is None and "HTTP 503" in failed.error and "3 attempts" in failed.error
    assert len(server.requests) == 3
    assert judge.ask(messages).error is None  # not cached: asked again, and now it answers
    assert len(server.requests) == 4


def test_client_error_is_not_retried(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(400)
    reply = make_judge(server, tmp_path).ask([{"role": "user", "content": "x"}])
    assert "HTTP 400" in reply.error and len(server.requests) == 1


def test_refused_key_stops_all_further_requests(judge_server, judge_key, tmp_path):
    server = judge_server()
    server.fail_next(401)
    judge = make_judge(server, tmp_path, concurrency=1)
    replies = judge.ask_many([[{"role": "user", "content": f"q{i}"}] for i in range(5)])
    assert len(server.requests) == 1
    assert all(r.error and "HTTP 401" in r.error for r in replies)
    assert all(SECRET not in r.error for r in replies)


def test_timeout_is_retried_then_reported(judge_server, judge_key, tmp_path):
    server = judge_server(delay=0.6)
    judge = make_judge(server, tmp_path, timeout_seconds=0.1, max_retries=1)
    reply = judge.ask([{"role": "user", "content": "slow"}])
    assert reply.text is None and "timed out" in reply.error and reply.attempts == 2


def test_missing_key_variable_is_an_input_error(monkeypatch):
    monkeypatch.delenv("FEDSIM_TEST_JUDGE_KEY", raising=False)
    cfg = JudgeConfig(api_key_env="FEDSIM_TEST_JUDGE_KEY")
    with pytest.raises(FedsimInputError, match="FEDSIM_TEST_JUDGE_KEY is not set"):
        judging.api_key(cfg)
    assert judging.api_key(JudgeConfig(api_key_env=None)) == judging.NO_KEY


# --- cache, concurrency, usage ------------------------------------------------------------------


def test_cache_makes_a_rerun_free(judge_server, judge_key, tmp_path, prompts):
    server = judge_server()
    questions = [q(str(i), turns=(f"Question {i}?",)) for i in range(4)]
    answers = {str(i): ("x" * i,) for i in range(4)}
    prices = (1.0, 2.0)

    rows, replies = judging.grade_single(make_judge(server, tmp_path), prompts, questions, answers)
    first = judging.account(replies, prices)
    again_rows, again = judging.grade_single(
        make_judge(server, tmp_path), prompts, questions, answers
    )
    second = judging.account(again, prices)

    assert len(server.requests) == 4  # nothing sent the second time
    assert [r["score"] for r in again_rows] == [r["score"] for r in rows]
    assert (first.requests, first.cached) == (4, 0) and first.cost_usd > 0
    assert (second.requests, second.cached, second.cost_usd) == (0, 4, 0.0)
    expected = (first.prompt_tokens * 1.0 + first.completion_tokens * 2.0) / 1e6
    assert first.cost_usd == pytest.approx(expected)
    # another judge model is another cache entry
    other = make_judge(server, tmp_path)
    other.cfg.model = "another-judge"
    judging.grade_single(other, prompts, questions[:1], answers)
    assert len(server.requests) == 5


def test_concurrency_is_bounded(judge_server, judge_key, tmp_path):
    server = judge_server(delay=0.05)
    judge = make_judge(server, tmp_path, concurrency=3)
    replies = judge.ask_many([[{"role": "user", "content": f"q{i}"}] for i in range(12)])
    assert all(r.error is None for r in replies)
    assert 2 <= server.max_in_flight <= 3


def test_identical_prompts_are_sent_once(judge_server, judge_key, tmp_path):
    server = judge_server()
    same = [{"role": "user", "content": "same"}]
    replies = make_judge(server, tmp_path).ask_many([same, same, same])
    assert len(server.requests) == 1 and len({r.text for r in replies}) == 1


def test_known_prices():
    assert judging.prices_for(JudgeConfig(model="gpt-4")) == (30.0, 60.0)
    assert judging.prices_for(JudgeConfig(model="gpt-4o-mini-2024-07-18")) == (0.15, 0.6)
    assert judging.prices_for(JudgeConfig(model="gpt-4o")) == (2.5, 10.0)
    assert judging.prices_for(JudgeConfig(model="my-local-llama")) is None
    priced = JudgeConfig(model="my-local-llama", price_input_per_million=0.5)
    assert judging.prices_for(priced) == (0.5, 0.0)


# --- pairwise ---------------------------------------------------------------------------------


def test_pair_is_judged_in_both_orders(judge_server, judge_key, tmp_path, prompts):
    server = judge_server(reply=prefer_longer)
    judge = make_judge(server, tmp_path)
    questions = [q("a"), q("b", turns=("Other?",)), q("c", turns=("Third?",))]
    mine = {"a": ("a long answer",), "b": ("s",), "c": ("same",)}
    theirs = {"a": ("short",), "b": ("much longer",), "c": ("SAME",)}

    rows, _ = judging.compare_pairwise(judge, prompts, questions, mine, theirs)

    assert [r["outcome"] for r in rows] == ["win", "loss", "tie"]
    assert all(r["consistent"] for r in rows)
    assert len(server.requests) == 6
    shown = [
        (answer_of(r["body"]["messages"][1]["content"], " A"),
         answer_of(r["body"]["messages"][1]["content"], " B"))
        for r in server.requests
    ]  # fmt: skip
    assert ("a long answer", "short") in shown and ("short", "a long answer") in shown
    summary = judging.summarize_pairwise(rows)
    assert (summary["wins"], summary["losses"], summary["ties"]) == (1, 1, 1)
    assert summary["win_rate"] == pytest.approx(0.5)


def test_position_bias_cancels_out(judge_server, judge_key, tmp_path, prompts):
    """A judge that always prefers the first answer shown: each order says the opposite, so
    every pair is a tie, never a win for whichever side happened to be shown first."""
    server = judge_server(reply=lambda body: "The first one. [[A]]")
    judge = make_judge(server, tmp_path)
    questions = [q(str(i), turns=(f"Q{i}?",)) for i in range(3)]
    answers = {str(i): ("mine",) for i in range(3)}
    baseline = {str(i): ("theirs",) for i in range(3)}

    rows, _ = judging.compare_pairwise(judge, prompts, questions, answers, baseline)

    assert [r["outcome"] for r in rows] == ["tie"] * 3
    assert not any(r["consistent"] for r in rows)
    summary = judging.summarize_pairwise(rows)
    assert summary["win_rate"] == 0.5 and summary["inconsistent"] == 3


def test_unparseable_pair_is_excluded_and_counted(judge_server, judge_key, tmp_path, prompts):
    def reply(body):
        prompt = body["messages"][1]["content"]
        return "Hard to say." if "undecidable" in prompt else prefer_longer(body)

    server = judge_server(reply=reply)
    judge = make_judge(server, tmp_path)
    questions = [q("x", turns=("undecidable?",)), q("y", turns=("fine?",))]
    rows, _ = judging.compare_pairwise(
        judge, prompts, questions, {"x": ("aa",), "y": ("longer",)}, {"x": ("b",), "y": ("b",)}
    )
    assert [r["outcome"] for r in rows] == [None, "win"]
    assert rows[0]["status"] == "unparseable"
    summary = judging.summarize_pairwise(rows)
    assert (summary["n"], summary["excluded"], summary["unparseable"]) == (1, 1, 1)
    assert summary["win_rate"] == 1.0


def test_real_fastchat_prompts_load(data_dir):
    path = data_dir / "eval" / "judge_prompts.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    prompts = judging.load_judge_prompts(path)
    single = prompts["single-v1"]
    assert "[[rating]]" in single.prompt_template and "{answer}" in single.prompt_template
    assert "[[A]]" in prompts["pair-v2"].system_prompt


def test_prompt_file_missing_a_prompt_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"name": "single-v1", "system_prompt": "", "prompt_template": ""}))
    with pytest.raises(FedsimInputError, match="lacks single-math-v1"):
        judging.load_judge_prompts(path)


# --- endpoints: the cache key, and URLs that carry credentials ------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://user:pa55word@127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("HTTPS://Judge.Example.COM/v1?api-key=s3cret#frag", "https://judge.example.com/v1"),
        ("https://tok:en@h/v1?a=1&key=s3cret", "https://h/v1"),
        ("https://user:p@ss@host:notaport/v1", "https://host:notaport/v1"),  # urllib chokes
        ("user:pw@host/v1?k=v", "host/v1"),  # no scheme
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ],
)
def test_redact_url(url, shown):
    assert judging.redact_url(url) == shown


def test_cache_is_per_endpoint(judge_server, judge_key, tmp_path):
    """Two servers on 127.0.0.1 serving the same model name are two judges: the second's
    judgment is asked of it, not taken from the first's cache entry."""
    first = judge_server(reply=lambda body: "First says [[3]]")
    second = judge_server(reply=lambda body: "Second says [[9]]")
    messages = [{"role": "user", "content": "the same prompt"}]

    assert make_judge(first, tmp_path).ask(messages).text == "First says [[3]]"
    reply = make_judge(second, tmp_path).ask(messages)

    assert reply.text == "Second says [[9]]" and not reply.cached
    assert len(second.requests) == 1
    # the same endpoint written differently (trailing slash, other credentials) shares entries
    port = first.httpd.server_address[1]
    again = make_judge(first, tmp_path, base_url=f"http://u:other@127.0.0.1:{port}/v1/")
    assert again.ask(messages).cached and len(first.requests) == 1


def test_url_query_is_sent_as_a_query_and_its_secrets_are_scrubbed(
    judge_server, judge_key, tmp_path
):
    """A base_url like `.../v1?key=K` reaches /v1/chat/completions with the query (the client
    would otherwise append its path after the query), and an error that echoes the request line
    shows neither the key nor the URL's password."""
    server = judge_server()
    port = server.httpd.server_address[1]
    url = f"http://judge:pass-7c1d9e@127.0.0.1:{port}/v1?key=query-secret-5a8b"
    judge = make_judge(server, tmp_path, base_url=url)
    assert judge.endpoint == f"http://127.0.0.1:{port}/v1"

    assert judge.ask([{"role": "user", "content": "hi"}]).error is None
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["query"] == "key=query-secret-5a8b"

    server.fail_next(400, message="bad request to /v1/chat/completions?key=query-secret-5a8b")
    reply = judge.ask([{"role": "user", "content": "other"}])
    assert "HTTP 400" in reply.error
    assert "query-secret-5a8b" not in reply.error and "pass-7c1d9e" not in reply.error


def test_unreachable_endpoint_is_named_without_its_credentials(judge_key, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = JudgeConfig(
        base_url=f"http://judge:pass-7c1d9e@127.0.0.1:{port}/v1?key=query-secret-5a8b",
        api_key_env="FEDSIM_TEST_JUDGE_KEY",
        max_retries=0,
    )
    judge = judging.Judge(cfg, judging.JudgeCache(tmp_path), judging.api_key(cfg))
    reply = judge.ask([{"role": "user", "content": "hi"}])
    assert reply.error.startswith(f"cannot connect to http://127.0.0.1:{port}/v1")
    assert "pass-7c1d9e" not in reply.error and "query-secret" not in reply.error


def test_echoed_key_is_scrubbed_even_past_the_length_limit(judge_server, judge_key, tmp_path):
    """An error message is cut to a bounded length; a key echoed across the cut must not leave
    its first characters behind."""
    server = judge_server()
    judge = make_judge(server, tmp_path)
    for pad in range(100, 200, 6):
        server.fail_next(400, message="x" * pad + " key: {authorization}")
        reply = judge.ask([{"role": "user", "content": f"pad {pad}"}])
        assert server.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
        assert "HTTP 400" in reply.error
        assert not any(piece in reply.error for piece in fragments(SECRET)), reply.error


# --- replies that are no chat completion, and a damaged cache -------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"<html>Service temporarily unavailable</html>",  # a proxy's page, with status 200
        b'{"choices": []}',
        b'{"choices": [{"message": null}]}',
        b'{"choices": [{"message": {"content": 5}}]}',
        b"[]",
        b"null",
        b'{"choices": [{"message": {"content": "[[7]]"}}], "usage": {"prompt_tokens": "many"}}',
    ],
)
def test_reply_that_is_no_chat_completion_is_an_error_not_a_crash(
    judge_server, judge_key, tmp_path, body
):
    server = judge_server()
    server.send_next(body)
    judge = make_judge(server, tmp_path)
    messages = [{"role": "user", "content": "hi"}]

    (reply,) = judge.ask_many([messages])

    if body.startswith(b'{"choices": [{"message": {"content": "[[7]]"}}]'):
        assert reply.text == "[[7]]" and reply.prompt_tokens == 0  # bad usage: counted as 0
        return
    assert reply.text is None and "not a chat completion" in reply.error
    assert judging.account([reply], (1.0, 1.0)).errors == 1
    # nothing cached: the next ask gets the server's real judgment
    assert judge.ask(messages).text.startswith("The answer is fine")


@pytest.mark.parametrize("content", ["[]", '{"reply": 7}', '"just a string"', "{not json"])
def test_damaged_cache_entry_is_a_miss(judge_server, judge_key, tmp_path, content):
    server = judge_server()
    messages = [{"role": "user", "content": "hi"}]
    make_judge(server, tmp_path).ask(messages)
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_text(content)  # a disk error, another tool, an older format

    reply = make_judge(server, tmp_path).ask(messages)

    assert reply.error is None and not reply.cached and len(server.requests) == 2
    assert reply.text.startswith("The answer is fine")
    assert json.loads(entry.read_text())["reply"] == reply.text  # repaired


def test_cache_files_follow_the_umask(judge_server, judge_key, tmp_path):
    """A team's shared cache: entries are 0666 less the umask, as any tool makes them, not
    owner-only."""
    server = judge_server()
    old = os.umask(0o022)
    try:
        make_judge(server, tmp_path).ask([{"role": "user", "content": "hi"}])
    finally:
        os.umask(old)
    (entry,) = (tmp_path / "cache").rglob("*.json")
    assert entry.stat().st_mode & 0o777 == 0o644
    assert json.loads(entry.read_text())["endpoint"] == server.base_url


@pytest.mark.parametrize("bad", ["\r", "\n", " ", "\u2019"])
def test_key_that_no_header_can_carry_is_refused_without_echo(monkeypatch, bad):
    key = "sk-canary-4e1f0a9b7c3d"
    monkeypatch.setenv("FEDSIM_TEST_JUDGE_KEY", key + bad)
    with pytest.raises(FedsimInputError, match="FEDSIM_TEST_JUDGE_KEY holds whitespace") as err:
        judging.api_key(JudgeConfig(api_key_env="FEDSIM_TEST_JUDGE_KEY"))
    assert key not in str(err.value)
