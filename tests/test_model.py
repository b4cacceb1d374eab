"""Tests for fedsim.model: the cached tiny model, base model loading, LoRA adapters."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fedsim.config import LoraConfig
from fedsim.errors import FedsimInputError
from fedsim.model import (
    adapter_config_dict,
    adapter_state,
    attach_lora,
    count_parameters,
    get_adapter,
    load_base_model,
    load_tokenizer,
    set_adapter,
)
from fedsim.model_files import TinyModelSpec, ensure_tiny_model, resolve_model_path
from tests.peft_checks import (
    assert_differs_from_a_fresh_adapter,
    assert_model_holds_the_file,
    same_bits,
)

SPEC = TinyModelSpec(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position=128,
    pretrain_steps=20,
    pretrain_batch_size=8,
    pretrain_seq_len=32,
)

# One string reads better than a column of 28 quoted words.
_WORDS = (  # noqa: SIM905
    "the a cat dog bird sees likes finds big small red blue house tree river sun moon "
    "eats jumps over under quickly slowly one two three four five"
).split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path_factory.mktemp("cache"), log=_quiet)


def _quiet(_: str) -> None:
    pass


def _lora_model(path: Path, seed: int = 0, spec: LoraConfig | None = None) -> PeftModel:
    return attach_lora(load_base_model(str(path)), spec or LoraConfig(), seed=seed)


# --- tiny model -------------------------------------------------------------------------------


def test_tiny_model_has_expected_files_and_loads(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == SPEC.hidden_size
    assert model.config.num_hidden_layers == SPEC.num_layers
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_tokenizer_is_fast_and_round_trips(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert len(tok) <= SPEC.vocab_size
    # Text outside the training words still round-trips: byte-level BPE has no unknown bytes.
    text = "the cat sees 42 Zebras, quickly! ünïcode"
    ids = tok(text)["input_ids"]
    # LLaMA-style: bos prepended, no eos appended.
    assert ids[0] == tok.bos_token_id
    assert ids[-1] != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_splits_digits_and_keeps_words_whole(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    # Every digit is a token of its own, whatever numbers the corpus held.
    digits = [t for t in tok.tokenize("the 2025 cats saw 47") if any(c.isdigit() for c in t)]
    assert digits == ["2", "0", "2", "5", "4", "7"]
    # A space is its own token, so a word has the same ids at a line's start and after a space.
    word = tok("cat", add_special_tokens=False)["input_ids"]
    assert tok("the cat", add_special_tokens=False)["input_ids"][-len(word) :] == word
    assert tok("the\ncat", add_special_tokens=False)["input_ids"][-len(word) :] == word


def test_tiny_model_config_matches_tokenizer(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tok)
    assert config["bos_token_id"] == tok.bos_token_id
    assert config["eos_token_id"] == tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id


def test_pretraining_lowers_loss(tiny_dir: Path) -> None:
    record = json.loads((tiny_dir / "pretrain.json").read_text())
    assert record["steps"] == SPEC.pretrain_steps
    assert record["last_loss"] < record["first_loss"]


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    logs: list[str] = []
    first = ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path, log=logs.append)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert any("built tiny model" in line for line in logs)

    logs.clear()
    second = ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path, log=logs.append)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == mtimes
    assert not any("building" in line for line in logs)
    assert any("cache hit" in line for line in logs)
    # Only the model dir and its lock file: no temp dirs left behind.
    assert {p.name for p in tmp_path.iterdir()} == {first.name, first.name + ".lock"}


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path / "a", log=_quiet)
    b = ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path / "b", log=_quiet)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_spec_or_corpus_change_gives_another_dir(tmp_path: Path) -> None:
    base = ensure_tiny_model(SPEC, CORPUS, cache_dir=tmp_path, log=_quiet)
    other_spec = TinyModelSpec(**{**SPEC.__dict__, "seed": 1})
    assert ensure_tiny_model(other_spec, CORPUS, cache_dir=tmp_path, log=_quiet) != base
    assert ensure_tiny_model(SPEC, make_corpus(seed=1), cache_dir=tmp_path, log=_quiet) != base


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "env-cache"))
    path = ensure_tiny_model(SPEC, CORPUS, log=_quiet)
    assert path.parent == tmp_path / "env-cache"


def test_corpus_too_short_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(FedsimInputError, match="pretrain_seq_len"):
        ensure_tiny_model(SPEC, ["a cat."], cache_dir=tmp_path, log=_quiet)
    assert not list(tmp_path.glob("tiny-*/"))


# --- loading ----------------------------------------------------------------------------------


def test_resolve_model_path(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir.resolve())
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    missing = tmp_path / "no" / "model"
    with pytest.raises(FedsimInputError, match=r"model\.name_or_path: no such directory"):
        resolve_model_path(str(missing))
    with pytest.raises(FedsimInputError, match=r"model\.name_or_path: no such directory"):
        resolve_model_path("./some/local/model")
    with pytest.raises(FedsimInputError, match=r"config\.json"):
        resolve_model_path(str(tmp_path))


def test_load_base_model_is_frozen_eval(tiny_dir: Path) -> None:
    model = load_base_model(str(tiny_dir))
    assert not model.training
    assert count_parameters(model)[0] == 0
    assert count_parameters(model)[1] > 0
    half = load_base_model(str(tiny_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(FedsimInputError, match=r"model\.dtype"):
        load_base_model(str(tiny_dir), dtype="float64")


def test_load_tokenizer_sets_pad_and_right_padding(tiny_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_dir))
    assert tok.padding_side == "right"
    assert tok.pad_token == "<pad>"
    # A tokenizer saved without a pad token gets one (unk, as Alpaca-LoRA does).
    bare = AutoTokenizer.from_pretrained(tiny_dir)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == "<unk>"
    assert reloaded.padding_side == "right"


# --- LoRA -------------------------------------------------------------------------------------


def test_attach_lora_trains_only_lora(tiny_dir: Path) -> None:
    model = _lora_model(tiny_dir)
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # r * (in + out) per adapted Linear: q_proj and v_proj in each layer, square 32x32 here.
    assert trainable == SPEC.num_layers * 2 * 8 * (32 + 32)
    assert total > trainable


def test_attach_lora_is_a_function_of_the_seed(tiny_dir: Path) -> None:
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    a = get_adapter(_lora_model(tiny_dir, seed=7))
    before = torch.get_rng_state()
    b = get_adapter(_lora_model(tiny_dir, seed=7))
    assert torch.equal(torch.get_rng_state(), before)  # ... nor be changed
    c = get_adapter(_lora_model(tiny_dir, seed=8))
    assert a and a.keys() == b.keys() == c.keys()
    assert all(same_bits(a[k], b[k]) for k in a)
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(not torch.equal(a[k], c[k]) for k in lora_a)
    # LoRA B starts at zero, so the fresh adapter leaves the base model's output unchanged.
    lora_b = [k for k in a if "lora_B" in k]
    assert len(lora_b) == len(lora_a) and all(torch.count_nonzero(a[k]) == 0 for k in lora_b)


def test_get_adapter_returns_detached_cpu_copies(tiny_dir: Path) -> None:
    model = _lora_model(tiny_dir)
    adapter = get_adapter(model)
    assert len(adapter) == SPEC.num_layers * 2 * 2  # A and B of q_proj and v_proj per layer
    assert all(k.endswith(".weight") and "lora_" in k for k in adapter)
    assert all(".default." not in k for k in adapter)  # PEFT's saved names, no adapter name
    for tensor in adapter.values():
        assert tensor.device.type == "cpu"
        assert tensor.is_contiguous()
        assert not tensor.requires_grad
    params = {p.data_ptr() for p in model.parameters()}
    assert all(t.data_ptr() not in params for t in adapter.values())


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]])
def test_adapter_state_is_peft_s_own_after_the_first_call(tiny_dir: Path, targets) -> None:
    """PEFT decides once whether to save the embeddings (`save_embedding_layers="auto"` reads the
    base model's config on every call); every later call gives what PEFT's default gives."""
    from peft.utils import get_peft_model_state_dict

    model = attach_lora(
        load_base_model(str(tiny_dir)), LoraConfig(r=4, alpha=8, target_modules=targets), seed=0
    )
    for _ in range(3):
        ours, peft_s = adapter_state(model), get_peft_model_state_dict(model)
        assert list(ours) == list(peft_s)
        assert all(torch.equal(ours[k], peft_s[k]) for k in ours)
    assert any("embed_tokens.base_layer" in k for k in ours) == ("embed_tokens" in targets)


def test_set_adapter_round_trips_in_place(tiny_dir: Path) -> None:
    src = _lora_model(tiny_dir, seed=1)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    adapter = get_adapter(src)

    dst = _lora_model(tiny_dir, seed=2)
    before = get_adapter(dst)
    assert adapter and all(not torch.equal(before[k], adapter[k]) for k in adapter)  # a real copy
    ptrs = {n: p.data_ptr() for n, p in dst.named_parameters()}
    set_adapter(dst, adapter)
    assert {n: p.data_ptr() for n, p in dst.named_parameters()} == ptrs
    back = get_adapter(dst)
    assert back.keys() == adapter.keys()
    assert all(same_bits(back[k], adapter[k]) for k in adapter)


def test_set_adapter_rejects_wrong_keys(tiny_dir: Path) -> None:
    model = _lora_model(tiny_dir)
    adapter = get_adapter(model)
    missing = dict(adapter)
    dropped = sorted(missing)[0]
    del missing[dropped]
    with pytest.raises(ValueError, match="1 missing"):
        set_adapter(model, missing)
    extra = {
        **adapter,
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": adapter[dropped],
    }
    with pytest.raises(ValueError, match="1 unexpected"):
        set_adapter(model, extra)


def test_unknown_target_module_names_the_field(tiny_dir: Path) -> None:
    with pytest.raises(FedsimInputError) as err:
        _lora_model(tiny_dir, spec=LoraConfig(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert message.startswith("model.lora.target_modules:")
    assert "'query'" in message
    assert "q_proj" in message and "down_proj" in message
    assert "\n" not in message


def test_adapter_dir_loads_with_peft_from_pretrained(tiny_dir: Path, tmp_path: Path) -> None:
    model = _lora_model(tiny_dir, seed=3, spec=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    adapter = get_adapter(model)
    out = tmp_path / "round_0001"
    out.mkdir()
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = adapter_config_dict(model, str(tiny_dir))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    assert config["r"] == 4 and config["target_modules"] == ["q_proj"]

    loaded = PeftModel.from_pretrained(load_base_model(str(tiny_dir)), out)
    # PEFT keeps its initial weights for keys that do not match: check every value, by PEFT's own
    # key mapping rather than fedsim's get_adapter, and that a fresh adapter would not pass
    saved = assert_model_holds_the_file(loaded, out / "adapter_model.safetensors")
    assert saved.keys() == adapter.keys()
    assert_differs_from_a_fresh_adapter(saved, out)
    reloaded = get_adapter(loaded)
    assert reloaded.keys() == adapter.keys()
    assert all(same_bits(reloaded[k], adapter[k]) for k in adapter)

    tok = load_tokenizer(str(tiny_dir))
    inputs = tok("the cat", return_tensors="pt")
    generated = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
