"""A real OpenAI-compatible judge server on 127.0.0.1 for the evaluation tests.

`JudgeServer` answers POST /v1/chat/completions over real HTTP (stdlib `http.server` in a thread,
port 0), records every request (body and headers), can be told to fail the next requests with
given status codes (429, 500, ...), and replies with a deterministic verdict computed from the
prompt by a function the test chooses. The `openai` client talks to it as it would to OpenAI.
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

Reply = Callable[[dict[str, Any]], str]


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
        self.failures: deque[tuple[int, dict[str, str]]] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    failure = server.failures.popleft() if server.failures else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                    elif failure is not None:
                        status, headers = failure
                        self._send(status, {"error": {"message": f"injected {status}"}}, headers)
                    else:
                        text = server.reply(body)
                        self._send(200, server.completion(body, text))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
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

    def fail_next(self, *statuses: int, retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.failures.extend((s, headers) for s in statuses)

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
