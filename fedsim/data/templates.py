"""Prompt templates: how an instruction and its optional input become the model's prompt.

The response is not part of the rendered prompt; the tokenizer step appends it (and EOS), so the
prompt's length tells which tokens to mask out of the loss.
"""

from dataclasses import dataclass

from fedsim.errors import FedsimInputError


@dataclass(frozen=True)
class PromptTemplate:
    """A named pair of prompt formats, with `{instruction}` and `{input}` placeholders."""

    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str = "### Response:"

    def render(self, instruction: str, context: str = "") -> str:
        """The prompt for one record; the format without input is used when `context` is empty."""
        if context:
            return self.prompt_input.format(instruction=instruction, input=context)
        return self.prompt_no_input.format(instruction=instruction)

    def response_of(self, output: str) -> str:
        """The response part of a generated text (everything after `response_split`)."""
        return output.split(self.response_split, 1)[-1].strip()


# The Alpaca template, as used by the Shepherd reference code (templates/alpaca.json).
ALPACA = PromptTemplate(
    name="alpaca",
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    response_split="### Response:",
)

# A short template for small models and short contexts: fewer prompt tokens per example. The
# prompt ends in a newline, not "Answer: ", because BPE tokenizers merge a trailing space into the
# response's first word, which would misplace the prompt/response boundary of the loss mask.
PLAIN = PromptTemplate(
    name="plain",
    prompt_input="Question: {instruction}\nInput: {input}\nAnswer:\n",
    prompt_no_input="Question: {instruction}\nAnswer:\n",
    response_split="Answer:",
)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (ALPACA, PLAIN)}


def get_template(name: str) -> PromptTemplate:
    """The registered template called `name`."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise FedsimInputError(
            f"data.template: unknown template '{name}'; expected one of {', '.join(TEMPLATES)}"
        ) from None


def template_text() -> list[str]:
    """The fixed wording of every template, as lines of text: part of the built-in tiny model's
    tokenizer corpus, so that its prompts cost a realistic number of tokens."""
    lines = []
    for t in TEMPLATES.values():
        for fmt in (t.prompt_input, t.prompt_no_input):
            lines.extend(s for s in fmt.format(instruction="", input="").splitlines() if s)
    return lines
