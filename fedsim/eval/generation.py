"""Answers and held-out loss from a base model with one round's adapter swapped in.

`AnswerModel` loads the base model and its tokenizer once, attaches LoRA with the run's settings,
and then takes each round's adapter in place (`use_adapter`), so scoring ten rounds costs one model
load. Generation is batched (prompts padded on the left, sorted by length so little is padded),
greedy or sampled; multi-turn questions are answered turn by turn, each turn's prompt holding the
conversation so far.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.client.trainer import collate
from fedsim.config import GenerationConfig, LoraConfig
from fedsim.data.records import make_table
from fedsim.data.shards import IGNORE_INDEX, tokenize_records
from fedsim.data.templates import PromptTemplate
from fedsim.errors import FedsimInputError
from fedsim.eval.questions import Question
from fedsim.lora_ranks import BASE_DELTA_PREFIX
from fedsim.model import MergedBase, attach_lora, load_base_model, load_tokenizer, set_adapter

TensorDict = dict[str, torch.Tensor]
TURN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Generated:
    """One generated answer."""

    text: str
    new_tokens: int
    truncated_prompt: bool
    """The prompt was longer than the model's context allows and lost its beginning."""


@dataclass(frozen=True)
class Answer:
    """A model's answers to every turn of one question."""

    qid: str
    answers: tuple[str, ...]
    new_tokens: int
    truncated_prompt: bool


@dataclass(frozen=True)
class ResponseLoss:
    """Summed token loss of the reference answer given the prompt, and its token count."""

    qid: str
    loss_sum: float
    tokens: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class AnswerModel:
    """A frozen base model with LoRA attached, whose adapter is swapped per round."""

    def __init__(
        self, model_path: str, dtype: str, lora: LoraConfig, device: str | None = None
    ) -> None:
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model_path)
        base = load_base_model(model_path, dtype=dtype, device=self.device)
        self.context_length = int(
            getattr(base.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length
        )
        self.model = attach_lora(base, lora, seed=0)  # its initial weights are never used
        self._merged = MergedBase()
        self.model.eval()
        self._adapter_on = True

    def use_adapter(self, adapter: TensorDict | None) -> None:
        """Answer with `adapter` from now on; None answers with the base model alone. FLoRA's
        rounds carry `base_delta/<weight>` tensors too: merged into the base weights (any other
        adapter puts them back as loaded)."""
        merged = {
            k.removeprefix(BASE_DELTA_PREFIX): v
            for k, v in (adapter or {}).items()
            if k.startswith(BASE_DELTA_PREFIX)
        }
        self._merged.apply(self.model, merged or None)
        if adapter is None:
            self._adapter_on = False
            return
        lora = {k: v for k, v in adapter.items() if not k.startswith(BASE_DELTA_PREFIX)}
        set_adapter(self.model, {k: v.to(self.device) for k, v in lora.items()})
        self._adapter_on = True

    @contextmanager
    def _mode(self) -> Iterator[None]:
        with (
            torch.inference_mode(),
            nullcontext() if self._adapter_on else self.model.disable_adapter(),
        ):
            yield

    # -- generation --------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str, budget: int) -> tuple[list[int], bool]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(bos) + len(ids) <= budget:
            return bos + ids, False
        # Keep the end of the prompt: it holds the question being asked and the response cue.
        return bos + ids[len(ids) - (budget - len(bos)) :], True

    def generate(self, prompts: Sequence[str], gen: GenerationConfig) -> list[Generated]:
        """Continue each prompt with at most `gen.max_new_tokens` tokens, batched."""
        if gen.max_new_tokens >= self.context_length:
            raise FedsimInputError(
                f"eval.generation.max_new_tokens: {gen.max_new_tokens} leaves no room for a "
                f"prompt in the model's context of {self.context_length} tokens"
            )
        budget = self.context_length - gen.max_new_tokens
        encoded = [self._prompt_ids(p, budget) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
        results: list[Generated | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        sampling = gen.temperature > 0
        torch.manual_seed(gen.seed)
        for lo in range(0, len(order), gen.batch_size):
            batch = order[lo : lo + gen.batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            options = {"do_sample": sampling}
            if sampling:
                options |= {"temperature": gen.temperature, "top_p": gen.top_p}
            with self._mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=gen.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **options,
                )
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                results[i] = Generated(text, len(new), encoded[i][1])
        return [r for r in results if r is not None]

    def answer(
        self, questions: Sequence[Question], template: PromptTemplate, gen: GenerationConfig
    ) -> list[Answer]:
        """Answer every turn of every question; turn k's prompt is the conversation so far."""
        prompts = [template.render(q.turns[0], q.context) for q in questions]
        answers: list[list[str]] = [[] for _ in questions]
        tokens = [0] * len(questions)
        truncated = [False] * len(questions)
        active = list(range(len(questions)))
        turn = 0
        while active:
            outputs = self.generate([prompts[i] for i in active], gen)
            for i, out in zip(active, outputs, strict=True):
                answers[i].append(out.text)
                tokens[i] += out.new_tokens
                truncated[i] = truncated[i] or out.truncated_prompt
            turn += 1
            active = [i for i in active if turn < len(questions[i].turns)]
            for i in active:
                prompts[i] = (
                    prompts[i]
                    + answers[i][-1]
                    + TURN_SEPARATOR
                    + template.render(questions[i].turns[turn])
                )
        return [
            Answer(q.qid, tuple(a), n, t)
            for q, a, n, t in zip(questions, answers, tokens, truncated, strict=True)
        ]

    # -- held-out loss -----------------------------------------------------------------------

    def response_loss(
        self,
        questions: Sequence[Question],
        template: PromptTemplate,
        cutoff_len: int,
        batch_size: int,
    ) -> list[ResponseLoss]:
        """Teacher-forced loss of each single-turn question's reference answer, tokenised and
        masked exactly as training examples are (prompt tokens excluded)."""
        rows = [
            {
                "instruction": q.turns[0],
                "context": q.context,
                "response": q.references[0],
                "category": q.category,
            }
            for q in questions
        ]
        if not rows:
            return []
        ids, labels = tokenize_records(
            make_table(rows), self.tokenizer, template, cutoff_len, train_on_inputs=False
        )
        results = []
        for lo in range(0, len(rows), batch_size):
            batch = collate(
                ids[lo : lo + batch_size],
                labels[lo : lo + batch_size],
                self.tokenizer.pad_token_id,
            )
            with self._mode():
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                ).logits.float()
            target = batch["labels"][:, 1:].to(self.device)
            losses = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
            )
            counted = target != IGNORE_INDEX
            for row in range(len(target)):
                results.append(
                    ResponseLoss(
                        questions[lo + row].qid,
                        float(losses[row][counted[row]].sum()),
                        int(counted[row].sum()),
                    )
                )
        return results
