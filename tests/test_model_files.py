"""The driver reads the base model's files without torch (fedsim/model_files.py): its tokenizer
gives the ids transformers gives, and its model check agrees with the thorough one whenever it
passes, or hands over to it."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

import fedsim.model
from fedsim.config import LoraConfig, config_from_dict
from fedsim.data import records
from fedsim.data.shards import tokenize_records
from fedsim.data.templates import get_template
from fedsim.errors import FedsimInputError
from fedsim.model_files import TextTokenizer, check_model, load_tokenizer, weight_shapes
from fedsim.prepare import prepare_model
from tests.conftest import tiny_experiment


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config_from_dict(tiny_experiment(tmp_path_factory.mktemp("run")))
    return Path(prepare_model(cfg, log=lambda _: None))


def _texts(data_dir: Path) -> list[str]:
    """Dolly's first records when the shared data is there, else the built-in ones; with
    accents, digits, newlines, runs of spaces and an empty string."""
    dolly = data_dir / "dolly" / "databricks-dolly-15k.jsonl"
    if dolly.exists():
        rows = [json.loads(line) for line in itertools.islice(dolly.open(), 300)]
        texts = [r["instruction"] + "\n" + r["context"] + "\n" + r["response"] for r in rows]
    else:
        texts = [f"Question {i}: what is {i} + {i}?\nThe answer is {2 * i}." for i in range(300)]
    return [*texts, "", "  two  spaces\n\ttab", "café naïve 12345 ½ 😀", "<s> </s> <pad>"]


def test_the_driver_tokenizer_gives_transformers_ids(tiny_dir: Path, data_dir: Path) -> None:
    light = load_tokenizer(str(tiny_dir))
    reference = fedsim.model.load_tokenizer(str(tiny_dir))  # AutoTokenizer, as the workers use

    assert isinstance(light, TextTokenizer)
    texts = _texts(data_dir)
    assert (
        light(texts, add_special_tokens=False)["input_ids"]
        == (reference(texts, add_special_tokens=False)["input_ids"])
    )
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(light, name) == getattr(reference, name), name


def test_shards_tokenised_by_the_driver_equal_those_of_transformers(
    tiny_dir: Path, data_dir: Path
) -> None:
    texts = _texts(data_dir)[-60:]  # tokenising is slow in the reference tokenizer
    table = pa.table(
        {
            records.INSTRUCTION: texts,
            records.CONTEXT: texts[::-1],
            records.RESPONSE: [t.upper() for t in texts],
            records.CATEGORY: ["open_qa"] * len(texts),
        }
    )
    template = get_template("alpaca")

    for train_on_inputs in (False, True):
        ours = tokenize_records(table, load_tokenizer(str(tiny_dir)), template, 96, train_on_inputs)
        theirs = tokenize_records(
            table, fedsim.model.load_tokenizer(str(tiny_dir)), template, 96, train_on_inputs
        )
        assert ours == theirs


def _copy(tiny_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_dir, target)
    return target


def test_a_tokenizer_class_transformers_may_rebuild_is_left_to_transformers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    model = _copy(tiny_dir, tmp_path / "model")
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    config_file.write_text(json.dumps(config))

    assert not isinstance(load_tokenizer(str(model)), TextTokenizer)


def test_special_tokens_named_otherwise_beside_the_config_are_left_to_transformers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    model = _copy(tiny_dir, tmp_path / "model")
    (model / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))

    assert not isinstance(load_tokenizer(str(model)), TextTokenizer)
    assert (
        load_tokenizer(str(model)).pad_token_id == AutoTokenizer.from_pretrained(model).pad_token_id
    )


def test_weight_shapes_come_from_the_safetensors_headers(tiny_dir: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_dir / "model.safetensors"))

    assert weight_shapes(tiny_dir) == {k: list(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize(
    "targets",
    [["q_proj"], ["q_proj", "v_proj"], ["self_attn.o_proj"], ["layers.0.mlp.up_proj"], ["nope"]],
)
@pytest.mark.parametrize("rank", [4, 32, 33])
def test_the_file_check_agrees_with_the_thorough_one(
    tiny_dir: Path, targets: list[str], rank: int
) -> None:
    lora = LoraConfig(r=rank, alpha=8, target_modules=targets)  # the tiny model is 32 wide

    def verdict(check) -> str | None:
        try:
            check(str(tiny_dir), lora)
        except FedsimInputError as err:
            return str(err)
        return None

    assert verdict(check_model) == verdict(fedsim.model.check_model)
