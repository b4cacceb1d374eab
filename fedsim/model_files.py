"""The base model's files, read without torch: where the model is, whether it is usable, and
the tokenizer the driver tokenises with.

The driver checks the model and tokenises the data before anything starts, but it never trains,
so it need not pay for torch and transformers (~4 s and ~300 MB a run, issue 16). What cannot be
decided from the files alone falls back to `fedsim.model`, which imports them: a hub id, a
tokenizer that transformers builds in code rather than reads from `tokenizer.json`, and every
check that fails (so that the message is the one the thorough check gives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config import LoraConfig
from fedsim.errors import FedsimInputError

# Bump when the way the tiny model is built changes, so old cache entries are not reused.
_TINY_BUILD_VERSION = 2


# A hub id is `name` or `owner/name`; anything else (absolute, ./, ~, deeper paths) is local.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture and pretraining recipe of the built-in tiny model.

    Every field is part of the cache key: changing any of them builds a new model.
    """

    vocab_size: int = 1024
    """Tokenizer vocabulary size (byte-level BPE: 256 bytes + 4 special tokens + merges)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads per layer (no grouped-query attention)."""
    intermediate_size: int = 344
    """Width of the SwiGLU MLP."""
    max_position: int = 256
    """Longest sequence the model (and tokenizer's ``model_max_length``) accepts."""
    pretrain_steps: int = 1500
    """Optimizer steps of causal-LM pretraining on the corpus: at 1500 the model answers the
    built-in tasks' plain-text instances (8 to 10 of 10 per category); at 300 it had not."""
    pretrain_lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10 %)."""
    pretrain_batch_size: int = 16
    """Sequences per pretraining step."""
    pretrain_seq_len: int = 64
    """Tokens per pretraining sequence (lines are packed, separated by bos/eos)."""
    seed: int = 0
    """Seed for weight init and batch order."""


def default_cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR`` if set, else ``~/.cache/fedsim``."""
    env = os.environ.get("FEDSIM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsim"


def tiny_model_key(spec: TinyModelSpec, corpus: list[str]) -> str:
    """Hex sha256 identifying the model built from `spec` and `corpus`."""
    corpus_hash = hashlib.sha256(json.dumps(corpus).encode()).hexdigest()
    payload = {
        "build_version": _TINY_BUILD_VERSION,
        "spec": dataclasses.asdict(spec),
        "corpus_sha256": corpus_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ensure_tiny_model(
    spec: TinyModelSpec,
    corpus: list[str],
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Return the directory of the tiny model for `spec` and `corpus`, building it once if needed.

    The directory holds ``config.json``, ``model.safetensors``, tokenizer files and
    ``pretrain.json`` (first/last pretraining loss, timings), and loads with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. It is built under
    a temporary name and renamed into place, under a file lock, so concurrent callers build it
    once and no reader ever sees half a model.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = tiny_model_key(spec, corpus)[:16]
    final = cache / f"tiny-{key}"
    if final.is_dir():
        log(f"fedsim: tiny model cache hit {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f"tiny-{key}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if final.is_dir():
            log(f"fedsim: tiny model cache hit {final}")
            return final
        # Holding the lock, any temp dir for this key is a leftover of a killed build.
        for stale in cache.glob(f".tmp-tiny-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-{key}-", dir=cache))
        try:
            _transformers().build_tiny_model(spec, corpus, tmp, log)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``model.name_or_path`` into what ``from_pretrained`` takes.

    An existing local directory comes back as an absolute path (workers may run in another working
    directory); a hub id such as ``owner/name`` not present on disk comes back unchanged; anything
    else that looks like a local path but does not exist is a `FedsimInputError`. ``tiny`` is
    resolved by the caller through `ensure_tiny_model`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedsimInputError(
                f"model.name_or_path: {name_or_path} has no config.json (expected a Hugging Face "
                "model directory)"
            )
        return str(path.resolve())
    if path.exists():
        raise FedsimInputError(f"model.name_or_path: not a directory: {name_or_path}")
    if _HUB_ID.match(name_or_path):
        return name_or_path
    raise FedsimInputError(f"model.name_or_path: no such directory: {name_or_path}")


def check_weights_format(path: str) -> None:
    """A local model folder must hold safetensors weights: transformers would unpickle a
    `pytorch_model.bin`, which can run arbitrary code. (A hub id is loaded with
    `use_safetensors=True`, which refuses pickled weights in the same way.)"""
    folder = Path(path)
    if not folder.is_dir():
        return
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        found = f" (found only {', '.join(pickled[:3])}, pickled weights)" if pickled else ""
        raise FedsimInputError(
            f"model.name_or_path: {path} has no .safetensors weights{found}; fedsim never "
            "unpickles: convert the model to safetensors (save_pretrained(..., "
            "safe_serialization=True))"
        )


# ---------------------------------------------------------------------------------------------
# The tokenizer, as the driver uses it
# ---------------------------------------------------------------------------------------------

READ_AS_IS = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""`tokenizer_class` values for which transformers uses `tokenizer.json` as it is written (the
built-in tiny model's, and any tokenizer saved from a `tokenizers.Tokenizer`). Other classes
(LlamaTokenizer, ...) may be rebuilt in code on load, so only transformers can say what they do."""


@dataclass
class TextTokenizer:
    """The part of a Hugging Face fast tokenizer that fedsim's data pipeline calls, read straight
    from `tokenizer.json` with the `tokenizers` library: `tokenizer(texts,
    add_special_tokens=False)["input_ids"]` and the special token ids. The ids are those
    `AutoTokenizer` gives (tests/test_model_files.py compares them)."""

    backend: Any
    """A `tokenizers.Tokenizer`, without truncation or padding."""
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        encoded = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}


def load_tokenizer(path: str) -> Any:
    """The tokenizer of the model at `path` as the driver uses it: a `TextTokenizer` when its
    files say exactly what it does, else `fedsim.model.load_tokenizer`'s (which imports torch).
    Either way with a pad id: unk if the tokenizer has none, else eos, as in `fedsim.model`."""
    tokenizer = _read_as_is(Path(path))
    if tokenizer is None:
        return _transformers().load_tokenizer(path)
    return tokenizer


def _read_as_is(folder: Path) -> TextTokenizer | None:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if config.get("tokenizer_class") not in READ_AS_IS:
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # unreadable in any way (tokenizers raises plain Exception)
        return None
    names = {k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")}
    if not _consistent(folder, config, names, backend):
        return None
    ids = {k: backend.token_to_id(t) if t is not None else None for k, t in names.items()}
    if any(names[k] is not None and ids[k] is None for k in ids):
        return None  # a special token the vocabulary lacks: transformers would add it
    backend.no_truncation()
    backend.no_padding()
    pad = (
        ids["pad"]
        if ids["pad"] is not None
        else (ids["unk"] if ids["unk"] is not None else ids["eos"])
    )
    return TextTokenizer(backend, ids["bos"], ids["eos"], ids["unk"], pad)


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _consistent(
    folder: Path, config: dict[str, Any], names: dict[str, str | None], backend: Any
) -> bool:
    """No file beside tokenizer.json changes what transformers would build: special_tokens_map.json
    names the same special tokens, and every added token of tokenizer_config.json is already in
    the vocabulary under its id."""
    special_map = folder / "special_tokens_map.json"
    if special_map.exists():
        mapped = json.loads(special_map.read_text())
        if any(_token_text(mapped.get(f"{k}_token")) not in (None, v) for k, v in names.items()):
            return False
    for token_id, token in (config.get("added_tokens_decoder") or {}).items():
        if backend.token_to_id(_token_text(token)) != int(token_id):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Checking the model against the LoRA settings
# ---------------------------------------------------------------------------------------------


def check_model(path: str, lora: LoraConfig) -> None:
    """Check the base model against the LoRA settings before anything starts, as
    `fedsim.model.check_model` does (weights are safetensors, config.json and the tokenizer load,
    the LoRA targets exist and are at least as wide as the rank), from the files alone: the
    weights' names and shapes come from the safetensors headers. When the files cannot settle it
    (a hub id, a tokenizer only transformers can build) or a check fails, the thorough check
    runs and its verdict and message stand. Raises FedsimInputError."""
    check_weights_format(path)
    if _files_look_fine(Path(path), lora):
        return
    _transformers().check_model(path, lora)


def _files_look_fine(folder: Path, lora: LoraConfig) -> bool:
    if not folder.is_dir():
        return False  # a hub id
    try:
        config = json.loads((folder / "config.json").read_text())
        shapes = weight_shapes(folder)
    except (OSError, ValueError, struct.error):
        return False
    if not isinstance(config, dict) or "model_type" not in config or not shapes:
        return False
    if _read_as_is(folder) is None:
        return False
    return _targets_fit(shapes, lora.target_modules, lora.r)


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """{tensor name: shape} over every `*.safetensors` file in `folder`, from the headers."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _targets_fit(shapes: dict[str, list[int]], targets: Sequence[str], rank: int) -> bool:
    """Every target names a module (any dotted prefix of a weight's name, matched as PEFT does:
    the full name or a dotted suffix), and no matched module's weight matrix is narrower than
    the rank."""
    modules: dict[str, int | None] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            modules.setdefault(".".join(parts[:i]), None)
        if parts[-1] == "weight" and len(shape) == 2:
            modules[".".join(parts[:-1])] = min(shape)
    for target in targets:
        matched = [w for n, w in modules.items() if n == target or n.endswith("." + target)]
        widths = [w for w in matched if w is not None]
        if not matched or (widths and rank > min(widths)):
            return False
    return True


def _transformers() -> Any:
    """`fedsim.model`, which imports torch, transformers and peft, with their chatter quieted."""
    from fedsim import model

    model.quiet_libraries()
    return model
