"""Prompt templates: the Alpaca text of the reference code, and the registry."""

import pytest

from fedsim.data.templates import TEMPLATES, get_template
from fedsim.errors import FedsimInputError


def test_alpaca_with_input_matches_the_reference_text() -> None:
    prompt = get_template("alpaca").render("Summarise the text.", "Cats sleep a lot.")

    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise the text.\n\n### Input:\nCats sleep a lot.\n\n"
        "### Response:\n"
    )


def test_alpaca_without_input_matches_the_reference_text() -> None:
    prompt = get_template("alpaca").render("Name a colour.", "")

    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_braces_in_records_are_not_format_fields() -> None:
    prompt = get_template("plain").render("Print {x}.", "{input}")

    assert prompt == "Question: Print {x}.\nInput: {input}\nAnswer:\n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_response_of_recovers_the_response(name: str) -> None:
    template = get_template(name)

    assert template.response_of(template.render("Say hi.", "to Bob") + " hi Bob") == "hi Bob"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompts_end_in_a_newline(name: str) -> None:
    # The loss mask relies on the prompt's last token not merging into the response.
    template = get_template(name)

    assert template.render("a", "b").endswith("\n")
    assert template.render("a", "").endswith("\n")


def test_unknown_template_lists_the_known_ones() -> None:
    with pytest.raises(
        FedsimInputError,
        match=r"data\.template: unknown template 'x'; expected one of alpaca, plain",
    ):
        get_template("x")
