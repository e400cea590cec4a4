"""Small synthetic instruction data for demos and smoke tests, written here (no corpus, no downloads).

Four task families with short answers that a small instruct model such as
SmolLM2-135M-Instruct can be measured on:

- ``facts``: capitals, colours, animal sounds and legs, opposites, day and month order;
- ``arithmetic``: additions, subtractions and multiplications with numbers below 20;
- ``sentiment``: templated movie and product reviews (some sarcastic), labelled positive/negative;
- ``continuation``: the next item of a number, letter, number-word, day or month run.

`sentiment.csv` holds the sentiment family again as classification data (question, choices,
answer as an index), scored by accuracy like SST-2 in Liu et al.

`general.jsonl` holds plain English prose (`{"text": ...}` records, see `fn_analyze.demo_prose`):
a retention set scored on every token, the general-text loss shift the forgetting literature
measures, which learning a short-answer format cannot pass for.

Everything is deterministic from a seed through `random.Random` instances (no global RNG).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fn_analyze.demo_prose import paragraphs
from shared.errors import UserError
from shared.jsonio import write_text_atomic

FAMILIES: tuple[str, ...] = ("facts", "arithmetic", "sentiment", "continuation")


@dataclass(frozen=True)
class QA:
    family: str
    question: str
    answer: str


# ---------------------------------------------------------------------------- facts

CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "the United Kingdom": "London",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Turkey": "Ankara",
    "Argentina": "Buenos Aires",
    "Kenya": "Nairobi",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Peru": "Lima",
}
COLOURS: dict[str, str] = {
    "grass": "green",
    "snow": "white",
    "the sky on a clear day": "blue",
    "a ripe banana": "yellow",
    "coal": "black",
    "blood": "red",
    "a lemon": "yellow",
    "chocolate": "brown",
    "a carrot": "orange",
    "a ripe tomato": "red",
    "milk": "white",
    "a frog": "green",
}
SOUNDS: dict[str, str] = {
    "a cow": "moo",
    "a dog": "woof",
    "a cat": "meow",
    "a sheep": "baa",
    "a duck": "quack",
    "a pig": "oink",
    "a horse": "neigh",
    "an owl": "hoot",
    "a lion": "roar",
    "a snake": "hiss",
    "a bee": "buzz",
}
LEGS: dict[str, str] = {
    "a dog": "4",
    "a spider": "8",
    "a bird": "2",
    "an ant": "6",
    "a cat": "4",
    "a chicken": "2",
    "a horse": "4",
    "a beetle": "6",
    "a person": "2",
    "a cow": "4",
    "a fly": "6",
    "a duck": "2",
}
OPPOSITES: dict[str, str] = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "old": "young",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "rich": "poor",
    "tall": "short",
    "strong": "weak",
    "good": "bad",
    "day": "night",
    "inside": "outside",
    "win": "lose",
}
DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS: tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


# Fact kinds answered by looking a key up in a table: question template and table.
LOOKUPS: dict[str, tuple[str, dict[str, str]]] = {
    "capital": ("What is the capital of {}?", CAPITALS),
    "colour": ("What colour is {}?", COLOURS),
    "sound": ("What sound does {} make?", SOUNDS),
    "legs": ("How many legs does {} have?", LEGS),
}


def _facts(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("capital", "colour", "sound", "legs", "opposite", "day", "month"))
    if kind in LOOKUPS:
        template, table = LOOKUPS[kind]
        key = rng.choice(list(table))
        return template.format(key), table[key]
    if kind == "opposite":
        a, b = rng.choice(list(OPPOSITES.items()))
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is the opposite of {a}?", b
    names, unit = (DAYS, "day") if kind == "day" else (MONTHS, "month")
    i = rng.randrange(len(names))
    if rng.random() < 0.5:
        return f"What {unit} comes after {names[i]}?", names[(i + 1) % len(names)]
    return f"What {unit} comes before {names[i]}?", names[i - 1]


# ---------------------------------------------------------------------------- arithmetic

OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(list(OPERATIONS))
    if op == "times":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
    else:
        a, b = rng.randint(1, 19), rng.randint(1, 19)
        if op == "minus" and a < b:
            a, b = b, a
    return f"What is {a} {op} {b}?", str(OPERATIONS[op](a, b))


# ---------------------------------------------------------------------------- sentiment

MOVIE_NOUNS: tuple[str, ...] = ("movie", "film", "sequel", "documentary", "show", "series")
PRODUCT_NOUNS: tuple[str, ...] = (
    "phone",
    "blender",
    "laptop",
    "vacuum cleaner",
    "coffee maker",
    "toaster",
    "keyboard",
    "backpack",
    "kettle",
    "printer",
)
ASPECTS: tuple[str, ...] = (
    "The acting",
    "The plot",
    "The soundtrack",
    "The ending",
    "The battery life",
    "The build quality",
    "The customer service",
    "The screen",
)
POSITIVE: tuple[str, ...] = (
    "wonderful",
    "fantastic",
    "excellent",
    "brilliant",
    "delightful",
    "superb",
    "amazing",
    "lovely",
    "great",
    "charming",
    "impressive",
)
NEGATIVE: tuple[str, ...] = (
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "dreadful",
    "horrible",
    "dull",
    "poor",
    "frustrating",
    "useless",
)
INTENSIFIERS: tuple[str, ...] = ("", "really ", "truly ", "absolutely ", "quite ")
POSITIVE_TAILS: tuple[str, ...] = (
    "Highly recommended.",
    "Five stars from me.",
    "Worth every penny.",
    "I would do it again in a heartbeat.",
    "I loved every minute of it.",
)
NEGATIVE_TAILS: tuple[str, ...] = (
    "I want my money back.",
    "One star.",
    "Avoid it.",
    "What a waste of money.",
    "Never again.",
)
SARCASM_MOVIE: tuple[str, ...] = (
    "Oh great, another two hours of my life I will never get back.",
    "Brilliant, I fell asleep twice during this {noun}.",
    "What a masterpiece, I checked my watch every five minutes.",
    "Wow, such an original {noun}, I guessed the ending after five minutes.",
)
SARCASM_PRODUCT: tuple[str, ...] = (
    "Oh wonderful, the {noun} broke after just one day.",
    "Just what I always wanted: a {noun} that stops working after a week.",
    "Fantastic, the {noun} arrived broken and the refund took a month.",
    "Great job, the {noun} lasted a whole afternoon.",
)
SENTIMENT_PROMPT = "Is the sentiment of this review positive or negative? Review: "


def _review(rng: random.Random, positive: bool) -> str:
    if not positive and rng.random() < 0.3:
        if rng.random() < 0.5:
            return rng.choice(SARCASM_MOVIE).format(noun=rng.choice(MOVIE_NOUNS))
        return rng.choice(SARCASM_PRODUCT).format(noun=rng.choice(PRODUCT_NOUNS))
    if rng.random() < 0.3:
        subject = rng.choice(ASPECTS)
    else:
        subject = f"{rng.choice(('The', 'This'))} {rng.choice(MOVIE_NOUNS + PRODUCT_NOUNS)}"
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    core = f"{subject} was {rng.choice(INTENSIFIERS)}{adj}."
    tail = rng.choice(POSITIVE_TAILS if positive else NEGATIVE_TAILS)
    shape = rng.randrange(4)
    if shape == 0:
        return core
    if shape == 1:
        return f"{core} {tail}"
    if shape == 2:
        return f"{tail} {core}"
    expected = rng.choice(NEGATIVE if positive else POSITIVE)
    return f"I expected it to be {expected}, but {subject[0].lower()}{subject[1:]} was {adj}."


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    return SENTIMENT_PROMPT + _review(rng, positive), "positive" if positive else "negative"


# ---------------------------------------------------------------------------- continuation

NUMBER_WORDS: tuple[str, ...] = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CONTINUATION_PROMPTS: tuple[str, ...] = ("Continue the sequence: ", "What comes next? ")


def _run(rng: random.Random, items: tuple[str, ...] | str, length: int, wrap: bool) -> list[str]:
    start = rng.randrange(len(items) if wrap else len(items) - length)
    return [items[(start + k) % len(items)] for k in range(length + 1)]


def _continuation(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("numbers", "letters", "words", "days", "months"))
    length = rng.randint(3, 5)
    if kind == "numbers":
        start, step = rng.randint(0, 20), rng.choice((1, 2, 3, 5, 10))
        run = [str(start + step * k) for k in range(length + 1)]
        if rng.random() < 0.25:
            run.reverse()
    elif kind == "letters":
        run = _run(rng, LETTERS, length, wrap=False)
        if rng.random() < 0.5:
            run = [c.upper() for c in run]
    elif kind == "words":
        run = _run(rng, NUMBER_WORDS, length, wrap=False)
    else:
        run = _run(rng, DAYS if kind == "days" else MONTHS, length, wrap=True)
    shown = ", ".join(run[:-1]) + ","
    return f"{rng.choice(CONTINUATION_PROMPTS)}{shown}", run[-1]


# ---------------------------------------------------------------------------- generation

_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "facts": _facts,
    "arithmetic": _arithmetic,
    "sentiment": _sentiment,
    "continuation": _continuation,
}
_MAX_TRIES = 1000  # draws spent looking for an unseen question before allowing a duplicate
_EXHAUSTED_TRIES = 20  # draws per slot once a family has run out of unseen questions


def _check(n: int, families: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(families, str):
        families = (families,)
    families = tuple(families)
    allowed = ", ".join(FAMILIES)
    if not families:
        raise UserError(f"no task families given; use one or more of {allowed}")
    for family in families:
        if family not in _GENERATORS:
            raise UserError(f"unknown task family {family!r}; use one or more of {allowed}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"number of examples must be an integer >= 1, got {n!r}")
    return families


def _draw(family: str, rng: random.Random, tries: int, seen: set[str], exclude: frozenset[str]) -> QA | None:
    """An unseen, non-excluded question; else a repeat of a non-excluded one; else None."""
    fallback = None
    for _ in range(tries):
        question, answer = _GENERATORS[family](rng)
        if question in exclude:
            continue
        if question not in seen:
            return QA(family, question, answer)
        fallback = fallback or QA(family, question, answer)
    return fallback


def _generate(n: int, rng: random.Random, families: tuple[str, ...], exclude: frozenset[str] = frozenset()) -> list[QA]:
    families = _check(n, families)
    seen: set[str] = set()
    exhausted: set[str] = set()
    out: list[QA] = []
    for i in range(n):
        qa = None
        for k in range(len(families)):  # round-robin; skip a family only if all it offers is excluded
            family = families[(i + k) % len(families)]
            qa = _draw(family, rng, _EXHAUSTED_TRIES if family in exhausted else _MAX_TRIES, seen, exclude)
            if qa is not None and qa.question in seen:
                exhausted.add(family)
            if qa is not None:
                break
        if qa is None:
            raise UserError(f"cannot generate {n} examples that avoid {len(exclude)} excluded questions")
        seen.add(qa.question)
        out.append(qa)
    return out


def generate(n: int, seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[QA]:
    """n examples, round-robin over families, deterministic from seed; no exact duplicate
    questions where the family's space allows (fall back gracefully when it doesn't)."""
    return _generate(n, random.Random(seed), families)


def _write_csv(path: Path, rows: list[QA]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["question", "answer"])
    writer.writerows([qa.question, qa.answer] for qa in rows)
    write_text_atomic(path, buffer.getvalue())


def _write_jsonl(path: Path, records: Iterable[dict[str, str]]) -> None:
    """One JSON object a line, with no column the tools would ignore (and warn about)."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


SENTIMENT_CHOICES: tuple[str, ...] = ("negative", "positive")  # the answer is the index of the label


def _write_sentiment_csv(path: Path, rows: list[QA]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["question", "choices", "answer"])
    choices = json.dumps(list(SENTIMENT_CHOICES))
    writer.writerows([qa.question, choices, SENTIMENT_CHOICES.index(qa.answer)] for qa in rows)
    write_text_atomic(path, buffer.getvalue())


def write_demo_data(
    out_dir: Path,
    seed: int = 0,
    n_collect: int = 400,
    n_train: int = 200,
    n_eval: int = 100,
    n_sentiment: int = 100,
    families: tuple[str, ...] = FAMILIES,
    n_general: int = 100,
) -> dict[str, Path]:
    """Write data.jsonl (n_collect records: question, answer), train.csv and eval.csv
    (header `question,answer`; eval questions disjoint from train) and sentiment.csv
    (n_sentiment reviews as `question,choices,answer`: choices ["negative", "positive"], answer
    the index of the right one; questions disjoint from train) and general.jsonl (n_general
    plain-text records `{"text": ...}`, 2-4 sentences of everyday prose each) into out_dir.

    `families` are those of train.csv and eval.csv: without sentiment, sentiment.csv is a retention
    set, a task the fine-tuning never saw (what `fn-train experiment` measures forgetting on);
    general.jsonl is a retention set whatever the families, as it is in no task's format.

    Each file uses its own seed derived from `seed` (sentiment.csv's is drawn after the first
    three's, general.jsonl's after sentiment.csv's, so the files written before them stay as they
    were). Returns {"collect", "train", "eval", "sentiment", "general"} -> path.
    """
    out_dir = Path(out_dir)
    derive = random.Random(seed)
    seed_collect, seed_train, seed_eval, seed_sentiment, seed_general = (derive.getrandbits(63) for _ in range(5))
    collect = generate(n_collect, seed_collect)
    train = generate(n_train, seed_train, families)
    seen = frozenset(qa.question for qa in train)
    evaluation = _generate(n_eval, random.Random(seed_eval), families, seen)
    sentiment = _generate(n_sentiment, random.Random(seed_sentiment), ("sentiment",), seen)
    general = paragraphs(n_general, random.Random(seed_general))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "collect": out_dir / "data.jsonl",
        "train": out_dir / "train.csv",
        "eval": out_dir / "eval.csv",
        "sentiment": out_dir / "sentiment.csv",
        "general": out_dir / "general.jsonl",
    }
    _write_jsonl(paths["collect"], ({"question": qa.question, "answer": qa.answer} for qa in collect))
    _write_csv(paths["train"], train)
    _write_csv(paths["eval"], evaluation)
    _write_sentiment_csv(paths["sentiment"], sentiment)
    _write_jsonl(paths["general"], ({"text": text} for text in general))  # a `text` column: loss on every token
    return paths
