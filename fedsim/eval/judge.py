"""LLM-as-judge through the `openai` client: OpenAI or any OpenAI-compatible server.

MT-bench's judging (Zheng et al., 2023; FastChat's judge prompts): single-answer grading on a
1-10 scale (`single-v1`, verdict `[[rating]]`) and pairwise comparison with a baseline (`pair-v2`,
verdict `[[A]]`, `[[B]]` or `[[C]]` for a tie), each pair judged in both orders so that position
bias cancels; the `math` variants with a reference answer for math, reasoning and coding, and the
`multi-turn` variants for a second turn.

The client side is what makes a judge usable at scale: bounded concurrency, per-request timeouts,
retries with jittered exponential backoff on 429 and 5xx (honouring a sane Retry-After), a cache
of judgments keyed by endpoint, judge model and prompt so that a rerun pays nothing twice, token
usage and an estimated cost. Temperature is 0. A verdict that cannot be parsed, or a reply that is
not a chat completion at all, is recorded as such and never counted as a score. The API key is
read from the environment variable the config names and is never written anywhere; the endpoint
is recorded and shown only as `redact_url` leaves it (no credentials, no query string), and
error messages and replies are scrubbed of the key and of the URL's secrets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import openai

from fedsim import rundir
from fedsim.config import JudgeConfig
from fedsim.errors import FedsimInputError
from fedsim.eval.metrics import mean_or_none, summarize
from fedsim.eval.questions import Question

NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
"""Categories judged against a reference answer (as MT-bench does)."""
MAX_BACKOFF_SECONDS = 60.0
"""Longest wait before a retry, whatever the backoff or the server's Retry-After says."""
MIN_SECRET_CHARS = 4
"""URL parts shorter than this are not scrubbed from messages: they would mangle every message
and no credential is that short."""
JUDGE_TEMPERATURE = 0.0
NO_KEY = "EMPTY"  # the placeholder sent when eval.judge.api_key_env is null

# List prices in USD per million (prompt, completion) tokens when this was written; the longest
# matching prefix of the model name wins. Set eval.judge.price_* for anything else.
KNOWN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-3.5-turbo": (0.5, 1.5),
}

# ------------------------------------------------------------------------------------------
# Prompts and verdicts
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    """One judge prompt template (a line of FastChat's judge_prompts.jsonl)."""

    name: str
    system_prompt: str
    prompt_template: str


REQUIRED_PROMPTS = (
    "single-v1",
    "single-math-v1",
    "single-v1-multi-turn",
    "single-math-v1-multi-turn",
    "pair-v2",
    "pair-math-v1",
    "pair-v2-multi-turn",
    "pair-math-v1-multi-turn",
)


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """The judge prompts by name; a missing file or prompt is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FedsimInputError(
            f"eval.judge.prompts: {path} not found (FastChat's judge_prompts.jsonl; set "
            "FEDSIM_DATA_DIR or eval.judge.prompts)"
        )
    prompts: dict[str, JudgePrompt] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt = JudgePrompt(obj["name"], obj["system_prompt"], obj["prompt_template"])
        except (ValueError, KeyError, TypeError):
            raise FedsimInputError(
                f"{path}:{number}: expected name, system_prompt and prompt_template"
            ) from None
        prompts[prompt.name] = prompt
    missing = [n for n in REQUIRED_PROMPTS if n not in prompts]
    if missing:
        raise FedsimInputError(f"eval.judge.prompts: {path} lacks {', '.join(missing)}")
    return prompts


_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")
_PAIR = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(text: str) -> float | None:
    """The `[[rating]]` of a single-answer judgment (FastChat's `[rating]` fallback too), or
    None when there is none, or it is outside 1-10."""
    match = _RATING.search(text) or _RATING_LOOSE.search(text)
    if not match:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


def parse_pair(text: str) -> str | None:
    """`A`, `B` or `C` (tie) from a pairwise judgment; None when there is no verdict or the
    judgment names more than one."""
    verdicts = set(_PAIR.findall(text))
    return verdicts.pop() if len(verdicts) == 1 else None


def _question_text(q: Question, turn: int) -> str:
    if turn == 0 and q.context:
        return f"{q.turns[0]}\n\n{q.context}"
    return q.turns[turn]


def uses_reference(q: Question, turn: int) -> bool:
    """MT-bench's rule: math, reasoning and coding are judged against a reference answer."""
    return q.category in NEED_REF_CATEGORIES and all(
        q.reference(t) is not None for t in range(turn + 1)
    )


def judged_turns(q: Question) -> range:
    """Turns a judge sees: the first, and the second with the multi-turn prompts (no prompts
    exist for later turns)."""
    return range(min(2, len(q.turns)))


def _fields(q: Question, turn: int) -> dict[str, str]:
    fields = {"question": _question_text(q, turn)}
    for t in range(min(2, len(q.turns))):
        fields[f"question_{t + 1}"] = _question_text(q, t)
        ref = q.reference(t)
        if ref is not None:
            fields[f"ref_answer_{t + 1}"] = ref
    fields.setdefault("ref_answer_1", q.reference(0) or "")
    return fields


def single_prompt_name(q: Question, turn: int) -> str:
    name = "single-math-v1" if uses_reference(q, turn) else "single-v1"
    return name + ("-multi-turn" if turn == 1 else "")


def pair_prompt_name(q: Question, turn: int) -> str:
    name = "pair-math-v1" if uses_reference(q, turn) else "pair-v2"
    return name + ("-multi-turn" if turn == 1 else "")


def single_messages(
    prompts: dict[str, JudgePrompt], q: Question, turn: int, answers: Sequence[str]
) -> tuple[str, list[dict[str, str]]]:
    """(prompt name, chat messages) grading `answers[turn]`."""
    name = single_prompt_name(q, turn)
    fields = _fields(q, turn) | {"answer": answers[turn]}
    for t, a in enumerate(answers[:2]):
        fields[f"answer_{t + 1}"] = a
    return name, _messages(prompts[name], fields)


def pair_messages(
    prompts: dict[str, JudgePrompt],
    q: Question,
    turn: int,
    answers_a: Sequence[str],
    answers_b: Sequence[str],
) -> tuple[str, list[dict[str, str]]]:
    """(prompt name, chat messages) comparing assistant A's and B's answers at `turn`."""
    name = pair_prompt_name(q, turn)
    fields = _fields(q, turn) | {"answer_a": answers_a[turn], "answer_b": answers_b[turn]}
    for t in range(min(2, len(answers_a))):
        fields[f"answer_a_{t + 1}"] = answers_a[t]
        fields[f"answer_b_{t + 1}"] = answers_b[t]
    return name, _messages(prompts[name], fields)


def _messages(prompt: JudgePrompt, fields: dict[str, str]) -> list[dict[str, str]]:
    # str.format substitutes the template's own placeholders only; braces inside the answers
    # are values, never re-read as placeholders.
    return [
        {"role": "system", "content": prompt.system_prompt},
        {"role": "user", "content": prompt.prompt_template.format(**fields)},
    ]


# ------------------------------------------------------------------------------------------
# Endpoint URLs: what may be shown, and what must be hidden
# ------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The endpoint as fedsim records, prints and keys it: `user:password@`, the query string and
    the fragment removed (they may carry credentials), scheme and host lower-cased, no trailing
    slash. `http://u:pw@Host:8000/v1/?key=k` -> `http://host:8000/v1`.

    Plain string surgery rather than urllib, so that even a URL urllib cannot parse (a bad port,
    no scheme) loses its credentials.
    """
    base = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme, sep, rest = base.partition("://")
    if not sep:
        scheme, rest = "", base
    authority, _, path = rest.partition("/")
    authority = authority.rpartition("@")[2].lower()
    path = path.rstrip("/")
    return f"{scheme.lower()}{sep}{authority}" + (f"/{path}" if path else "")


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that `redact_url` hides and that could be credentials (user, password,
    query values), as written and as encoded in a request line, to scrub from any text."""
    try:
        parts = urlsplit(url)
        values = [parts.username or "", parts.password or ""]
        values += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
        raw = parts.netloc.rpartition("@")[0]
        values += [raw, *raw.split(":", 1), parts.query, parts.fragment]
    except ValueError:  # unparseable: hide everything after the host's end
        values = [url]
    forms = {f(v) for v in values for f in (str, unquote, quote, quote_plus) if v}
    return sorted((v for v in forms if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def _client_url(url: str | None) -> tuple[str | None, dict[str, str]]:
    """(base URL without query, query parameters): the `openai` client appends its paths to the
    base URL's raw path, so a query left in it would end up in the middle of the path; given as
    `default_query` it is sent with every request as the user meant."""
    if url is None:
        return None, {}
    base = url.split("#", 1)[0]
    base, _, query = base.partition("?")
    return base, dict(parse_qsl(query, keep_blank_values=True))


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def cache_key(endpoint: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """sha256 of everything that determines a judgment: the endpoint (as `redact_url` gives it:
    without credentials, so a rotated key keeps its judgments), the judge model, the prompt,
    temperature and reply length. Two servers that serve the same model name are two judges: a
    local fine-tune called `gpt-4` never answers for OpenAI's.

    Keys made before the endpoint was part of them (fedsim <= this change) are never looked up
    again: those judgments are simply asked anew, once.
    """
    payload = {
        "endpoint": redact_url(endpoint),
        "model": model,
        "messages": messages,
        "temperature": JUDGE_TEMPERATURE,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class JudgeCache:
    """One small JSON file per judgment, written atomically (`rundir.write_json_atomic`: the
    umask's mode, so a cache shared by a team is readable by it), so concurrent evaluation jobs
    can share the cache without locks."""

    # rundir's temporary name is per process: threads of one process take turns writing
    _write_lock = threading.Lock()

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached record, or None when there is none or it is not one this cache wrote (a
        damaged or foreign file is a miss, asked again and overwritten, never a crash)."""
        try:
            record = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("reply"), str):
            return None
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        with self._write_lock:
            rundir.make_dir(path.parent)
            rundir.write_json_atomic(path, record)


def default_cache_dir() -> Path:
    from fedsim.model_files import default_cache_dir as fedsim_cache

    return fedsim_cache() / "judge"


# ------------------------------------------------------------------------------------------
# Client
# ------------------------------------------------------------------------------------------


@dataclass
class JudgeReply:
    """The judge's reply to one prompt, or why there is none."""

    text: str | None
    error: str | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0


@dataclass
class Usage:
    """Requests and tokens of one evaluation; `paid` counts exclude cache hits."""

    requests: int = 0
    cached: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    errors_seen: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "cached": self.cached,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
        }


def prices_for(cfg: JudgeConfig) -> tuple[float, float] | None:
    """(USD per million prompt tokens, per million completion tokens), or None if unknown."""
    if cfg.price_input_per_million is not None or cfg.price_output_per_million is not None:
        return (cfg.price_input_per_million or 0.0, cfg.price_output_per_million or 0.0)
    matches = [p for p in KNOWN_PRICES if cfg.model == p or cfg.model.startswith(p + "-")]
    return KNOWN_PRICES[max(matches, key=len)] if matches else None


def api_key(cfg: JudgeConfig) -> str:
    """The key from the environment variable named by `eval.judge.api_key_env`.

    A key with whitespace, control or non-ASCII characters (a key file saved with CRLF line
    ends, a pasted curly quote) can never be sent in an HTTP header: it is refused here, without
    echoing it, instead of failing every request as a connection error after minutes of retries.
    """
    if cfg.api_key_env is None:
        return NO_KEY
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise FedsimInputError(
            f"eval.judge.api_key_env: environment variable {cfg.api_key_env} is not set (it "
            "should hold the judge's API key; null sends none, for local servers)"
        )
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise FedsimInputError(
            f"eval.judge.api_key_env: environment variable {cfg.api_key_env} holds whitespace, "
            "control or non-ASCII characters (a line end from a key file?); an API key has none"
        )
    return key


_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
_NOT_A_COMPLETION = "HTTP 200 but the reply is not a chat completion (no choices[0].message)"
_MAX_DOUBLINGS = 30  # 2**30 times any sane backoff is past MAX_BACKOFF_SECONDS; no overflow


def _count(value: Any) -> int:
    """A token count from the server: a non-negative integer, else 0 (never a crash)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _reply_text(response: Any) -> str | None:
    """The first choice's message text ("" for a message without text), or None when the
    response is not a chat completion (an empty `choices`, a JSON list, a proxy's null)."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        return None
    message = getattr(choices[0], "message", None)
    if message is None:
        return None
    content = getattr(message, "content", None)
    if content is None:
        return ""
    return content if isinstance(content, str) else None


def _retry_after(err: Exception) -> float | None:
    """The server's Retry-After in seconds when it is a finite number (not nan or inf, which
    would crash `time.sleep` or wait forever), else None (absent, an HTTP date, garbage)."""
    response = getattr(err, "response", None)
    if response is None:
        return None
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


class Judge:
    """Sends judge prompts through the `openai` client, with cache, retries and concurrency.

    `sleep` and `rng` are the clock and the dice of the retry backoff (tests pass their own).
    """

    def __init__(
        self,
        cfg: JudgeConfig,
        cache: JudgeCache,
        key: str,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self._key = key
        self._sleep = sleep
        self._rng = rng or random.Random()
        base_url, query = _client_url(cfg.base_url)
        self.client = openai.OpenAI(
            api_key=key,
            base_url=base_url,
            default_query=query or None,
            timeout=cfg.timeout_seconds,
            max_retries=0,  # retries are ours: counted, logged, and with our backoff
        )
        full_url = str(self.client.base_url)  # cfg.base_url, or OPENAI_BASE_URL, or OpenAI's
        if cfg.base_url and "?" in cfg.base_url:
            full_url += "?" + cfg.base_url.split("?", 1)[1]
        self.endpoint = redact_url(full_url)
        """Where the judgments come from, safe to record and print."""
        secrets = url_secrets(full_url)
        if key and key != NO_KEY:
            secrets.insert(0, key)
        self._secrets = secrets
        self._fatal: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the client's connections (a server would otherwise keep them open)."""
        self.client.close()

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _describe(self, err: Exception) -> str:
        if isinstance(err, openai.AuthenticationError):
            return f"HTTP 401: the judge refused the key in ${self.cfg.api_key_env}"
        if isinstance(err, openai.APITimeoutError):
            return f"timed out after {self.cfg.timeout_seconds:g} s"
        if isinstance(err, openai.APIConnectionError):
            return f"cannot connect to {self.endpoint}"
        # scrub before cutting: a cut through the key would leave a piece no scrub can match
        if isinstance(err, openai.APIStatusError):
            return self._scrub(f"HTTP {err.status_code}: {err.message}")[:220]
        return self._scrub(f"{type(err).__name__}: {err}")[:220]

    def _retry_delay(self, err: Exception, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (from 1), within [0, MAX_BACKOFF_SECONDS]:
        the server's Retry-After when it is a finite number, else exponential backoff with equal
        jitter (half the doubled delay, plus up to as much again at random), so that the
        requests of many jobs rate-limited together do not all come back at the same instant."""
        server = _retry_after(err)
        if server is not None:
            return min(max(server, 0.0), MAX_BACKOFF_SECONDS)
        ceiling = self.cfg.backoff_seconds * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS)
        if not math.isfinite(ceiling):  # a backoff_seconds of nan or inf from a config
            ceiling = MAX_BACKOFF_SECONDS
        ceiling = min(max(ceiling, 0.0), MAX_BACKOFF_SECONDS)
        return ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)

    def key_of(self, messages: list[dict[str, str]]) -> str:
        """The cache key of a prompt sent to this judge."""
        return cache_key(self.endpoint, self.cfg.model, messages, self.cfg.max_tokens)

    def ask(self, messages: list[dict[str, str]]) -> JudgeReply:
        """One judgment: from the cache, or from the endpoint with retries."""
        key = self.key_of(messages)
        hit = self.cache.get(key)
        if hit is not None:
            usage = hit.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            return JudgeReply(
                hit["reply"],
                cached=True,
                prompt_tokens=_count(usage.get("prompt_tokens")),
                completion_tokens=_count(usage.get("completion_tokens")),
            )
        last = ""
        for attempt in range(1, self.cfg.max_retries + 2):
            if self._fatal:  # every request would fail the same way: do not send more
                return JudgeReply(None, error=self._fatal, attempts=attempt - 1)
            try:
                response = self.client.chat.completions.create(
                    model=self.cfg.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=JUDGE_TEMPERATURE,
                    max_tokens=self.cfg.max_tokens,
                )
            except _RETRYABLE as err:
                last = self._describe(err)
                if attempt <= self.cfg.max_retries:
                    self._sleep(self._retry_delay(err, attempt))
                continue
            except _FATAL as err:
                with self._lock:
                    self._fatal = self._describe(err)
                return JudgeReply(None, error=self._fatal, attempts=attempt)
            except openai.OpenAIError as err:  # other 4xx: the same prompt would fail again
                return JudgeReply(None, error=self._describe(err), attempts=attempt)
            except ValueError:  # a 200 whose body is not JSON (a proxy's HTML page)
                return JudgeReply(None, error=_NOT_A_COMPLETION, attempts=attempt)
            return self._record(key, response, attempt)
        return JudgeReply(
            None, error=f"{last} (gave up after {self.cfg.max_retries + 1} attempts)",
            attempts=self.cfg.max_retries + 1,
        )  # fmt: skip

    def _record(self, key: str, response: Any, attempt: int) -> JudgeReply:
        """Cache and return a successful response; one that is no chat completion is an error
        (not cached, so a rerun asks again)."""
        text = _reply_text(response)
        if text is None:
            return JudgeReply(None, error=_NOT_A_COMPLETION, attempts=attempt)
        text = self._scrub(text)
        usage = getattr(response, "usage", None)
        tokens = {
            "prompt_tokens": _count(getattr(usage, "prompt_tokens", 0)),
            "completion_tokens": _count(getattr(usage, "completion_tokens", 0)),
        }
        record = {
            "endpoint": self.endpoint,
            "model": self.cfg.model,
            "reply": text,
            "usage": tokens,
        }
        self.cache.put(key, record)
        return JudgeReply(text, attempts=attempt, **tokens)

    def ask_many(self, prompts: Sequence[list[dict[str, str]]]) -> list[JudgeReply]:
        """Judge every prompt, at most `concurrency` at a time. Identical prompts are sent once;
        the repeats get the same judgment marked as cached (they cost nothing)."""
        keys = [self.key_of(m) for m in prompts]
        unique = dict(zip(keys, prompts, strict=True))
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            replies = dict(zip(unique, pool.map(self.ask, unique.values()), strict=True))
        out, seen = [], set()
        for k in keys:
            reply = replies[k]
            if k in seen:
                reply = dataclasses.replace(reply, cached=reply.text is not None, attempts=0)
            seen.add(k)
            out.append(reply)
        return out


def account(replies: Sequence[JudgeReply], prices: tuple[float, float] | None) -> Usage:
    """Requests, cache hits, errors, paid tokens and the estimated cost of `replies`."""
    usage = Usage()
    for r in replies:
        if r.cached:
            usage.cached += 1
            continue
        usage.requests += r.attempts
        if r.error:
            usage.errors += 1
            if r.error not in usage.errors_seen:
                usage.errors_seen.append(r.error)
        usage.prompt_tokens += r.prompt_tokens
        usage.completion_tokens += r.completion_tokens
    if prices is not None:
        usage.cost_usd = round(
            (usage.prompt_tokens * prices[0] + usage.completion_tokens * prices[1]) / 1e6, 6
        )
    return usage


# ------------------------------------------------------------------------------------------
# Single grading and pairwise comparison of a question set
# ------------------------------------------------------------------------------------------


def _status(text: str | None, error: str | None, verdict: Any) -> str:
    if error is not None or text is None:
        return "error"
    return "ok" if verdict is not None else "unparseable"


def grade_single(
    judge: Judge,
    prompts: dict[str, JudgePrompt],
    questions: Sequence[Question],
    answers: dict[str, Sequence[str]],
) -> tuple[list[dict[str, Any]], list[JudgeReply]]:
    """Grade every judged turn of every question 1-10; returns (rows, replies)."""
    jobs = []
    for q in questions:
        for turn in judged_turns(q):
            name, messages = single_messages(prompts, q, turn, answers[q.qid])
            jobs.append((q, turn, name, messages))
    replies = judge.ask_many([j[3] for j in jobs])
    rows = []
    for (q, turn, name, _), reply in zip(jobs, replies, strict=True):
        score = parse_rating(reply.text) if reply.text is not None else None
        rows.append(
            {
                "kind": "single",
                "qid": q.qid,
                "category": q.category,
                "turn": turn + 1,
                "prompt": name,
                "score": score,
                "status": _status(reply.text, reply.error, score),
                "error": reply.error,
                "cached": reply.cached,
                "judgment": reply.text,
            }
        )
    return rows, replies


ORDERS = ("model-first", "baseline-first")
"""The two presentations of a pair: the evaluated model as assistant A, then as assistant B."""
_WINNER = {  # (order, verdict) -> winner from the evaluated model's side
    ("model-first", "A"): "win",
    ("model-first", "B"): "loss",
    ("baseline-first", "A"): "loss",
    ("baseline-first", "B"): "win",
}


def pair_outcome(verdicts: Sequence[str | None]) -> tuple[str | None, bool]:
    """Combine the verdicts of the two orders into (win | loss | tie | None, consistent).

    An unparseable game makes the pair unparseable (None). Two orders that disagree count as a
    tie, as in MT-bench: the judge preferred whichever answer came first (or second).
    """
    if any(v is None for v in verdicts):
        return None, False
    outcomes = [_WINNER.get((order, v), "tie") for order, v in zip(ORDERS, verdicts, strict=True)]
    if outcomes[0] == outcomes[1]:
        return outcomes[0], True
    return "tie", False


def compare_pairwise(
    judge: Judge,
    prompts: dict[str, JudgePrompt],
    questions: Sequence[Question],
    answers: dict[str, Sequence[str]],
    baseline_answers: dict[str, Sequence[str]],
) -> tuple[list[dict[str, Any]], list[JudgeReply]]:
    """Judge the model against the baseline at every judged turn, in both orders."""
    jobs = []
    for q in questions:
        mine, theirs = answers[q.qid], baseline_answers[q.qid]
        for turn in judged_turns(q):
            name, first = pair_messages(prompts, q, turn, mine, theirs)
            _, second = pair_messages(prompts, q, turn, theirs, mine)
            jobs.append((q, turn, name, first, second))
    flat = [m for j in jobs for m in (j[3], j[4])]
    replies = judge.ask_many(flat)
    rows = []
    for i, (q, turn, name, _, _) in enumerate(jobs):
        games = []
        for order, reply in zip(ORDERS, replies[2 * i : 2 * i + 2], strict=True):
            verdict = parse_pair(reply.text) if reply.text is not None else None
            games.append(
                {
                    "order": order,
                    "verdict": verdict,
                    "status": _status(reply.text, reply.error, verdict),
                    "error": reply.error,
                    "cached": reply.cached,
                    "judgment": reply.text,
                }
            )
        outcome, consistent = pair_outcome([g["verdict"] for g in games])
        rows.append(
            {
                "kind": "pair",
                "qid": q.qid,
                "category": q.category,
                "turn": turn + 1,
                "prompt": name,
                "outcome": outcome,
                "consistent": consistent,
                "status": "ok" if outcome else _worst([g["status"] for g in games]),
                "games": games,
            }
        )
    return rows, replies


def _worst(statuses: list[str]) -> str:
    return "error" if "error" in statuses else "unparseable"


def summarize_single(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score, overall and per category; unparseable and failed judgments excluded and
    counted."""
    stats = summarize(rows, "score")
    stats["unparseable"] = sum(r["status"] == "unparseable" for r in rows)
    stats["errors"] = sum(r["status"] == "error" for r in rows)
    return stats


def _pair_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    wins = sum(r["outcome"] == "win" for r in rows)
    losses = sum(r["outcome"] == "loss" for r in rows)
    ties = sum(r["outcome"] == "tie" for r in rows)
    n = wins + losses + ties
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": n,
        "excluded": len(rows) - n,
        "win_rate": mean_or_none([1.0] * wins + [0.0] * losses + [0.5] * ties),
        "inconsistent": sum(1 for r in rows if r["outcome"] and not r["consistent"]),
    }


def summarize_pairwise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wins, losses and ties against the baseline; win rate counts a tie as half a win."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r)
    stats = _pair_stats(rows)
    stats["unparseable"] = sum(r["status"] == "unparseable" for r in rows)
    stats["errors"] = sum(r["status"] == "error" for r in rows)
    stats["by_category"] = {c: _pair_stats(v) for c, v in sorted(by_category.items())}
    return stats
