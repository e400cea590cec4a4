"""fn-analyze evaluate on a tiny model: answer-token loss, matched random sets, determinism, report files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fn_analyze.measure.evaluate as evaluate_module
from fn_analyze.config import PrunedEvalConfig, TunedEvalConfig
from fn_analyze.measure.evaluate import EvaluateConfig, evaluate, summarize_control
from fn_analyze.measure.scoring import (
    RowScores,
    Score,
    answer_loss,
    load_eval_set,
    make_batches,
    normalize_answer,
    score,
)
from fn_analyze.neurons.magnitude import stats_from_activations
from fn_analyze.neurons.neuron_sets import draw_matched, pairs
from fn_analyze.record.collect import CollectConfig, collect
from fn_analyze.report.eval_table import format_table, ratio_text, verdict
from fn_analyze.report.plots import plot_evaluation
from shared.errors import UserError
from shared.models import load_causal_lm, load_tokenizer, model_info
from tests.helpers.activations import write_activations
from tests.helpers.masks import write_mask
from tests.helpers.processes import refused, refused_by_config
from tests.helpers.reports import assert_every_printed_figure_is_stored, assert_png

NETWORKS = {0: {0: list(range(0, 30))}, 1: {0: [100, 101], 1: list(range(40, 60))}, 2: {1: [5, 6, 7]}}


@pytest.fixture
def tiny_mask(tiny_lm_dir: Path, tmp_path: Path) -> Path:
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    return write_mask(model, NETWORKS, tmp_path / "mask.json")


@pytest.fixture
def record_draws(monkeypatch) -> list[tuple[dict, np.ndarray, np.ndarray, dict]]:
    """Every (matched set, strata, allowed, drawn set) evaluate draws."""
    calls: list[tuple[dict, np.ndarray, np.ndarray, dict]] = []

    def recording(neurons, strata, allowed, rng):
        drawn = draw_matched(neurons, strata, allowed, rng)
        calls.append((neurons, strata, allowed, drawn))
        return drawn

    monkeypatch.setattr(evaluate_module, "draw_matched", recording)
    return calls


def _config(tiny_lm_dir: Path, demo_dir: Path, mask: Path, out: Path, **kwargs) -> EvaluateConfig:
    return EvaluateConfig(
        mask_file=mask,
        dataset=str(demo_dir / "eval.csv"),
        model=str(tiny_lm_dir),
        out=out,
        draws=2,
        network_draws=1,
        device="cpu",
        **kwargs,
    )


def _cell_counts(neurons: dict, strata: np.ndarray) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for layer, ns in neurons.items():
        for n in ns:
            key = (layer, int(strata[layer, n]))
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.slow  # about 8 s: an evaluation with every network's controls
def test_random_sets_match_each_network_per_layer_and_magnitude_bin(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path, record_draws
) -> None:
    results = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "r.json", bin_width=0.05))
    # 3 conditions of the union (key, complement) with 2 draws x 2 controls, 3 networks with 1 x 2.
    assert len(record_draws) == 2 * 2 * 2 + 3 * 2
    layer_matched = [call for call in record_draws if not call[1].any()]
    magnitude_matched = [call for call in record_draws if call[1].any()]
    assert len(layer_matched) == len(magnitude_matched) == 7
    for neurons, strata, _allowed, drawn in record_draws:
        assert {layer: len(ns) for layer, ns in drawn.items()} == {layer: len(ns) for layer, ns in neurons.items()}
        assert _cell_counts(drawn, strata) == _cell_counts(neurons, strata)
        assert all(len(set(ns)) == len(ns) for ns in drawn.values())
    # Fine bins on a random model: the magnitude-matched sets are not the networks themselves.
    assert any(pairs(drawn) != pairs(neurons) for neurons, _, _, drawn in magnitude_matched)
    union = results["conditions"][0]
    assert (union["name"], union["mode"], union["neurons"]) == ("union of 3 networks", "key", 55)
    assert [(c["name"], c["mode"]) for c in results["conditions"][1:]] == [
        ("union of 3 networks", "complement"),
        ("network 0", "key"),
        ("network 1", "key"),
        ("network 2", "key"),
    ]
    assert union["controls"]["layer_matched"]["draws"] == 2
    assert results["conditions"][2]["controls"]["magnitude_matched"]["draws"] == 1


def test_union_only_measures_the_union_rows_alone_and_the_same(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path, record_draws
) -> None:
    every = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "a.json"))
    drawn_with_networks = len(record_draws)
    unions = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "b.json", per_network=False))
    assert [(c["kind"], c["mode"]) for c in unions["conditions"]] == [("union", "key"), ("union", "complement")]
    assert len(record_draws) - drawn_with_networks == 2 * 2 * 2  # no network's own draws
    assert unions["conditions"] == every["conditions"][:2]  # each condition's draws are its own stream


@pytest.mark.slow  # about 20 s: three evaluations
def test_seed_makes_evaluation_deterministic(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path
) -> None:
    first = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "a.json", networks="0,1"))
    again = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "b.json", networks="0,1"))
    other = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "c.json", networks="0,1", seed=1))
    assert first["conditions"] == again["conditions"] and first["baseline"] == again["baseline"]
    losses = [c["controls"]["layer_matched"]["losses"] for c in first["conditions"]]
    assert losses != [c["controls"]["layer_matched"]["losses"] for c in other["conditions"]]
    # The condition itself does not depend on the seed, only its random sets do.
    assert [c["loss"] for c in first["conditions"]] == [c["loss"] for c in other["conditions"]]


def test_json_holds_every_figure_the_table_prints(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval" / "res.json"
    results = evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, out, exact_match=True, max_new_tokens=3))
    assert json.loads(out.read_text()) == results
    assert_every_printed_figure_is_stored(results, format_table(results))
    assert_png(out.with_suffix(".png"))
    assert "exact_match" in results["baseline"]
    assert "exact_match" in results["conditions"][0]["controls"]["magnitude_matched"]
    # Every condition's ratio over every control carries its interval, rank and draws, for the loss and
    # for the headline accuracy (here: the answer contained in the generation).
    for row in results["conditions"]:
        for summary in row["controls"].values():
            for ratio in (summary["ratio"], summary["accuracy_ratio"]):
                assert ratio["n_draws"] == summary["draws"] and ratio["n_rows"] == results["dataset"]["rows"]
                assert 0 <= ratio["rank"] <= ratio["n_draws"] and "resamples" in ratio["method"]
                assert ratio["denominator_low"] <= ratio["denominator"] <= ratio["denominator_high"]
                if ratio["readable"]:
                    assert ratio["low"] <= ratio["high"]
                else:
                    assert ratio["value"] is ratio["low"] is ratio["high"] is None
        assert summary["accuracy_ratio"]["lower_is_better"] is False
    table = format_table(results)
    assert table.index("verdicts, against the magnitude-matched") < table.index("\ncondition ")
    assert "union of 3 networks off vs magnitude-matched: " in table and "network 2 off vs" in table


def test_answer_loss_is_the_models_loss_on_the_answer_tokens(tiny_lm_dir: Path, demo_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    eval_set = load_eval_set(str(demo_dir / "eval.csv"), tokenizer, limit=6)
    row = eval_set.rows[0]
    # The chat template renders the answer, then the end of the assistant's turn.
    assert tokenizer.decode(row.input_ids[row.n_prompt :]) == f"{row.answer}<|im_end|>\n"
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for row in eval_set.rows:
            ids = torch.tensor([row.input_ids])
            labels = ids.clone()
            labels[:, : row.n_prompt] = -100
            n = int((labels[:, 1:] != -100).sum())
            expected_total += float(model(input_ids=ids, labels=labels).loss) * n
            expected_count += n
    batches = make_batches(eval_set, 4, tokenizer.pad_token_id)
    assert batches[0].shared_prefix > 0  # the rows' common start is run once and its cache reused
    batched = answer_loss(model, batches)
    assert batched == pytest.approx(expected_total / expected_count, rel=1e-5)
    rows = score(model, tokenizer, batches, False, 4)[0].rows
    assert sum(rows.tokens) == expected_count and len(rows.loss) == len(eval_set.rows)
    with torch.no_grad():  # each row's own loss, in the eval set's order (the batches sort them by length)
        for row, loss, count in zip(eval_set.rows, rows.loss, rows.tokens, strict=True):
            ids = torch.tensor([row.input_ids])
            labels = ids.clone()
            labels[:, : row.n_prompt] = -100
            assert count == int((labels[:, 1:] != -100).sum())
            assert loss == pytest.approx(float(model(input_ids=ids, labels=labels).loss), rel=1e-4)


def test_plain_template_learns_eos_and_plain_text_is_scored_on_every_token(tiny_lm_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("question,answer\nWhat is 2 plus 2?,4\n")
    plain = load_eval_set(str(csv_file), tokenizer, template_format="plain").rows[0]
    assert plain.input_ids[-1] == tokenizer.eos_token_id and plain.answer == "4"
    text_file = tmp_path / "text.jsonl"
    text_file.write_text('{"text": "one two three"}\n')
    text_set = load_eval_set(str(text_file), tokenizer)
    assert text_set.rows[0].n_prompt == 0 and not text_set.has_answers
    assert text_set.n_answer_tokens == len(text_set.rows[0].input_ids) - 1


def test_normalized_exact_match() -> None:
    assert normalize_answer(" The  Paris. ") == normalize_answer("paris") == "paris"
    assert normalize_answer("New Delhi") != normalize_answer("Delhi")


def test_magnitudes_from_activations_exclude_top_and_are_cached(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path, monkeypatch, record_draws
) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    acts = tmp_path / "acts"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=acts, model=str(tiny_lm_dir), device="cpu"))
    model = load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"))
    info = model_info(model, "tiny")
    magnitude = stats_from_activations(acts, info, ["max_abs"]).magnitude()
    assert not list((tmp_path / "cache").rglob("*.npy"))  # measured, written nowhere unless asked
    assert np.array_equal(stats_from_activations(acts, info, ["max_abs"], cache=True).max_abs, magnitude.max_abs)
    (stored,) = (tmp_path / "cache" / "neuron-stats").glob("*-max_abs.npy")  # kept: read once, then from the cache
    np.save(stored, np.ones_like(magnitude.max_abs))
    assert np.array_equal(stats_from_activations(acts, info, ["max_abs"]).max_abs, np.ones_like(magnitude.max_abs))
    np.save(stored, magnitude.max_abs)
    from fn_analyze.record.activations import open_activations

    peak = np.max([np.abs(block).max(axis=0) for block in open_activations(acts).blocks(10_000)], axis=0)
    np.testing.assert_allclose(magnitude.max_abs.ravel(), peak)
    top = magnitude.top(20)
    flat = sorted(peak.tolist(), reverse=True)
    assert len(top) == 20 and min(magnitude.max_abs[layer, n] for layer, n in top) == flat[19]
    assert np.array_equal(stats_from_activations(acts, info, ["max_abs"]).max_abs, magnitude.max_abs)

    results = evaluate(
        _config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "r.json", activations=acts, top_n=20, exclude_top=True)
    )
    held = len({(layer, n) for network in NETWORKS.values() for layer, ns in network.items() for n in ns} & top)
    assert results["conditions"][0]["top_magnitude_held"] == held
    assert results["conditions"][0]["neurons"] == 55 - held
    for neurons, _, allowed, drawn in record_draws:
        assert not pairs(neurons) & top and not pairs(drawn) & top
        assert all(not allowed[layer, n] for layer, n in top)
    assert results["magnitude"]["excluded"] and "activations" in results["magnitude"]["source"]


def test_unfit_activations_are_refused_before_the_model_loads(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    acts = write_activations(tmp_path / "acts", np.ones((4, 2 * 176)), [0, 1], 176)
    monkeypatch.setattr(evaluate_module, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError, match="were recorded on 'synthetic'"):
        evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "r.json", activations=acts))
    layer0 = tmp_path / "layer0"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=layer0, model=str(tiny_lm_dir), layers="0"))
    with pytest.raises(UserError, match="lack layer 1, where the selected networks have neurons"):
        evaluate(_config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / "r.json", activations=layer0))
    assert not (tmp_path / "r.json").exists()


def test_config_rejects_bad_values(tiny_mask: Path) -> None:
    refused_by_config(
        lambda: EvaluateConfig(mask_file=tiny_mask, dataset="x.csv", draws=0),
        EvaluateConfig,
        "--draws must be at least 1",
        python="draws must be at least 1, got 0",
    )
    refused_by_config(
        lambda: EvaluateConfig(mask_file=tiny_mask, dataset="x.csv", out=Path("results.png")),
        EvaluateConfig,
        r"^--out results\.png must end in \.json",
    )
    refused_by_config(
        lambda: EvaluateConfig(mask_file=tiny_mask, dataset="x.csv", bin_width=0),
        EvaluateConfig,
        "--bin-width must be positive",
    )


def test_evaluate_command_prints_the_table_and_refuses_bad_input(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fn_analyze.cli import app

    runner = CliRunner()
    base = ["evaluate", "--mask-file", str(tiny_mask), "--dataset", str(demo_dir / "eval.csv")]
    base += ["--model", str(tiny_lm_dir), "--draws", "1", "--limit", "4", "--device", "cpu"]
    result = runner.invoke(app, [*base, "--networks", "1", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "network 1" in result.output and "magnitude-matched" in result.output
    for legend in ("for complement (only they kept), lower is better", "n/r: not readable", "rank: how many"):
        assert legend in result.output  # the table's marks are explained: n/r, rank, top100, (n)
    # A verdict on each condition at the top, and with one draw the interval says it resamples the rows only.
    verdicts = result.output.split("verdicts, against the magnitude-matched random sets:")[1].split("\ncondition ")[0]
    assert "network 1 off vs magnitude-matched: " in verdicts
    assert "network 1 kept alone vs magnitude-matched: " in verdicts
    assert "one random set: only rows are resampled" in verdicts
    stored = json.loads((tmp_path / "r.json").read_text())
    for row in stored["conditions"]:
        for summary in row["controls"].values():
            ratio = summary["ratio"]
            assert (ratio["n_draws"], ratio["n_rows"]) == (1, 4) and ratio["method"].startswith("row bootstrap")
            assert (ratio["value"] is None) == (not ratio["readable"])
    assert "top100: the condition's neurons among the 100 largest" in result.output and "(n) after" in result.output
    assert_png(tmp_path / "r.png")
    again = runner.invoke(app, [*base, "--networks", "1", "--out", str(tmp_path / "r.json")])
    refused(again, f"--out {tmp_path / 'r.json'} already exists; pass --overwrite to replace it")
    replaced = runner.invoke(app, [*base, "--networks", "1", "--out", str(tmp_path / "r.json"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    unknown = runner.invoke(app, [*base, "--networks", "9"])
    assert unknown.exit_code == 2 and "network id 9 is not in the mask file" in unknown.output
    bad_draws = runner.invoke(app, [*base, "--draws", "0"])
    assert bad_draws.exit_code == 2 and "--draws must be at least 1" in bad_draws.output


def test_the_default_results_file_is_named_after_the_mask_and_the_data(tiny_mask: Path) -> None:
    """Another dataset's run must not replace these results: the data's name is in the file's."""
    assert EvaluateConfig(mask_file=tiny_mask, dataset="demo/eval.csv").out == Path("runs/eval/mask-eval.json")
    assert EvaluateConfig(mask_file=tiny_mask, dataset="org/sst2").out == Path("runs/eval/mask-sst2.json")


def test_each_use_of_evaluate_has_a_config_of_the_fields_it_reads(tiny_mask: Path) -> None:
    tuned = TunedEvalConfig("demo/eval.csv", Path("runs/tuned"), retention="demo/sentiment.csv")
    pruned = PrunedEvalConfig("demo/eval.csv", Path("runs/pruned"), draws=2)
    assert (tuned.out, pruned.out) == (
        Path("runs/eval/tuned-tuned-eval.json"),
        Path("runs/eval/pruned-pruned-eval.json"),
    )
    for config, lacks in (
        (tuned, ("mask_file", "pruned", "networks", "keystone", "draws", "seed")),
        (pruned, ("mask_file", "tuned", "retention", "model", "networks", "ablation")),
        (EvaluateConfig("demo/eval.csv", tiny_mask), ("tuned", "pruned", "retention")),
    ):
        assert not any(hasattr(config, name) for name in lacks), config
    with pytest.raises(TypeError, match="mask_file"):
        TunedEvalConfig(dataset="d.csv", tuned=Path("t"), mask_file=tiny_mask)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="keystone"):
        PrunedEvalConfig(dataset="d.csv", pruned=Path("p"), keystone=5)  # type: ignore[call-arg]
    refused_by_config(
        lambda: PrunedEvalConfig(dataset="d.csv", pruned=Path("p"), draws=0),
        PrunedEvalConfig,
        "--draws must be at least 1",
    )


@pytest.mark.parametrize(
    ("use", "expected", "runner", "formatter"),
    [
        (["--mask-file", "m.json", "--networks", "0"], EvaluateConfig("d.csv", Path("m.json"), networks="0", limit=3),
         "measure.evaluate.evaluate", "report.eval_table.format_table"),
        (["--tuned", "t", "--retention", "r.csv"], TunedEvalConfig("d.csv", Path("t"), retention="r.csv", limit=3),
         "measure.tuned.evaluate_tuned", "measure.tuned.format_tuned_table"),
        (["--pruned", "p", "--draws", "2"], PrunedEvalConfig("d.csv", Path("p"), draws=2, limit=3),
         "prune.pruned_eval.evaluate_pruned", "prune.pruned_eval.format_pruned_table"),
        (["--tuned", "t", "u", "--retention", "r.csv"],
         TunedEvalConfig("d.csv", [Path("t"), Path("u")], retention="r.csv", limit=3),
         "measure.tuned.evaluate_tuned", "measure.tuned.format_tuned_table"),
        (["--tuned", "t", "--retention", "r.csv", "--tuned=u"],
         TunedEvalConfig("d.csv", [Path("t"), Path("u")], retention="r.csv", limit=3),
         "measure.tuned.evaluate_tuned", "measure.tuned.format_tuned_table"),
    ],
    ids=["mask", "tuned", "pruned", "tuned-after-one-flag", "tuned-one-flag-each"],
)  # fmt: skip
def test_the_command_builds_the_config_of_the_use_given(use, expected, runner, formatter, monkeypatch) -> None:
    """The options given choose the use; its config holds them, and its own defaults for the rest."""
    from typer.testing import CliRunner

    from fn_analyze.cli import app

    built = []
    monkeypatch.setattr("shared.early_checks.check_inputs", lambda settings: None)  # the paths are names only
    monkeypatch.setattr(f"fn_analyze.{runner}", built.append)
    monkeypatch.setattr(f"fn_analyze.{formatter}", lambda results: "table")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "d.csv", *use, "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert built == [expected] and f"table\nresults: {expected.out}" in result.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--tuned", "t", "--keystone", "50"], ("--keystone selects or measures networks, which --tuned does not",)),
        (["--tuned", "t", "--draws", "5"], ("--draws selects or measures networks or scores a pruned folder",)),
        (["--pruned", "p", "--union-only"], ("--union-only selects or measures networks", "drop --union-only")),
        (["--pruned", "p", "--model", "m"], ("--model", "which --pruned does not")),
        (["--mask-file", "m.json", "--retention", "r.csv"], ("--retention scores a fine-tuned folder",)),
        (["--pruned", "p", "--tuned", "t"], ("give --mask-file (measure networks) or --tuned", "exactly one")),
        ([], ("give --mask-file (measure networks) or --tuned", "exactly one")),
    ],
    ids=["keystone-tuned", "draws-tuned", "union-only-pruned", "model-pruned", "retention-mask", "two-uses", "none"],
)
def test_an_option_of_another_use_is_refused(args: list[str], fragments: tuple[str, ...]) -> None:
    from typer.testing import CliRunner

    from fn_analyze.cli import app

    refused(CliRunner().invoke(app, ["evaluate", "--dataset", "d.csv", *args]), *fragments)


def test_magnitude_matched_draw_keeps_a_lone_massive_neuron_and_respects_exclusion() -> None:
    from fn_analyze.neurons.magnitude import NeuronMagnitude

    max_abs = np.full((2, 40), 2.0)
    max_abs[0, 7] = 3000.0  # a massive neuron, alone in its bin
    max_abs[1, :20] = 0.0  # dead neurons share one bin
    magnitude = NeuronMagnitude(max_abs, "test", 10)
    bins = magnitude.bins(0.1)
    assert len(set(bins[0].tolist())) == 2 and len(set(bins[1].tolist())) == 2
    assert magnitude.top(1) == {(0, 7)}
    allowed = np.ones_like(max_abs, dtype=bool)
    allowed[0, 30:] = False
    neurons = {0: (3, 7), 1: (0, 25)}
    for seed in range(20):
        drawn = draw_matched(neurons, bins, allowed, np.random.default_rng(seed))
        assert 7 in drawn[0] and all(n < 30 for n in drawn[0])
        assert sum(n < 20 for n in drawn[1]) == 1 and len(drawn[1]) == 2
    assert draw_matched(neurons, bins, allowed, np.random.default_rng(1)) == draw_matched(
        neurons, bins, allowed, np.random.default_rng(1)
    )


def _figures(results: dict) -> list[tuple[str, float]]:
    """Every loss and accuracy of a results dict, by where it sits (baseline, conditions, their draws)."""
    found = []
    fields = ("loss", "exact_match", "contains", "accuracy", "accuracy_norm")
    for where, scored in [("baseline", results["baseline"])] + [
        (c["name"] + c["mode"], c) for c in results["conditions"]
    ]:
        found += [(f"{where}.{name}", scored[name]) for name in fields if name in scored]
        for control, summary in scored.get("controls", {}).items():
            found += [(f"{where}.{control}.{i}", loss) for i, loss in enumerate(summary["losses"])]
            found += [(f"{where}.{control}.{name}", summary[name]) for name in fields[1:] if name in summary]
    if results["random_fraction"] is not None:
        found += [(f"random.{i}", loss) for i, loss in enumerate(results["random_fraction"]["losses"])]
    return found


@pytest.mark.parametrize(
    ("dataset", "options"),
    [
        # about 10 s each: with generation, and with accuracy on every choice
        pytest.param("eval.csv", dict(ablation="zero", exact_match=True, max_new_tokens=3), marks=pytest.mark.slow),
        pytest.param("sentiment.csv", dict(ablation="mean", random_fraction=0.15), marks=pytest.mark.slow),
        ("eval.csv", dict(ablation="scale")),
    ],
)
def test_masks_scored_together_give_what_one_mask_a_pass_gives(
    tiny_lm_dir: Path, demo_dir: Path, tiny_mask: Path, tmp_path: Path, dataset: str, options: dict
) -> None:
    results = {}
    for per_pass in (1, 3):  # 3: the chunks cut across conditions and their controls
        config = _config(tiny_lm_dir, demo_dir, tiny_mask, tmp_path / f"{per_pass}.json", conditions_per_pass=per_pass)
        config.dataset, config.limit = str(demo_dir / dataset), 12
        for name, value in options.items():
            setattr(config, name, value)
        config.__post_init__()
        results[per_pass] = evaluate(config)
    alone, together = _figures(results[1]), _figures(results[3])
    assert [name for name, _ in alone] == [name for name, _ in together] and len(alone) >= 20
    for (name, one), (_, three) in zip(alone, together, strict=True):
        assert three == pytest.approx(one, rel=1e-5, abs=1e-6), name  # float rounding of larger products only
    assert [c["closed_layers"] for c in results[1]["conditions"]] == [
        c["closed_layers"] for c in results[3]["conditions"]
    ]


def test_random_sets_leave_out_the_set_aside_neurons_and_the_massive_group_is_measured(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, record_draws
) -> None:
    from shared.masks import MaskFile, load_mask_file, save_mask_file

    plain = load_mask_file(
        write_mask(load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu")), NETWORKS, tmp_path / "p.json")
    )
    set_aside = {0: [30, 31, 32], 1: [0, 1]}  # next to network 0's neurons, in the layers the networks use
    source = {"ica": {"set_aside": {"size": 5, "layers": {str(k): v for k, v in set_aside.items()}}}}
    mask_path = tmp_path / "aside.json"
    save_mask_file(MaskFile(plain.model, plain.networks, source), mask_path)
    aside_pairs = {(layer, n) for layer, ns in set_aside.items() for n in ns}
    results = evaluate(_config(tiny_lm_dir, demo_dir, mask_path, tmp_path / "r.json", per_network=False))
    assert results["magnitude"]["set_aside_left_out"] == 5
    assert record_draws and not any(pairs(drawn) & aside_pairs for _, _, _, drawn in record_draws)
    assert all(not allowed[layer, n] for _, _, allowed, _ in record_draws for layer, n in aside_pairs)
    record_draws.clear()
    massive = evaluate(_config(tiny_lm_dir, demo_dir, mask_path, tmp_path / "m.json", networks="massive"))
    assert [(c["name"], c["networks"], c["neurons"]) for c in massive["conditions"]][0] == (
        "network massive",
        ["massive"],
        5,
    )
    assert all(allowed[layer, n] for _, _, allowed, _ in record_draws for layer, n in aside_pairs)


def _planted(harm: float, control_harms: list[float], noise: float, rows: int = 60) -> tuple[Score, Score, list[Score]]:
    """(base, condition, random sets) scored on the same rows: the condition `harm` above the base on
    every row and each random set its own harm, each row jittered by `noise`."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 6, size=rows)
    base_rows = 2.0 + rng.normal(0.0, 0.3, size=rows)

    def scored(values: np.ndarray) -> Score:
        loss = float(values @ tokens / tokens.sum())
        return Score(loss, None, rows=RowScores(tuple(values.tolist()), tuple(tokens.tolist())))

    shifted = [scored(base_rows + h + rng.normal(0.0, noise, size=rows)) for h in [harm, *control_harms]]
    return scored(base_rows), shifted[0], shifted[1:]


def _results(conditions: list[dict]) -> dict:
    """The fields of a results JSON the table reads, around `conditions`."""
    return {
        "model": "planted",
        "dataset": {"source": "rows", "split": "test", "rows": 60, "answer_tokens": 180, "choice_records": 0,
                    "held_out": None},
        "baseline": {"loss": 2.0, "perplexity": 7.39},
        "magnitude": {"statistic": "max |activation|", "source": "planted", "top_n": 100, "top_smallest": 1.0,
                      "top_largest": 2.0, "excluded": False, "set_aside_left_out": 0},
        "ablation": {"mode": "mean", "scale_factor": None, "means_source": "planted"},
        "accuracy_metric": None,
        "conditions": conditions,
        "random_fraction": None,
        "skipped": [],
    }  # fmt: skip


def _condition(name: str, mode: str, result: Score, controls: dict) -> dict:
    return {"name": name, "kind": "network", "mode": mode, "networks": [3], "neurons": 10, "layers": 1,
            "top_magnitude_held": 0, "closed_layers": [], "loss": result.loss, "perplexity": 7.4,
            "controls": controls}  # fmt: skip


def test_a_ratio_over_random_sets_that_add_no_loss_beyond_noise_is_not_readable_and_not_printed(
    tmp_path: Path,
) -> None:
    base, result, noise_sets = _planted(0.5, [0.01, -0.01, 0.005, -0.005, 0.0], noise=0.05)
    unreadable = summarize_control(noise_sets, [0.0] * 5, result, base, seed=0)
    ratio = unreadable["ratio"]
    assert not ratio["readable"] and ratio["value"] is ratio["low"] is ratio["high"] is None
    assert ratio["denominator_low"] < 0 < ratio["denominator_high"]
    json.dumps(unreadable, allow_nan=False)  # the JSON holds no NaN or infinity in its place
    assert ratio_text(ratio) == "n/r"
    line = verdict("network 3", "key", "magnitude_matched", ratio, "extra loss")
    assert line.startswith("network 3 off vs magnitude-matched: not readable: the random sets' extra loss is within")
    assert not re.search(r"\dx", line)  # no ratio printed
    _, _, clear_sets = _planted(0.5, [0.1, 0.12, 0.09, 0.11, 0.1], noise=0.01)
    readable = summarize_control(clear_sets, [0.0] * 5, result, base, seed=0)
    results = _results([_condition("network 3", "key", result, {"layer_matched": readable,
                                                                "magnitude_matched": unreadable})])  # fmt: skip
    table = format_table(results)
    (row,) = [line for line in table.splitlines() if line.startswith("network 3 ")]
    assert row.count("n/r") == 1 and ratio_text(readable["ratio"]) in row
    assert f"  {line}" in table and "n/r: not readable" in table
    plot_evaluation(results, tmp_path / "planted.png")
    assert_png(tmp_path / "planted.png")


def _planted_choices(accuracy: float, records: int = 100) -> Score:
    """A multiple-choice score of `records` records, the first `accuracy` share of them right."""
    right = round(accuracy * records)
    hits = tuple([1.0] * right + [0.0] * (records - right))
    losses = tuple(2.0 + 0.01 * (i % 7) for i in range(records))
    rows = RowScores(losses, (1,) * records, accuracy=hits, accuracy_norm=hits)
    return Score(float(np.mean(losses)), None, accuracy=right / records, accuracy_norm=right / records, rows=rows)


@pytest.mark.parametrize(("base_accuracy", "flagged"), [(0.27, True), (0.62, False)])
def test_the_network_table_flags_a_base_model_at_chance(base_accuracy: float, flagged: bool) -> None:
    """Planted four-way data: a base at 0.27 (chance 0.25) is flagged, in the header and beside the accuracy
    verdict; one at 0.62 is not."""
    from shared.chance import AT_CHANCE, chance_level

    base = _planted_choices(base_accuracy)
    off, controls = _planted_choices(base_accuracy - 0.2), [_planted_choices(base_accuracy - 0.05)] * 3
    summary = summarize_control(controls, [0.0] * 3, off, base, seed=0)
    condition = {**_condition("union of 2 networks", "key", off, {"magnitude_matched": summary}), "kind": "union",
                 "accuracy": off.accuracy, "accuracy_norm": off.accuracy_norm}  # fmt: skip
    results = _results([condition])
    results["dataset"]["choice_records"] = 100
    results.update(
        accuracy_metric="accuracy",
        baseline={"loss": base.loss, "perplexity": 7.4, "accuracy": base.accuracy, "accuracy_norm": base.accuracy},
        chance=chance_level([4] * 100, base_accuracy).to_dict(),
    )
    table = format_table(results)
    assert f"chance 0.250 (1/choices, mean over 100 records); base acc {base_accuracy:.3f} [" in table
    (accuracy_verdict,) = [line for line in table.splitlines() if "accuracy lost" in line and " vs " in line]
    assert (f"warning: {AT_CHANCE}" in table) is flagged
    assert accuracy_verdict.endswith(f"[{AT_CHANCE}]") is flagged
    assert ("): at chance" in table) is flagged and ("): above chance" in table) is not flagged
    assert re.search(r"chance \(1/choices, mean over the records\) +- +0\.250 +0\.250", table)


def test_verdicts_read_each_mode_in_its_own_direction() -> None:
    base, switched_off, controls = _planted(0.3, [0.1, 0.12, 0.09, 0.11, 0.1], noise=0.01)
    key = summarize_control(controls, [0.0] * 5, switched_off, base, seed=0)["ratio"]
    assert key["readable"] and 1 < key["low"] < key["value"] < key["high"]
    assert key["value"] == pytest.approx(3.0, rel=0.05)
    assert key["rank"] == 0 and key["n_draws"] == 5  # no random set loses as much as the network
    assert verdict("network 3", "key", "magnitude_matched", key, "extra loss").endswith(
        "0 of 5 random sets with as much: above one (more than random neurons of its size)"
    )
    _, kept_alone, _ = _planted(0.03, [], noise=0.01)
    complement = summarize_control(controls, [0.0] * 5, kept_alone, base, seed=0)["ratio"]
    assert complement["high"] < 1 and complement["rank"] == 5
    line = verdict("union of 2 networks", "complement", "magnitude_matched", complement, "extra loss")
    assert line.startswith("union of 2 networks kept alone vs magnitude-matched: 0.")
    assert line.endswith("5 of 5 random sets with as much: below one (it alone keeps the model better than random)")
    unclear = summarize_control(controls, [0.0] * 5, _planted(0.105, [], noise=0.01)[1], base, seed=0)["ratio"]
    assert verdict("network 3", "key", "layer_matched", unclear, "extra loss").endswith(
        "not shown (the interval holds one)"
    )
    # By default a network's own row draws enough random sets for its interval to hold their spread.
    assert EvaluateConfig(mask_file=Path("m.json"), dataset="d.csv").network_draws == 5
