"""Answer-token loss, multiple-choice accuracy and generation scores of a causal LM on
held-out data, rendered as training renders it.

Each record is rendered with `shared.data` exactly as `fn-train` and `fn-analyze collect`
render it (chat template for an instruct model); the loss is the mean negative
log-likelihood of the answer tokens (what TRL's completion-only loss trains on, EOS
included for string templates), so an evaluation measures the signal a mask is applied to.
Plain-text records have no answer: the loss is then on all their tokens.

Multiple-choice records (question, choices, answer) are also scored as lm-evaluation-harness
scores them: the summed log-probability of each choice as the continuation of the rendered
prompt; `acc` is the share of records whose best choice is the right one, `acc_norm` the
same with each sum divided by the choice's length in characters. Short answers can be
scored by greedy generation: exact match, and whether the answer is contained in it.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.chance import chance_level
from shared.data import render_prompt, render_text
from shared.errors import UserError
from shared.examples import load_examples


@dataclass(frozen=True)
class EvalRow:
    input_ids: tuple[int, ...]  # the whole rendered record
    n_prompt: int  # tokens before the answer; the loss is on input_ids[n_prompt:] (0: on all tokens)
    answer: str | None  # the reference answer, for exact match (None for plain text)


@dataclass(frozen=True)
class ChoiceSet:
    """Multiple-choice records as one row per (record, choice): the rendered prompt followed by
    the choice's text; each row's "answer" tokens are the choice's."""

    rows: tuple[EvalRow, ...]
    record: tuple[int, ...]  # the record of each row
    chars: tuple[int, ...]  # the character length of each row's choice (acc_norm divides by it)
    gold: tuple[int, ...]  # per record: the row index (within the record) of the right choice

    @property
    def n_records(self) -> int:
        return len(self.gold)

    @property
    def counts(self) -> tuple[int, ...]:
        """The number of choices of each record."""
        found = [0] * self.n_records
        for record in self.record:
            found[record] += 1
        return tuple(found)


@dataclass(frozen=True)
class EvalSet:
    rows: tuple[EvalRow, ...]
    source: str
    split: str
    data_format: str
    template: str
    choices: ChoiceSet | None = None  # multiple-choice data: the records' choices, for accuracy

    @property
    def n_answer_tokens(self) -> int:
        return sum(len(row.input_ids) - max(row.n_prompt, 1) for row in self.rows)

    @property
    def has_answers(self) -> bool:
        return all(row.answer is not None for row in self.rows)


@dataclass(frozen=True)
class RowScores:
    """Each row's own figures, in the order of the evaluation set's rows (`EvalSet.rows`; for
    multiple choice, its records), so two conditions scored on the same rows can be compared row by
    row (paired) and their uncertainty taken from the rows (`shared.statistics`)."""

    loss: tuple[float, ...]  # mean negative log-likelihood of each row's answer tokens
    tokens: tuple[int, ...]  # answer tokens of each row: the weight of its loss in the set's loss
    exact_match: tuple[float, ...] | None = None  # 1.0 / 0.0 per row
    contains: tuple[float, ...] | None = None
    accuracy: tuple[float, ...] | None = None  # per multiple-choice record
    accuracy_norm: tuple[float, ...] | None = None

    def figure(self, name: str) -> tuple[tuple[float, ...], tuple[int, ...] | None] | None:
        """(per-row values, weights or None for equal weights) of `name` (`loss` or an accuracy field),
        None when this score has no such figure."""
        if name == "loss":
            return self.loss, self.tokens
        values = getattr(self, name)
        return None if values is None else (values, None)

    def to_dict(self) -> dict[str, list]:
        return {name: list(values) for name, values in vars(self).items() if values is not None}


@dataclass(frozen=True)
class Score:
    loss: float  # mean negative log-likelihood per answer token
    exact_match: float | None  # share of rows whose greedy answer equals the reference (normalized)
    contains: float | None = None  # share of rows whose greedy generation contains the reference (normalized)
    accuracy: float | None = None  # multiple choice: share of records whose most likely choice is right (acc)
    accuracy_norm: float | None = None  # the same with log-likelihoods per character of the choice (acc_norm)
    rows: RowScores | None = None  # the same figures row by row

    @property
    def headline_accuracy(self) -> float | None:
        """The accuracy the ratios are taken of: acc for multiple choice, else contains."""
        return self.accuracy if self.accuracy is not None else self.contains

    @property
    def headline_accuracy_name(self) -> str | None:
        """The field `headline_accuracy` reads."""
        if self.accuracy is not None:
            return "accuracy"
        return "contains" if self.contains is not None else None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 past ~709


def chance_record(eval_set: EvalSet, scored: Score) -> dict | None:
    """The set's chance level and `scored`'s acc next to it (`shared.chance`), as the results JSON holds
    it; None for a set that is not multiple choice."""
    if eval_set.choices is None or scored.accuracy is None:
        return None
    return chance_level(eval_set.choices.counts, scored.accuracy).to_dict()


def check_rows_to_compare(eval_set: EvalSet) -> None:
    """Refuse a set with fewer than 2 rows (or multiple-choice records) to score: the paired
    comparisons are intervals over the rows."""
    rows = len(eval_set.rows)
    if eval_set.choices is not None:
        rows = min(rows, eval_set.choices.n_records)
    if rows < 2:
        raise UserError(
            f"dataset {eval_set.source} gave {rows} row to score: the comparisons are intervals over the rows "
            "and need at least 2; raise --limit or give more data"
        )


def load_eval_set(
    source: str,
    tokenizer,
    split: str | None = None,
    data_format: str = "auto",
    template_format: str = "auto",
    limit: int | None = None,
    max_length: int = 512,
) -> EvalSet:
    """The first `limit` records of the split (by default a held-out one: see
    `shared.examples.load_examples`), tokenized with their answer boundary."""
    data = load_examples(source, tokenizer, split, "evaluate", data_format, template_format).head(limit)
    template = data.template
    rows = []
    choice_rows: list[EvalRow] = []
    choice_record: list[int] = []
    choice_chars: list[int] = []
    gold: list[int] = []
    for example in data:
        text = render_text(example, template, tokenizer)
        if example.text is None and template != "chat":
            text += tokenizer.eos_token or ""  # TRL appends EOS to a string completion and learns it
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        prompt = render_prompt(example, template, tokenizer)
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
        n_prompt = _common_prefix(prompt_ids, ids) if prompt else 0
        if len(ids) <= max(n_prompt, 1):  # no answer token left after truncation
            continue
        rows.append(EvalRow(tuple(ids), n_prompt, example.answer if example.text is None else None))
        if example.choices is not None and prompt is not None:
            scored = _choice_rows(example.choices, prompt, prompt_ids, tokenizer, max_length)
            if scored is not None:
                choice_rows.extend(scored)
                choice_record.extend([len(gold)] * len(scored))
                choice_chars.extend(len(choice) for choice in example.choices)
                gold.append(int(example.gold or 0))
    if not rows:
        raise UserError(
            f"dataset {source} (split {data.split}) gave no record with an answer token within "
            f"--max-length {max_length}; raise --max-length or check the data"
        )
    choices = None
    if choice_rows:
        choices = ChoiceSet(tuple(choice_rows), tuple(choice_record), tuple(choice_chars), tuple(gold))
    return EvalSet(tuple(rows), source, data.split, data.data_format.value, template, choices)


def _choice_rows(
    choices: tuple[str, ...], prompt: str, prompt_ids: list[int], tokenizer, max_length: int
) -> list[EvalRow] | None:
    """One row per choice: the prompt (up to the assistant's turn) and the choice's text as its
    continuation (no end of turn, as lm-evaluation-harness). None when a choice does not fit."""
    rows = []
    for choice in choices:
        ids = tokenizer(prompt + choice)["input_ids"]
        n_context = _common_prefix(prompt_ids, ids)
        if len(ids) > max_length or len(ids) <= max(n_context, 1):
            return None
        rows.append(EvalRow(tuple(ids), n_context, choice))
    return rows


def _common_prefix(prompt_ids: list[int], ids: list[int]) -> int:
    """Length of the shared start: the prompt's tokens, less any merged across the answer boundary."""
    n = 0
    for a, b in zip(prompt_ids, ids, strict=False):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (B, T), -100 outside the answers
    first_target: int  # smallest position holding a label: logits before it are not needed
    shared_prefix: int  # leading tokens every row of the evaluation set starts with, before any label
    prompts: list[tuple[int, ...]]  # for generation
    answers: list[str | None]
    index: tuple[int, ...] = ()  # each row's position in the rows the batches were made of


def shared_prefix_length(rows: tuple[EvalRow, ...]) -> int:
    """Tokens all rows start with (a chat template's system prompt), ending before the first label."""
    first = rows[0].input_ids
    length = min(max(row.n_prompt, 1) for row in rows) - 1
    for row in rows[1:]:
        length = min(length, _common_prefix(list(first), list(row.input_ids)))
    return max(length, 0)


def make_batches(eval_set: EvalSet | ChoiceSet, batch_size: int, pad_id: int) -> list[Batch]:
    """Rows sorted by length (less padding), right-padded so every token keeps its position."""
    all_rows = eval_set.rows
    order = sorted(range(len(all_rows)), key=lambda i: len(all_rows[i].input_ids))
    prefix = shared_prefix_length(all_rows)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [all_rows[i] for i in order[start : start + batch_size]]
        width = max(len(row.input_ids) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            ids[i, :n] = torch.tensor(row.input_ids)
            mask[i, :n] = 1
            first = max(row.n_prompt, 1)
            labels[i, first:n] = ids[i, first:n]
        batches.append(
            Batch(
                ids,
                mask,
                labels,
                min(max(row.n_prompt, 1) for row in rows),
                prefix,
                [row.input_ids[: row.n_prompt] for row in rows],
                [row.answer for row in rows],
                tuple(order[start : start + batch_size]),
            )
        )
    return batches


def _forward_parameter(model: nn.Module, *names: str) -> str | None:
    """The first of `names` that the model's forward takes (transformers renamed some across versions)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in names if name in parameters), None)


def _answer_logits(
    model: nn.Module, batches: list[Batch], copies: int = 1
) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
    """(batch, logits, targets) per batch: the logits that predict each label position, and the
    labels (-100 outside the answers).

    The prefix every row shares (a chat template's system prompt: half the tokens of short
    records) is run once per call, under whatever mask is in place, and its key/value cache
    reused by every batch. With `copies` > 1 every batch (and the prefix) runs as that many
    copies of its rows, copy-major, one per condition of `shared.hooks.stacked_down_projections`.
    """
    device = next(model.parameters()).device
    keep = _forward_parameter(model, "logits_to_keep")
    cache_name = _forward_parameter(model, "cache", "past_key_values")
    prefix = batches[0].shared_prefix if cache_name else 0
    with torch.inference_mode():
        if prefix:
            out = model(input_ids=batches[0].input_ids[:1, :prefix].repeat(copies, 1).to(device), use_cache=True)
            prefix_cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for batch in batches:
            width = batch.input_ids.shape[1]
            # Logits at position t predict token t+1: only positions from first_target - 1 on are needed,
            # which spares the LM head on most prompt tokens.
            n_keep = width - batch.first_target + 1
            kwargs: dict = {keep: n_keep} if keep else {}
            if prefix:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(batch.input_ids.shape[0])
                kwargs[cache_name] = cache
            logits = model(
                input_ids=batch.input_ids[:, prefix:].repeat(copies, 1).to(device),
                attention_mask=batch.attention_mask.repeat(copies, 1).to(device),
                **kwargs,
            ).logits[:, -n_keep:-1]
            yield batch, logits, batch.labels[:, width - n_keep + 1 :].repeat(copies, 1).to(device)


def row_answer_nll(model: nn.Module, batches: list[Batch], copies: int = 1) -> list[tuple[list[float], list[int]]]:
    """Per copy: (summed negative log-likelihood of each row's answer tokens, the row's answer-token
    count), both in the rows' order (`Batch.index`)."""
    n_rows = sum(len(batch.index) for batch in batches)
    sums = [[0.0] * n_rows for _ in range(copies)]
    counts = [0] * n_rows
    for batch, logits, targets in _answer_logits(model, batches, copies):
        rows = len(batch.input_ids)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        per_row = per_token.double().sum(dim=1).tolist()
        tokens = (targets[:rows] != -100).sum(dim=1).tolist()
        for i, index in enumerate(batch.index):
            counts[index] = int(tokens[i])
            for c in range(copies):
                sums[c][index] = per_row[c * rows + i]
    return [(copy_sums, counts) for copy_sums in sums]


def answer_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Mean negative log-likelihood per answer token, over all batches (token-weighted)."""
    ((nll, tokens),) = row_answer_nll(model, batches)
    return sum(nll) / sum(tokens)


def answer_logprobs(model: nn.Module, batches: list[Batch]) -> dict[int, float]:
    """Summed log-probability of each row's answer tokens, by the row's index (`Batch.index`)."""
    return copies_logprobs(model, batches)[0]


def copies_logprobs(model: nn.Module, batches: list[Batch], copies: int = 1) -> list[dict[int, float]]:
    """`answer_logprobs` of each copy of the rows."""
    sums: list[dict[int, float]] = [{} for _ in range(copies)]
    for batch, logits, targets in _answer_logits(model, batches, copies):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        answer = targets != -100
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_row = torch.where(answer, picked, torch.zeros_like(picked)).double().sum(dim=1).tolist()
        for c in range(copies):
            for i, index in enumerate(batch.index):
                sums[c][index] = per_row[c * len(batch.index) + i]
    return sums


def choice_accuracy(model: nn.Module, choices: ChoiceSet, batches: list[Batch]) -> tuple[float, float]:
    """(acc, acc_norm) over the multiple-choice records, as lm-evaluation-harness computes them:
    the right choice has the highest summed log-probability (acc), or the highest per character
    of the choice (acc_norm); ties go to the first choice."""
    ((hits, hits_norm),) = record_choice_hits(model, choices, batches)
    return sum(hits) / len(hits), sum(hits_norm) / len(hits_norm)


def record_choice_hits(
    model: nn.Module, choices: ChoiceSet, batches: list[Batch], copies: int = 1
) -> list[tuple[list[float], list[float]]]:
    """Per copy: (acc, acc_norm) of each multiple-choice record, 1.0 or 0.0, in the records' order."""
    per_record: list[list[int]] = [[] for _ in choices.gold]
    for row, record in enumerate(choices.record):
        per_record[record].append(row)
    results = []
    for logprobs in copies_logprobs(model, batches, copies):
        hits, hits_norm = [], []
        for record, rows in enumerate(per_record):
            scores = [logprobs[row] for row in rows]
            normed = [logprobs[row] / max(choices.chars[row], 1) for row in rows]
            hits.append(float(max(range(len(rows)), key=lambda i: (scores[i], -i)) == choices.gold[record]))
            hits_norm.append(float(max(range(len(rows)), key=lambda i: (normed[i], -i)) == choices.gold[record]))
        results.append((hits, hits_norm))
    return results


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (as SQuAD's exact match)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def answer_contained(generated: str, answer: str) -> bool:
    """Whether the normalized answer occurs in the normalized generation as whole words."""
    wanted = normalize_answer(answer)
    return bool(wanted) and f" {wanted} " in f" {normalize_answer(generated)} "


def row_generation_hits(
    model: nn.Module, tokenizer, batches: list[Batch], max_new_tokens: int, copies: int = 1
) -> list[tuple[list[float], list[float]]]:
    """Per copy: (exact match, answer contained) of each row's greedy answer, 1.0 or 0.0, in the rows' order."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    n_rows = sum(len(batch.index) for batch in batches)
    hits = [[0.0] * n_rows for _ in range(copies)]
    contained = [[0.0] * n_rows for _ in range(copies)]
    with torch.inference_mode():
        for batch in batches:
            width = max(len(p) for p in batch.prompts)
            # Left padding for generation: generate derives positions from the attention mask.
            ids = torch.full((len(batch.prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, prompt in enumerate(batch.prompts):
                if prompt:
                    ids[i, width - len(prompt) :] = torch.tensor(prompt)
                    mask[i, width - len(prompt) :] = 1
            out = model.generate(
                input_ids=ids.repeat(copies, 1).to(device),
                attention_mask=mask.repeat(copies, 1).to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row, generated in enumerate(out[:, width:]):
                copy_index, i = divmod(row, len(batch.answers))
                answer = batch.answers[i] or ""
                text = tokenizer.decode(generated, skip_special_tokens=True)
                hits[copy_index][batch.index[i]] = float(normalize_answer(text) == normalize_answer(answer))
                contained[copy_index][batch.index[i]] = float(answer_contained(text, answer))
    return list(zip(hits, contained, strict=True))


def score(
    model: nn.Module,
    tokenizer,
    batches: list[Batch],
    with_exact_match: bool,
    max_new_tokens: int,
    choices: tuple[ChoiceSet, list[Batch]] | None = None,
    copies: int = 1,
) -> list[Score]:
    """The answer loss; greedy exact match and containment when asked; acc and acc_norm
    when `choices` (the choice set and its batches) are given: one Score per copy (one per
    condition of `shared.hooks.stacked_down_projections`)."""
    nll = row_answer_nll(model, batches, copies)
    generated = row_generation_hits(model, tokenizer, batches, max_new_tokens, copies) if with_exact_match else None
    accuracies = record_choice_hits(model, *choices, copies) if choices is not None else None
    scores = []
    for c, (sums, tokens) in enumerate(nll):
        em, inside = generated[c] if generated else (None, None)
        acc, acc_norm = accuracies[c] if accuracies else (None, None)
        rows = RowScores(
            tuple(total / max(count, 1) for total, count in zip(sums, tokens, strict=True)),
            tuple(tokens),
            *(tuple(values) if values is not None else None for values in (em, inside, acc, acc_norm)),
        )
        scores.append(
            Score(
                sum(sums) / sum(tokens),
                *(sum(values) / len(values) if values is not None else None for values in (em, inside, acc, acc_norm)),
                rows=rows,
            )
        )
    return scores
