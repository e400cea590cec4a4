"""Task accuracy: multiple-choice acc / acc_norm equal a hand computation from the model's logits;
answer containment; evaluate reports accuracy and its drop ratios beside the loss, under every ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fn_analyze.measure.evaluate import EvaluateConfig, evaluate
from fn_analyze.measure.scoring import (
    answer_contained,
    answer_logprobs,
    choice_accuracy,
    load_eval_set,
    make_batches,
    score,
)
from fn_analyze.report.eval_table import format_table
from shared.data import DataFormat, render_prompt, resolve_template, to_example
from shared.models import load_causal_lm, load_tokenizer
from tests.helpers.masks import write_mask
from tests.helpers.processes import refused_by_config
from tests.helpers.reports import assert_every_printed_figure_is_stored

CHOICES = ["negative", "positive", "mixed feelings"]


@pytest.fixture
def mc_file(tmp_path: Path) -> Path:
    rows = [
        {"question": "Is the sentiment of this review positive or negative? Review: The plot was dull.", "answer": 0},
        {"question": "Is the sentiment of this review positive or negative? Review: Superb.", "answer": "positive"},
        {"question": "How was it?", "answer": 2},
        {"question": "Is the sentiment positive? Review: I loved every minute of it.", "answer": 1},
        {"question": "Is the sentiment negative? Review: Never again.", "answer": 0},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({**row, "choices": CHOICES}) + "\n" for row in rows))
    return path


def _by_hand(model, tokenizer, mc_file: Path) -> tuple[list[list[float]], list[int]]:
    """Summed log-probabilities of each choice's tokens after the rendered prompt, one forward
    pass per (record, choice), straight from the logits."""
    template = resolve_template("auto", tokenizer)
    sums, gold = [], []
    for line in mc_file.read_text().splitlines():
        example = to_example(json.loads(line), DataFormat.MULTIPLE_CHOICE)
        prompt = render_prompt(example, template, tokenizer)
        context = tokenizer(prompt)["input_ids"]
        row = []
        for choice in example.choices:
            ids = tokenizer(prompt + choice)["input_ids"]
            n = next((i for i, (a, b) in enumerate(zip(context, ids, strict=False)) if a != b), len(context))
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            row.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(n, len(ids))))
        sums.append(row)
        gold.append(example.gold)
    return sums, gold


def test_accuracy_equals_a_hand_computation_from_the_logits(tiny_lm_dir: Path, mc_file: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    eval_set = load_eval_set(str(mc_file), tokenizer)
    assert eval_set.data_format == "multiple_choice" and eval_set.choices is not None
    assert [row.answer for row in eval_set.rows] == ["negative", "positive", "mixed feelings", "positive", "negative"]
    batches = make_batches(eval_set.choices, 4, tokenizer.pad_token_id)  # padded, sorted, prefix cached
    assert batches[0].shared_prefix > 0
    sums, gold = _by_hand(model, tokenizer, mc_file)
    batched = answer_logprobs(model, batches)
    assert [batched[i] for i in range(len(batched))] == pytest.approx([s for row in sums for s in row], rel=1e-4)
    best = [max(range(3), key=lambda i: (row[i], -i)) for row in sums]
    best_norm = [max(range(3), key=lambda i: (row[i] / len(CHOICES[i]), -i)) for row in sums]
    acc, acc_norm = choice_accuracy(model, eval_set.choices, batches)
    assert acc == sum(b == g for b, g in zip(best, gold, strict=True)) / 5
    assert acc_norm == sum(b == g for b, g in zip(best_norm, gold, strict=True)) / 5
    rows = score(model, tokenizer, make_batches(eval_set, 4, tokenizer.pad_token_id), False, 4,
                 (eval_set.choices, batches))[0].rows  # fmt: skip
    assert rows.accuracy == tuple(float(b == g) for b, g in zip(best, gold, strict=True))
    assert rows.accuracy_norm == tuple(float(b == g) for b, g in zip(best_norm, gold, strict=True))


def test_accuracy_follows_the_choice_the_model_prefers(tiny_lm_dir: Path, mc_file: Path) -> None:
    """The check can fail: make the model always prefer the first choice's first token."""
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    eval_set = load_eval_set(str(mc_file), tokenizer)
    batches = make_batches(eval_set.choices, 8, tokenizer.pad_token_id)
    first = tokenizer("negative")["input_ids"][0]
    with torch.no_grad():
        model.lm_head.weight[first] += 100 * model.model.norm.weight.sign()  # a large logit for it everywhere
    acc, _ = choice_accuracy(model, eval_set.choices, batches)
    assert acc == 2 / 5  # records 0 and 4 are negative


def test_answer_contained_in_the_generation() -> None:
    assert answer_contained("The capital of France is Paris.", "Paris")
    assert answer_contained("It is New Delhi, I think", "new delhi")
    assert not answer_contained("Parisian food", "Paris")  # whole words only
    assert not answer_contained("anything", "")


@pytest.mark.parametrize("ablation", ["zero", "mean", "scale"])
def test_evaluate_reports_accuracy_with_its_controls(
    tiny_lm_dir: Path, mc_file: Path, tmp_path: Path, ablation: str
) -> None:
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    mask = write_mask(model, {0: {0: list(range(30))}, 1: {1: list(range(40, 60))}}, tmp_path / "mask.json")
    config = EvaluateConfig(
        mask_file=mask,
        dataset=str(mc_file),
        model=str(tiny_lm_dir),
        out=tmp_path / "r.json",
        draws=2,
        device="cpu",
        ablation=ablation,
        random_fraction=0.15,
    )
    results = evaluate(config)
    assert results["ablation"]["mode"] == ablation and results["accuracy_metric"] == "accuracy"
    assert 0.0 <= results["baseline"]["accuracy"] <= 1.0 and "accuracy_norm" in results["baseline"]
    for row in results["conditions"]:
        assert "accuracy" in row and "accuracy_norm" in row
        for control in ("layer_matched", "magnitude_matched"):
            summary = row["controls"][control]
            assert "ratio" in summary and "accuracy_ratio" in summary and "accuracy" in summary
    random = results["random_fraction"]
    assert random["neurons"] == round(0.15 * 2 * 176) and random["draws"] == 2 and "accuracy" in random
    if ablation == "mean":
        assert "a pass over" in results["ablation"]["means_source"]
    if ablation == "scale":
        assert results["ablation"]["scale_factor"] == 2.0
    table = format_table(results)
    assert "accuracy (as Liu et al.’s SST-2 table)" in table and "random 15% of neurons masked" in table
    assert_every_printed_figure_is_stored(results, table)


def test_bad_evaluate_settings_are_refused(tmp_path: Path) -> None:
    refused_by_config(
        lambda: EvaluateConfig(mask_file=tmp_path / "m.json", dataset="x.csv", random_fraction=15),
        EvaluateConfig,
        "--random-fraction must lie between 0 and 1",
        python="random_fraction must lie between 0 and 1 (e.g. 0.15), got 15",
    )
    refused_by_config(  # mean: the default
        lambda: EvaluateConfig(mask_file=tmp_path / "m.json", dataset="x.csv", scale_factor=2.0),
        EvaluateConfig,
        "--scale-factor is given but --ablation is mean",
        python="scale_factor is given but ablation is mean; add ablation scale or drop scale_factor",
    )


def test_mean_ablation_with_activations_of_some_layers_is_refused_before_the_model_loads(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import fn_analyze.measure.evaluate as evaluate_module
    from fn_analyze.record.collect import CollectConfig, collect
    from shared.errors import UserError

    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    mask = write_mask(model, {0: {0: [1, 2, 3]}}, tmp_path / "mask.json")  # layer 0 only
    layer0 = tmp_path / "layer0"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=layer0, model=str(tiny_lm_dir), layers="0"))
    monkeypatch.setattr(evaluate_module, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    config = EvaluateConfig(
        mask_file=mask, dataset=str(demo_dir / "eval.csv"), model=str(tiny_lm_dir), out=tmp_path / "r.json"
    )
    with pytest.raises(UserError, match="lack layer 1, but --ablation mean needs every layer's means"):
        evaluate(EvaluateConfig(**{**config.__dict__, "activations": layer0, "ablation": "mean"}))
    assert not (tmp_path / "r.json").exists()
