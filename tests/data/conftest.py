"""Fixtures for the data tests: a small real tokenizer, and the Dolly files when present."""

from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fedsim.data.sources import FieldMap, load_records
from fedsim.data.synthetic import generate_instructions, generic_text
from fedsim.data.templates import TEMPLATES

DOLLY_FILE = "dolly/databricks-dolly-15k.jsonl"
DOLLY_SPLIT = "dolly/reference_split_10_clients.json"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as GPT-2 and Llama 3 use) trained in a moment on the built-in
    data and the templates, with BOS, EOS and PAD tokens."""
    corpus = generic_text(200, seed=0)
    for record in generate_instructions(200, seed=0):
        corpus += [record["instruction"], record["context"], record["response"]]
    for template in TEMPLATES.values():
        corpus += [template.prompt_input, template.prompt_no_input]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def dolly_file(data_dir: Path) -> Path:
    path = data_dir / DOLLY_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found (set FEDSIM_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def dolly_split(data_dir: Path) -> Path:
    path = data_dir / DOLLY_SPLIT
    if not path.is_file():
        pytest.skip(f"{path} not found (set FEDSIM_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def dolly_table(dolly_file: Path) -> pa.Table:
    return load_records(str(dolly_file), FieldMap())
