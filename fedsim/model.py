"""Base model, tokenizer and LoRA adapter handling.

Three jobs:

* the built-in ``tiny`` model: a LLaMA-architecture model of well under a million parameters with
  a byte-level BPE tokenizer, both trained on a caller-supplied generic corpus and cached on disk,
  so that federated LoRA tuning starts from a pretrained base as it would with a real LLM;
* loading any base model (local directory or hub id) frozen, and its tokenizer;
* attaching LoRA with PEFT and moving adapters in and out as flat ``{name: tensor}`` dicts with
  PEFT's own key names, which is what clients, the aggregator and checkpoints exchange.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedsim import console
from fedsim.config import LoraConfig
from fedsim.errors import FedsimInputError
from fedsim.model_files import TinyModelSpec, check_weights_format

# LLaMA's convention for the first ids (unk 0, bos 1, eos 2); pad gets its own id so that masking
# padding in the labels never masks a real end-of-sequence.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
_SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def quiet_libraries() -> None:
    """Silence transformers' warnings (such as 'Token indices sequence length is longer than the
    specified maximum', which fedsim's own truncation warning replaces), its per-load progress
    bars and deprecation chatter, unless `--verbose` (fedsim.console) asks for them.

    On a machine without CUDA, DeepSpeed (which the deepspeed backend imports, and transformers
    may import on its own in some code paths) is told it runs on the CPU instead of warning that
    it found no GPU, verbose or not: that warning is wrong for a CPU run."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if console.verbose():
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# The built-in tiny model
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread. The tiny model's matrices are too small to gain from more, and on
    a shared machine intra-op threads that wait for each other made pretraining 20 times slower
    (0.06 s a step on one thread, 1.3 s on two, with other processes busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_model(
    spec: TinyModelSpec, corpus: list[str], out: Path, log: Callable[[str], None]
) -> None:
    start = time.perf_counter()
    log(
        f"fedsim: building tiny model (vocab {spec.vocab_size}, hidden {spec.hidden_size}, "
        f"{spec.num_layers} layers, {spec.pretrain_steps} pretraining steps) in {out.parent}"
    )
    tokenizer = train_tiny_tokenizer(corpus, spec.vocab_size, spec.max_position)
    model = _init_tiny_model(spec, tokenizer)
    stream = _pack_corpus(tokenizer, corpus)
    with _one_thread():
        losses = _pretrain(model, stream, spec)
    seconds = time.perf_counter() - start

    model.eval()
    _save_model(model, out)
    tokenizer.save_pretrained(out)
    record = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": spec.pretrain_steps,
        "corpus_lines": len(corpus),
        "corpus_tokens": int(stream.numel()),
        "seconds": round(seconds, 2),
        "spec": dataclasses.asdict(spec),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"fedsim: built tiny model in {seconds:.1f} s "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}, {count_parameters(model)[1]:,} parameters)"
    )


def _save_model(model: LlamaForCausalLM, out: Path) -> None:
    """The files `save_pretrained` writes for this untied one-file model, byte for byte
    (config.json, generation_config.json, model.safetensors), without its unwrapping step:
    accelerate's `extract_model_from_parallel` imports DeepSpeed whenever it is installed, and a
    torch-backend run must not import DeepSpeed (its import costs seconds and logs warnings)."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def train_tiny_tokenizer(
    corpus: list[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus`, LLaMA-style: bos prepended, no eos appended."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # One token per digit: numbers then share their digits' embeddings, and sorting, adding and
    # parity work digit by digit instead of over a hundred unrelated number tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # A space is a token of its own, so a word is the same token at the start of a line
            # (an input, an answer) as after a space: copying, reversing and upper-casing words
            # then map tokens to tokens.
            pre_tokenizers.Split(" ", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=model_max_length,
    )


def _init_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        # The trained vocabulary can come out smaller than asked for on a small corpus.
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config).to(torch.float32)


def _pack_corpus(tokenizer: PreTrainedTokenizerFast, corpus: list[str]) -> torch.Tensor:
    """All lines as one token stream, each line framed by bos ... eos, as 1-D int64."""
    encoded = tokenizer.backend_tokenizer.encode_batch(corpus, add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _pretrain(model: LlamaForCausalLM, stream: torch.Tensor, spec: TinyModelSpec) -> list[float]:
    """Causal-LM pretraining on random windows of `stream`; returns the loss of every step."""
    seq_len = spec.pretrain_seq_len
    if stream.numel() <= seq_len:
        raise FedsimInputError(
            f"tiny model corpus: {stream.numel()} tokens, need more than pretrain_seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    offsets = torch.arange(seq_len)
    model.train()
    losses: list[float] = []
    for _ in range(spec.pretrain_steps):
        starts = torch.randint(
            0, stream.numel() - seq_len + 1, (spec.pretrain_batch_size, 1), generator=gen
        )
        batch = stream[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# Loading a base model
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer at `path` with right padding and a pad token.

    A tokenizer without a pad token gets unk (as Alpaca-LoRA does), else eos: unk keeps padding
    distinct from a real end of sequence when padding is masked out of the labels.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token else tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(
    path: str, dtype: str = "float32", device: str = "cpu", quantization: str | None = None
) -> PreTrainedModel:
    """Load a causal LM from `path` in `dtype` on `device`, in eval mode, every weight frozen.

    `quantization` ("8bit" | "4bit") loads the weights with bitsandbytes onto the current CUDA
    device (QLoRA-style: 4-bit NF4 with `dtype` compute, or LLM.int8()) and prepares the model
    for k-bit LoRA training. It needs CUDA and the `gpu` extra (`pip install fedsim[gpu]`).
    """
    if dtype not in _DTYPES:
        raise FedsimInputError(f"model.dtype: expected one of {'|'.join(_DTYPES)}, got {dtype!r}")
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], use_safetensors=True
        )
        model.to(device)
    else:
        model = _load_quantized(path, _DTYPES[dtype], quantization)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_quantized(path: str, dtype: torch.dtype, quantization: str) -> PreTrainedModel:
    import importlib.util

    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise FedsimInputError(
            f"model.quantization: {quantization} needs a CUDA GPU; this worker has none "
            "(cluster.gpus_per_worker > 0 on a node with GPUs)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FedsimInputError(
            f"model.quantization: {quantization} needs bitsandbytes: pip install 'fedsim[gpu]'"
        )
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise FedsimInputError(f"model.quantization: expected 8bit or 4bit, got {quantization!r}")
    from peft import prepare_model_for_kbit_training

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=config,
        device_map={"": torch.cuda.current_device()},
        use_safetensors=True,
    )
    # Casts norms to fp32 and lets gradients reach the LoRA inputs through the frozen k-bit base.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def attach_lora(model: PreTrainedModel, lora: LoraConfig, seed: int) -> PeftModel:
    """Wrap `model` (modified in place) with a fresh LoRA adapter named ``default``, shaped by
    the config's `model.lora` section.

    The initial adapter is a pure function of `seed`: LoRA A is drawn under
    ``torch.manual_seed(seed)`` (B starts at zero), without disturbing the caller's RNG state.
    """
    _check_target_modules(model, lora.target_modules)
    config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    # PEFT creates the LoRA layers on the CPU and then moves them to the base layer's device, so
    # only the CPU generator needs seeding and restoring.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted distinct leaf names of the model's Linear layers (candidates for target_modules)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )


def _check_target_modules(
    model: torch.nn.Module, targets: Sequence[str], rank: int | None = None
) -> None:
    """Every target names a module (as PEFT matches it: the full name or a dotted suffix); with
    `rank`, no matched Linear layer is narrower than the LoRA rank."""
    modules = dict(model.named_modules())
    for target in targets:
        matched = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not matched:
            raise FedsimInputError(
                f"model.lora.target_modules: no module named {target!r} in the model; Linear "
                f"layers available: {', '.join(linear_module_names(model))}"
            )
        widths = [min(m.in_features, m.out_features) for m in matched if hasattr(m, "in_features")]
        if rank is not None and widths and rank > min(widths):
            raise FedsimInputError(
                f"model.lora.r: rank {rank} exceeds the width of {target!r} ({min(widths)}); "
                f"expected a rank of at most {min(widths)}"
            )


def check_model(path: str, lora: LoraConfig) -> None:
    """Check the base model against the LoRA settings before anything starts: its config loads,
    its weights are safetensors (never pickled .bin files), its tokenizer loads, and the LoRA
    targets exist and are at least as wide as the rank. The model is built on the meta device,
    so this costs a second, not a model load. Raises FedsimInputError."""
    where = f"model.name_or_path: {path}"
    check_weights_format(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FedsimInputError(
            f"{where}: cannot read its config.json ({_first_line(err)})"
        ) from None
    try:
        load_tokenizer(path)
    except (OSError, ValueError, TypeError) as err:
        raise FedsimInputError(
            f"{where}: has no loadable tokenizer ({_first_line(err)}); expected tokenizer files "
            "beside the weights"
        ) from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _check_target_modules(skeleton, lora.target_modules, lora.r)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


_SAVES_EMBEDDINGS: weakref.WeakKeyDictionary[PeftModel, bool] = weakref.WeakKeyDictionary()


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's state dict of the adapter (`get_peft_model_state_dict`).

    With its default `save_embedding_layers="auto"`, PEFT reads the base model's config.json again
    on every call (a hub request for a hub id) to see whether the vocabulary was resized, which
    was ~20 % of a one-step client's turn (issue 16). The answer cannot change while the model
    lives, so it is asked once per model and passed on after that: the same keys and values."""
    saves = _SAVES_EMBEDDINGS.get(model)
    if saves is None:
        auto = get_peft_model_state_dict(model)
        plain = get_peft_model_state_dict(model, save_embedding_layers=False)
        _SAVES_EMBEDDINGS[model] = set(auto) != set(plain)
        return auto
    return get_peft_model_state_dict(model, save_embedding_layers=saves)


def get_adapter(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter as a flat dict with PEFT's saved key names: detached, contiguous CPU copies."""
    state = adapter_state(model)
    return {
        k: v.detach().to("cpu", copy=True).contiguous(memory_format=torch.contiguous_format)
        for k, v in state.items()
    }


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters keyed by PEFT's saved names (as in `get_adapter`), so that
    per-parameter server tensors (SCAFFOLD's variates, FedProx anchors, rank masks) line up."""
    marker = f".{model.active_adapter}."
    params = {
        name.replace(marker, "."): p for name, p in model.named_parameters() if p.requires_grad
    }
    expected = set(adapter_state(model))
    if set(params) != expected:
        raise ValueError(_key_mismatch_message(expected - set(params), set(params) - expected))
    return params


def set_adapter(model: PeftModel, adapter: dict[str, torch.Tensor]) -> None:
    """Copy `adapter` (as from `get_adapter`) into the model's LoRA weights in place.

    The parameters keep their storage, so an optimizer holding them stays valid. Raises
    `ValueError` unless `adapter` has exactly the model's adapter keys.
    """
    expected = set(adapter_state(model))
    missing, unexpected = expected - set(adapter), set(adapter) - expected
    if missing or unexpected:
        raise ValueError(_key_mismatch_message(missing, unexpected))
    result = set_peft_model_state_dict(model, adapter)
    # Belt and braces: PEFT's own remapping must also have matched every LoRA parameter.
    missing = {k for k in result.missing_keys if "lora_" in k}
    unexpected = set(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(_key_mismatch_message(missing, unexpected))


class MergedBase:
    """FLoRA: the base weights of a PEFT model plus a merged delta, W = W0 + delta, computed as
    (W0 in float64 + delta) cast to W0's dtype, from the weights as loaded (kept aside the first
    time each one changes), so the result depends on the delta alone, never on earlier ones."""

    def __init__(self) -> None:
        self.originals: dict[str, torch.Tensor] = {}
        self.version: object = None

    def apply(self, model: PeftModel, delta: dict[str, torch.Tensor] | None) -> None:
        """Make the base weights W0 + `delta` (keys: base weight names); None: W0 again."""
        delta = delta or {}
        base = model.get_base_model()
        for name in sorted(set(delta) | set(self.originals)):
            module_name, _, leaf = name.rpartition(".")
            module = base.get_submodule(module_name)
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            param = getattr(layer, leaf)
            if name not in self.originals:
                self.originals[name] = param.detach().clone()
            w0 = self.originals[name]
            with torch.no_grad():
                if name in delta:
                    merged = w0.double() + delta[name].to(w0.device, torch.float64)
                    param.copy_(merged.to(w0.dtype))
                else:
                    param.copy_(w0)


def _key_mismatch_message(missing: set[str], unexpected: set[str]) -> str:
    def show(keys: set[str]) -> str:
        listed = sorted(keys)
        return ", ".join(listed[:3]) + (f" (+{len(listed) - 3} more)" if len(listed) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
    return "adapter keys do not match the model: " + "; ".join(parts)


def adapter_config_dict(model: PeftModel, base_model_name_or_path: str) -> dict[str, Any]:
    """Content of ``adapter_config.json`` for the model's adapter, as PEFT's save would write it.

    With it and ``adapter_model.safetensors`` (`get_adapter` saved by
    ``safetensors.torch.save_file(..., metadata={"format": "pt"})``) a directory loads with
    ``PeftModel.from_pretrained(base_model, directory)``.
    """
    content = model.peft_config["default"].to_dict()
    content["base_model_name_or_path"] = base_model_name_or_path
    content["inference_mode"] = True  # as PeftModel.save_pretrained writes it
    return _jsonable(content)


def _jsonable(value: Any) -> Any:
    # Sets are sorted so that the same adapter always writes the same bytes.
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of `prompts`, decoded and stripped, each cut at end-of-sequence.

    Prompts are left-padded so that every row continues its own prompt; the caller puts the
    model in eval mode. Decoding draws no random numbers, so it leaves training's streams as
    they were."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    texts = []
    for row in range(len(encoded)):
        new = out[row, width:].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts
