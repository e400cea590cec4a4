"""Network cards: what each network responds to, read from its activity on recorded tokens.

A card holds, for one network of a mask file (and for the set-aside `massive` group): the tokens
where its activity (`fn_analyze.networks.activity`) is highest, each in its context (the tokens
either side in the same record, the token marked); the token ids that recur most among its most
active tokens; how those tokens spread over the records and positions; its size and layer
profile; and how its activity moves with the set-aside group's (the correlation over tokens).

`network_cards` returns `NetworkCards`: `str()` is the terminal text (`fn-analyze show --examples`),
and a notebook shows its `_repr_html_`; the report page (`fn_analyze.report.page`) embeds the same HTML.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.networks.activity import TokenActivity, network_activity
from fn_analyze.record.token_rows import TokenRows, read_source
from fn_analyze.report.show import layer_profile
from shared.masks import MASSIVE, MaskFile, Network, NetworkId, load_mask_file

TOP_POOL = 100  # the most active tokens that recurring tokens and the spread over records are counted on
SCAN_ROWS = 2000  # the most active tokens looked through for examples with distinct contexts
Decode = Callable[[Sequence[int]], str]
# The cards' own style, carried by their HTML so that a notebook shows them as the report page does.
CARD_STYLE = """
.network-cards td.ctx, .network-cards span.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.network-cards mark { background: #ffe066; font-weight: bold; }
.network-cards .card { border: 1px solid #ccc; border-radius: 6px; padding: .6rem .8rem; margin: .8rem 0; }
.network-cards .profile { display: flex; align-items: flex-end; height: 28px; gap: 1px; margin: .3rem 0; }
.network-cards .profile span { flex: 1; background: #4a78b5; min-width: 2px; }
.network-cards .axis { font-size: 11px; color: #666; margin: 0 0 .4rem; }
"""


@dataclass(frozen=True)
class Example:
    """One of a network's most active tokens, in its context."""

    activity: float
    record: int
    position: int
    token_id: int
    before: str  # the decoded tokens before it in its record (up to the context width)
    token: str
    after: str
    repeats: int = 0  # further tokens among the most active with this very context (not listed)

    def text(self) -> str:
        return f"{self.before}[[{self.token}]]{self.after}"


@dataclass(frozen=True)
class NetworkCard:
    id: NetworkId
    size: int
    layer_counts: tuple[int, ...]  # neurons per layer, 0 to n_layers - 1
    examples: tuple[Example, ...]
    lowest: Example  # the token where its activity is lowest (most negative), in its context
    recurring: tuple[tuple[str, int, int], ...]  # (token text, token id, count among the top pool), most first
    pool: int  # how many top tokens `recurring` and the spread count over
    distinct_records: int  # records among the pool's tokens
    top_records: tuple[tuple[int, int, str], ...]  # (record, tokens of the pool in it, its opening), most first
    first_position_share: float  # share of the pool's tokens at position 0 of their record
    spread: tuple[float, float, float]  # activity over all tokens: sd, max, the max in sds
    massive_correlation: float | None  # Pearson r with the massive group's activity; None: no such group

    @property
    def title(self) -> str:
        if self.id == MASSIVE:
            return f"set-aside massive neurons ({self.size})"
        return f"network {self.id} ({self.size} neurons)"


@dataclass(frozen=True)
class NetworkCards:
    """The cards of a mask file's networks on some tokens; print it, or let a notebook show it."""

    cards: tuple[NetworkCard, ...]
    mask_name: str
    source: str  # the tokens the activity was computed on
    n_layers: int

    def __str__(self) -> str:
        lines = [
            f"network cards of {self.mask_name}, on {self.source}",
            "activity: the token's centered activations projected on the network's map (docs/science.md)",
        ]
        for card in self.cards:
            lines.extend(["", *_card_lines(card)])
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = (
            f"<p class='cards-source'>On {html.escape(self.source)}. Activity: the token's centered activations "
            "projected on the network's map, restricted to its neurons; the token is <mark>marked</mark>.</p>"
        )
        cards = "".join(_card_html(card) for card in self.cards)
        return f"<div class='network-cards'><style>{CARD_STYLE}</style>{head}{cards}</div>"


def _card_lines(card: NetworkCard) -> list[str]:
    sd, peak, peak_sd = card.spread
    lines = [
        f"== {card.title}, {sum(1 for c in card.layer_counts if c)} layers |{layer_profile(list(card.layer_counts))}|",
        f"activity sd {sd:.3g}, max {peak:.3g} ({peak_sd:.1f} sd)" + _correlation_text(card),
        "most active tokens:",
    ]
    lines.extend(
        f"  {e.activity:>8.3g}  record {e.record:>5} pos {e.position:>3}  {_one_line(e.text())}{_repeats(e)}"
        for e in card.examples
    )
    low = card.lowest
    lines.append(
        f"lowest: {low.activity:.3g}  record {low.record} pos {low.position}  {_one_line(low.text())}{_repeats(low)}"
    )
    recurring = ", ".join(f"{_one_line(text)!r} x{count}" for text, _, count in card.recurring)
    lines.append(f"recurring among its top {card.pool}: {recurring}")
    records = "; ".join(f"{record} ({count}: {_one_line(opening)!r})" for record, count, opening in card.top_records)
    lines.append(
        f"spread: {card.distinct_records} records among its top {card.pool} tokens, "
        f"{100 * card.first_position_share:.0f}% at position 0; most: {records}"
    )
    return lines


def _repeats(example: Example) -> str:
    return f"  (and {example.repeats} more in this context)" if example.repeats else ""


def _correlation_text(card: NetworkCard) -> str:
    if card.massive_correlation is None or card.id == MASSIVE:
        return ""
    return f"; r with the set-aside massive group {card.massive_correlation:+.2f}"


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎")


def _context_html(example: Example) -> str:
    before, token, after = (html.escape(_one_line(part)) for part in (example.before, example.token, example.after))
    return f"{before}<mark>{token}</mark>{after}{html.escape(_repeats(example))}"


def _card_html(card: NetworkCard) -> str:
    sd, peak, peak_sd = card.spread
    rows = "".join(
        f"<tr><td class='num'>{e.activity:.3g}</td><td class='num'>{e.record}</td><td class='num'>{e.position}</td>"
        f"<td class='ctx'>{_context_html(e)}</td></tr>"
        for e in card.examples
    )
    recurring = ", ".join(
        f"<code>{html.escape(_one_line(text))}</code>&nbsp;×{count}" for text, _, count in card.recurring
    )
    records = "; ".join(
        f"{record} ({count}: <q>{html.escape(_one_line(opening))}</q>)" for record, count, opening in card.top_records
    )
    bars = "".join(
        f"<span style='height:{0 if not count else max(8, round(100 * count / max(card.layer_counts)))}%'"
        f" title='layer {layer}: {count}'></span>"
        for layer, count in enumerate(card.layer_counts)
    )
    return (
        f"<section class='card' data-network='{html.escape(str(card.id))}'>"
        f"<h3>{html.escape(card.title)}</h3>"
        f"<div class='profile' title='neurons per layer'>{bars}</div>"
        f"<p class='axis'>neurons per layer, 0 to {len(card.layer_counts) - 1}</p>"
        f"<p>activity sd {sd:.3g}, max {peak:.3g} ({peak_sd:.1f} sd){html.escape(_correlation_text(card))}</p>"
        "<table class='examples'><thead><tr><th>activity</th><th>record</th><th>pos</th><th>context</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
        f"<p><b>Lowest:</b> {card.lowest.activity:.3g} (record {card.lowest.record}, pos {card.lowest.position}) "
        f"<span class='ctx'>{_context_html(card.lowest)}</span></p>"
        f"<p><b>Recurring among its top {card.pool}:</b> {recurring}</p>"
        f"<p><b>Spread:</b> {card.distinct_records} records among its top {card.pool} tokens, "
        f"{100 * card.first_position_share:.0f}% at position 0; most: {records}</p>"
        "</section>"
    )


class _Records:
    """Token ids of every record, by position, to cut contexts from."""

    def __init__(self, activity: TokenActivity) -> None:
        order = np.lexsort((activity.positions, activity.records))
        self.records, self.positions = activity.records[order], activity.positions[order]
        self.token_ids = activity.token_ids[order]
        self.starts = {int(r): int(i) for r, i in zip(*np.unique(self.records, return_index=True), strict=True)}
        self.shared = self._shared_prefix()

    def around(self, record: int, position: int, width: int) -> tuple[list[int], int, list[int]]:
        """The recorded token ids before (up to `width`), at, and after the position in the record."""
        start = self.starts[record]
        stop = int(np.searchsorted(self.records, record, side="right"))
        here = start + int(np.searchsorted(self.positions[start:stop], position))
        ids = self.token_ids
        return (
            [int(i) for i in ids[max(start, here - width) : here]],
            int(ids[here]),
            [int(i) for i in ids[here + 1 : min(stop, here + 1 + width)]],
        )

    def _shared_prefix(self) -> int:
        """How many leading tokens every record has in common (a chat template's system prompt)."""
        firsts = sorted(self.starts.values())
        shortest = int(np.diff([*firsts, len(self.token_ids)]).min())
        shared = 0
        while shared < shortest and len({int(self.token_ids[a + shared]) for a in firsts}) == 1:
            shared += 1
        return min(shared, shortest - 1) if len(self.starts) > 1 else 0  # at least one token left to show

    def opening(self, record: int, width: int) -> list[int]:
        """The record's first tokens after the prefix all records share."""
        start = self.starts[record] + self.shared
        stop = int(np.searchsorted(self.records, record, side="right"))
        return [int(i) for i in self.token_ids[start : min(stop, start + width)]]


def _examples(
    activity: TokenActivity, values: np.ndarray, order: np.ndarray, records: _Records, decode: Decode, top: int,
    context: int,
) -> list[Example]:  # fmt: skip
    """The `top` most active tokens with distinct contexts; tokens with the same context as one already
    taken (every record's first token, say) count into its `repeats` instead, over at most SCAN_ROWS rows."""
    taken: dict[str, Example] = {}
    for row in order[:SCAN_ROWS]:
        record, position = int(activity.records[row]), int(activity.positions[row])
        before, at, after = records.around(record, position, context)
        key = f"{before}|{at}|{after}"
        if key in taken:
            taken[key] = replace(taken[key], repeats=taken[key].repeats + 1)
            continue
        if len(taken) == top:
            continue
        taken[key] = Example(float(values[row]), record, position, at, decode(before), decode([at]), decode(after))
    return list(taken.values())


def decoder_for(model_name: str) -> Decode:
    """Token ids -> text with the model's tokenizer, or `#id` per token when it has none (a synthetic model)."""
    from shared.errors import UserError
    from shared.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_name)
    except (UserError, OSError, ValueError):
        return lambda ids: "".join(f" #{i}" for i in ids)
    return lambda ids: tokenizer.decode(list(ids))


def cards_from_activity(
    mask: MaskFile,
    activity: TokenActivity,
    decode: Decode,
    top: int = 10,
    context: int = 6,
    mask_name: str = "the mask file",
) -> NetworkCards:
    """The cards of the networks `activity` holds: `top` examples each, `context` tokens either side."""
    records = _Records(activity)
    by_id: dict[Any, Network] = {network.id: network for network in mask.networks}
    massive = mask.massive()
    if massive is not None:
        by_id[MASSIVE] = massive
    reference = activity.of(MASSIVE) if MASSIVE in activity.ids else None
    cards = []
    for j, network_id in enumerate(activity.ids):
        values = activity.activity[:, j]
        order = np.argsort(-values, kind="stable")
        pool = order[: min(TOP_POOL, len(order))]
        examples = _examples(activity, values, order, records, decode, top, context)
        counted = Counter(int(activity.token_ids[row]) for row in pool).most_common(5)
        in_records = Counter(int(activity.records[row]) for row in pool).most_common(3)
        sd = float(values.std())
        peak = float(values.max()) if len(values) else 0.0
        network = by_id[network_id]
        cards.append(
            NetworkCard(
                id=network_id,
                size=network.size,
                layer_counts=tuple(len(network.layers.get(layer, ())) for layer in range(mask.model.n_layers)),
                examples=tuple(examples),
                lowest=_examples(activity, values, order[::-1], records, decode, 1, context)[0],
                recurring=tuple((decode([token]), token, count) for token, count in counted),
                pool=len(pool),
                distinct_records=len({int(activity.records[row]) for row in pool}),
                top_records=tuple((record, count, decode(records.opening(record, 8))) for record, count in in_records),
                first_position_share=float(np.mean(activity.positions[pool] == 0)) if len(pool) else 0.0,
                spread=(sd, peak, peak / sd if sd > 0 else 0.0),
                massive_correlation=_correlation(values, reference),
            )
        )
    return NetworkCards(tuple(cards), mask_name, activity.source, mask.model.n_layers)


def _correlation(values: np.ndarray, reference: np.ndarray | None) -> float | None:
    if reference is None or values.std() == 0 or reference.std() == 0:
        return None
    return float(np.corrcoef(values, reference)[0, 1])


def network_cards(
    mask: MaskFile | str | Path,
    rows: TokenRows | str | Path,
    networks: Sequence[NetworkId] | None = None,
    top: int = 10,
    context: int = 6,
    decode: Decode | None = None,
) -> NetworkCards:
    """The cards of a mask file's networks (default all, and the set-aside `massive` group) on token rows:
    an activations folder, an `ActivationMatrix`, or `model_rows(CollectConfig(...))` for a model run over
    a dataset. `decode` turns token ids into text (default: the model's tokenizer)."""
    mask_name = str(mask) if isinstance(mask, (str, Path)) else mask.model.name
    mask = load_mask_file(Path(mask)) if isinstance(mask, (str, Path)) else mask
    source = read_source(rows)
    activity = network_activity(mask, source, networks)
    if decode is None:
        decode = decoder_for(mask.model.name)
    return cards_from_activity(mask, activity, decode, top, context, mask_name)
