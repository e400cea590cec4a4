"""Chance level of a multiple-choice accuracy, and whether a model's accuracy is told apart from it.

A model that picks a choice at random is right on a record of k choices with probability 1/k, so its
expected accuracy on a set is the mean of 1/k over the records: the *chance level*. A base model whose
accuracy cannot be told from that level knows nothing the set measures, and every comparison of
accuracies on the set (tuned against base, networks off against random neurons) compares noise.

"At chance" is decided by the accuracy's own interval: the Wilson score interval (Wilson 1927, J. Am.
Statist. Assoc. 22:209-212; the binomial interval recommended by Brown, Cai & DasGupta 2001, Statist.
Sci. 16:101-133) of the records answered right, at 95%. When its lower end reaches the chance level
(or the whole interval lies below it), the accuracy is not shown to be above chance: the flag is up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

AT_CHANCE = "the base model is at chance on this set: accuracy comparisons on it are noise"


@dataclass(frozen=True)
class ChanceLevel:
    """A model's accuracy on a multiple-choice set next to the set's chance level."""

    chance: float  # mean over the records of 1 / (the record's number of choices)
    accuracy: float
    low: float  # the accuracy's Wilson interval
    high: float
    records: int
    confidence: float

    @property
    def at_chance(self) -> bool:
        """The accuracy's interval reaches the chance level or lies below it."""
        return self.low <= self.chance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at_chance": self.at_chance}


def chance_level(choice_counts: Sequence[int], accuracy: float, confidence: float = 0.95) -> ChanceLevel:
    """The chance level of records with `choice_counts` choices each, and `accuracy` (the share of those
    records answered right) with its Wilson interval."""
    return against_chance(chance_of(choice_counts), len(choice_counts), accuracy, confidence)


def chance_of(choice_counts: Sequence[int]) -> float:
    """The mean over the records of 1 / (the record's number of choices)."""
    if not choice_counts or min(choice_counts) < 1:
        raise ValueError(f"every record needs at least one choice, got counts {list(choice_counts)[:5]}")
    return sum(1 / count for count in choice_counts) / len(choice_counts)


def against_chance(chance: float, records: int, accuracy: float, confidence: float = 0.95) -> ChanceLevel:
    """`accuracy` over `records` records, with its Wilson interval, next to the set's `chance` level."""
    right = round(accuracy * records)
    interval = stats.binomtest(right, records).proportion_ci(confidence_level=confidence, method="wilson")
    return ChanceLevel(chance, float(accuracy), float(interval.low), float(interval.high), records, confidence)


def at_chance(record: dict[str, Any] | None) -> bool:
    """Whether a results JSON's chance record (`ChanceLevel.to_dict`; None where the set is not multiple
    choice) flags its model."""
    return bool(record and record["at_chance"])


def chance_text(record: dict[str, Any], who: str = "base") -> str:
    """A results JSON's chance record in one line, e.g. `chance 0.250 (1/choices, mean over 100 records);
    base acc 0.270 [0.193, 0.364] (95% Wilson): at chance`."""
    word = "at chance" if record["at_chance"] else "above chance"
    return (
        f"chance {record['chance']:.3f} (1/choices, mean over {record['records']} records); {who} acc "
        f"{record['accuracy']:.3f} [{record['low']:.3f}, {record['high']:.3f}] ({record['confidence']:.0%} Wilson): "
        f"{word}"
    )
