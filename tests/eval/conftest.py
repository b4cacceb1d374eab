"""A real OpenAI-compatible judge server on 127.0.0.1 for the evaluation tests.

`JudgeServer` answers POST /v1/chat/completions over real HTTP (stdlib `http.server` in a thread,
port 0), records every request (path, query string, body and headers), can be told to answer the
next requests with given status codes (429, 500, ...; with a message that may echo the request's
Authorization header, as careless servers do) or with a raw body of its choice, and replies with
a deterministic verdict computed from the prompt by a function the test chooses. The `openai`
client talks to it as it would to OpenAI.

`runs` trains, once per test session, the two small runs the job and secret tests evaluate.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_experiment

Reply = Callable[[dict[str, Any]], str]
ECHO_AUTHORIZATION = "{authorization}"
"""In a `fail_next` message: replaced by the Authorization header the request carried."""


def answer_of(prompt: str, who: str = "") -> str:
    """The answer inside a judge prompt: `[The Start of Assistant{who}'s Answer]...`."""
    match = re.search(
        rf"\[The Start of Assistant{who}'s Answer\]\n(.*?)\n\[The End of Assistant{who}'s Answer\]",
        prompt,
        re.S,
    )
    return match.group(1) if match else ""


def rating_by_length(body: dict[str, Any]) -> str:
    """A deterministic grader: the rating is 1 + (answer length mod 10), or no verdict at all
    when the answer says `no verdict please`."""
    prompt = body["messages"][-1]["content"]
    answer = answer_of(prompt)
    if "no verdict please" in answer:
        return "The answer is interesting. I cannot decide."
    return f"The answer is fine.\nRating: [[{1 + len(answer) % 10}]]"


def prefer_longer(body: dict[str, Any]) -> str:
    """A consistent pairwise judge: the longer answer wins, equal lengths tie."""
    prompt = body["messages"][-1]["content"]
    a, b = len(answer_of(prompt, " A")), len(answer_of(prompt, " B"))
    return "Explanation.\n" + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")


class JudgeServer:
    """The judge endpoint; `base_url` is what eval.judge.base_url takes."""

    def __init__(self, reply: Reply = rating_by_length, delay: float = 0.0) -> None:
        self.reply = reply
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.failures: deque[tuple[int, dict[str, str], str | bytes | None]] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path, _, query = self.path.partition("?")
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(
                        {"path": path, "query": query, "headers": headers, "body": body}
                    )
                    failure = server.failures.popleft() if server.failures else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if path != "/v1/chat/completions":
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                    elif failure is not None:
                        status, extra, message = failure
                        if isinstance(message, bytes):
                            self._send_raw(status, message, extra)
                        else:
                            text = (message or f"injected {status}").replace(
                                ECHO_AUTHORIZATION, headers.get("authorization", "")
                            )
                            self._send(status, {"error": {"message": text}}, extra)
                    else:
                        text = server.reply(body)
                        self._send(200, server.completion(body, text))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(
                self, status: int, data: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @staticmethod
    def completion(body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        completion_tokens = len(text.split())
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def fail_next(
        self, *statuses: int, retry_after: str | None = None, message: str | None = None
    ) -> None:
        """Answer the next requests with these statuses; `message` (default `injected STATUS`)
        may contain ECHO_AUTHORIZATION."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.failures.extend((s, headers, message) for s in statuses)

    def send_next(self, *bodies: bytes, status: int = 200) -> None:
        """Answer the next requests with these raw bodies (JSON content type), whatever they are."""
        self.failures.extend((status, {}, body) for body in bodies)

    def start(self) -> JudgeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def judge_server() -> Iterator[Callable[..., JudgeServer]]:
    """Start judge servers (`judge_server(reply=..., delay=...)`); all stop after the test."""
    started: list[JudgeServer] = []

    def start(**kwargs: Any) -> JudgeServer:
        server = JudgeServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


SYSTEM = "You are a strict test judge."
PROMPTS = {
    "single-v1": "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]",
    "single-math-v1": "[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
    "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]",
    "single-v1-multi-turn": "### User:\n{question_1}\n### Assistant A:\n{answer_1}\n"
    "### User:\n{question_2}\n[The Start of Assistant's Answer]\n{answer_2}\n"
    "[The End of Assistant's Answer]",
    "single-math-v1-multi-turn": "{question_1} {ref_answer_1} {question_2} {ref_answer_2}\n"
    "[The Start of Assistant's Answer]\n{answer_2}\n[The End of Assistant's Answer]",
    "pair-v2": "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]",
    "pair-math-v1": "{question} {ref_answer_1}\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]",
    "pair-v2-multi-turn": "{question_1} {answer_a_1} {answer_b_1} {question_2}\n"
    "[The Start of Assistant A's Answer]\n{answer_a_2}\n[The End of Assistant A's Answer]\n"
    "[The Start of Assistant B's Answer]\n{answer_b_2}\n[The End of Assistant B's Answer]",
    "pair-math-v1-multi-turn": "{question_1} {ref_answer_1} {question_2} {ref_answer_2}\n"
    "[The Start of Assistant A's Answer]\n{answer_a_2}\n[The End of Assistant A's Answer]\n"
    "[The Start of Assistant B's Answer]\n{answer_b_2}\n[The End of Assistant B's Answer]",
}


def write_prompts(path: Path) -> Path:
    """A judge_prompts.jsonl in FastChat's format (short texts, the same placeholders)."""
    path.write_text(
        "".join(
            json.dumps({"name": n, "system_prompt": SYSTEM, "prompt_template": t}) + "\n"
            for n, t in PROMPTS.items()
        )
    )
    return path


SECRET = "sk-test-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"
"""The API key of the tests: it must never appear in any file or output."""


@pytest.fixture
def judge_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """Put the secret in FEDSIM_TEST_JUDGE_KEY, the variable the test configs name."""
    monkeypatch.setenv("FEDSIM_TEST_JUDGE_KEY", SECRET)
    return SECRET


@pytest.fixture(scope="session")
def runs(ray_local, tmp_path_factory) -> dict[str, Path]:
    """A federated run and a local-only run (client 2 alone, `server.client_ids`), 2 rounds each;
    trained once per session. Tests evaluate copies (`copy_run`), never these."""
    from fedsim.config import config_from_dict
    from fedsim.driver import run_experiment

    tmp = tmp_path_factory.mktemp("eval-runs")
    data = {"test_per_category": 2}
    made = {}
    for name, server in (("fed", {}), ("local", {"client_ids": [2]})):
        raw = tiny_experiment(tmp, run={"name": name, "rounds": 2}, data=data, server=server)
        result = run_experiment(config_from_dict(raw), log=lambda _: None, show_progress=False)
        made[name] = result.run_dir
    return made


def copy_run(run_dir: Path, tmp_path: Path, name: str | None = None) -> Path:
    """A copy of a trained run that a test may evaluate and change."""
    import shutil

    target = tmp_path / (name or run_dir.name)
    shutil.copytree(run_dir, target)
    return target


def judge_settings(server: JudgeServer, tmp_path: Path, **extra: str) -> list[str]:
    """`--set` arguments pointing `fedsim eval` at `server`, its prompts and a private cache."""
    settings = {
        "eval.judge.base_url": server.base_url,
        "eval.judge.model": "test-judge",
        "eval.judge.api_key_env": "FEDSIM_TEST_JUDGE_KEY",
        "eval.judge.prompts": str(write_prompts(tmp_path / "judge_prompts.jsonl")),
        "eval.judge.cache_dir": str(tmp_path / "judge-cache"),
        "eval.judge.backoff_seconds": "0",
        "eval.judge.price_input_per_million": "10",
        "eval.judge.price_output_per_million": "20",
        **extra,
    }
    return [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]


def fragments(secret: str, size: int = 12) -> set[str]:
    """Every `size`-character piece of `secret`: a cut-off secret still leaks most of itself."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def leaks(secrets: list[str], roots: list[Path], texts: list[str]) -> list[str]:
    """Where any 12-character piece of any secret appears: files under `roots` (bytes read as
    latin-1, so binary files are searched too) and `texts` (captured output, log lines)."""
    pieces = {p for s in secrets for p in fragments(s)}
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and any(p in path.read_bytes().decode("latin-1") for p in pieces):
                found.append(str(path))
    found += [f"text {i}" for i, text in enumerate(texts) if any(p in text for p in pieces)]
    return found
