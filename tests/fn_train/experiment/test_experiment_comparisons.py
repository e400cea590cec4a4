"""The experiment's answers on planted results: arms whose rows differ from their control's by a set
amount are found different with the right sign and an interval that holds it; the correction is the
named method's; the keystone sweep plans one arm and one control set per size."""

from __future__ import annotations

import numpy as np
import pytest

from fn_train.experiment.arms import NETWORKS, RunSpec, control_mask_path, plan_runs, size_label
from fn_train.experiment.comparisons import compare, planned_pairs
from fn_train.experiment.report import format_table, report
from shared.statistics import adjust

ROWS = 80


def _record(run: RunSpec, loss: np.ndarray, accuracy: np.ndarray, tokens: np.ndarray) -> dict:
    return {
        "arm": run.arm,
        "neurons": run.neurons,
        "seed": run.seed,
        "size": run.size,
        "group": run.group,
        "figures": {
            "task_loss": float(loss @ tokens / tokens.sum()),
            "task_accuracy": float(accuracy.mean()),
        },
        "rows": {"task": {"loss": loss.tolist(), "tokens": tokens.tolist(), "accuracy": accuracy.tolist()}},
    }


def _results(shift: dict[str, float], seeds: int, rng: np.random.Generator) -> tuple[dict, list[RunSpec]]:
    """Runs of lora and key (with two controls) over `seeds`: every group's per-row losses are the same
    row effects plus a seed effect and noise, shifted by `shift[group]`."""
    runs = plan_runs(["lora", "key"], ["layer", "magnitude"], list(range(seeds)), ["key"], [""])
    rows = rng.normal(2.0, 0.5, ROWS)
    tokens = rng.integers(2, 12, ROWS).astype(float)
    records = {}
    for run in runs:
        loss = rows + rng.normal(0, 0.02) + rng.normal(0, 0.05, ROWS) + shift.get(run.group, 0.0)
        accuracy = (rng.random(ROWS) < 0.6).astype(float)
        records[run.name] = _record(run, loss, accuracy, tokens)
    config = {"model": "m", "train_data": "t", "steps": 1, "seeds": list(range(seeds)), "correction": "holm",
              "target_difference": {"loss": 0.05, "accuracy": 0.05}}  # fmt: skip
    return {"config": config, "datasets": {"task": {"source": "t", "rows": ROWS, "accuracy": "acc"}},
            "runs": records}, runs  # fmt: skip


def test_planted_differences_are_found_with_their_sign_and_interval() -> None:
    results, runs = _results(
        {"key": 0.3, "key random-magnitude": 0.0, "key random-layer": 0.28}, 4, np.random.default_rng(0)
    )
    made = compare(results, runs)
    by = {(c["arm"], c["control"], c["figure"]): c for c in made["comparisons"]}
    magnitude = by[("key", "random-magnitude", "task_loss")]
    assert magnitude["shown"] and magnitude["estimate"] > 0 and magnitude["low"] <= 0.3 <= magnitude["high"]
    assert "key higher than random-magnitude" in magnitude["verdict"] and "(Holm)" in magnitude["verdict"]
    lora = by[("key", "lora", "task_loss")]
    assert lora["shown"] and lora["low"] <= 0.3 <= lora["high"]
    layer = by[("key", "random-layer", "task_loss")]  # 0.02 apart: within what these seeds can see
    assert layer["low"] <= 0.02 <= layer["high"]
    # Accuracy: the same distribution for every group: nothing shown, and the line says what could be.
    accuracy = by[("key", "random-magnitude", "task_accuracy")]
    assert not accuracy["shown"] and "no difference shown" in accuracy["verdict"]
    assert accuracy["detectable"] > 0
    assert "seeds would detect 0.05 (80% power)" in accuracy["verdict"] or "more rows are needed" in accuracy["verdict"]
    # Holm over every comparison of the table, as the named method computes it.
    assert [c["p_adjusted"] for c in made["comparisons"]] == pytest.approx(
        adjust([c["p_value"] for c in made["comparisons"]], "holm")
    )
    assert made["correction"] == "Holm" and len(made["comparisons"]) == 3 * 2


def test_the_table_opens_with_the_verdicts() -> None:
    results, runs = _results({"key": 0.3}, 3, np.random.default_rng(1))
    report(results, runs)
    table = format_table(results)
    first = table.splitlines()[0]
    assert first.startswith("answers: each arm minus its control, paired by seed (up to 3) and row")
    assert "Holm over the 6 comparisons" in first
    for comparison in results["comparisons"]["comparisons"]:
        assert comparison["verdict"] in table


@pytest.mark.parametrize(("base_accuracy", "flagged"), [(0.27, True), (0.62, False)])
def test_the_table_flags_a_base_model_at_chance_beside_the_accuracy_verdicts(base_accuracy: float, flagged: bool):
    """Planted four-way data of 80 records: a base model at 0.27 (chance 0.25) is flagged in the table and
    beside every verdict on that set's accuracy, not its loss; one at 0.62 is not."""
    from shared.chance import AT_CHANCE

    results, runs = _results({"key": 0.3}, 3, np.random.default_rng(1))
    results["datasets"]["task"].update(chance=0.25, choice_records=ROWS)
    results["before"] = {"task_loss": 2.0, "task_accuracy": base_accuracy}
    report(results, runs)
    assert results["chance"]["task"]["at_chance"] is flagged and results["chance"]["task"]["chance"] == 0.25
    table = format_table(results)
    assert f"chance 0.250 (1/choices, mean over {ROWS} records); base acc {base_accuracy:.3f} [" in table
    assert (f"warning: {AT_CHANCE}" in table) is flagged
    for comparison in results["comparisons"]["comparisons"]:
        (line,) = [line for line in table.splitlines() if line.startswith(comparison["verdict"])]
        assert line.endswith(f"[{AT_CHANCE}]") is (flagged and comparison["figure"] == "task_accuracy")


def test_benjamini_hochberg_is_used_when_named() -> None:
    results, runs = _results({"key": 0.3}, 3, np.random.default_rng(2))
    results["config"]["correction"] = "bh"
    made = compare(results, runs)
    assert made["correction"] == "Benjamini-Hochberg"
    assert [c["p_adjusted"] for c in made["comparisons"]] == pytest.approx(
        adjust([c["p_value"] for c in made["comparisons"]], "bh")
    )


def test_unrecorded_seeds_are_left_out_of_the_pairing() -> None:
    results, runs = _results({"key": 0.3}, 3, np.random.default_rng(3))
    del results["runs"]["key-random-layer-seed2"]
    made = compare(results, runs)
    seeds = {(c["control"], c["n_seeds"]) for c in made["comparisons"]}
    assert ("random-layer", 2) in seeds and ("random-magnitude", 3) in seeds


def test_keystone_sizes_plan_their_own_arms_controls_and_pairs(tmp_path) -> None:
    sizes = [size_label(0.001), size_label(25), size_label(None)]
    assert sizes == ["top 0.1%", "top 25", ""]
    runs = plan_runs(["lora", "tune"], ["magnitude"], [0], ["tune"], sizes)
    assert [run.group for run in runs] == [
        "lora", "tune top 0.1%", "tune top 0.1% random-magnitude", "tune top 25", "tune top 25 random-magnitude",
        "tune", "tune random-magnitude",
    ]  # fmt: skip
    assert len({run.name for run in runs}) == len(runs) and all(" " not in run.name for run in runs)
    pairs = [(pair.arm, pair.control) for pair in planned_pairs(runs)]
    assert pairs == [
        ("tune top 0.1%", "tune top 0.1% random-magnitude"), ("tune top 0.1%", "lora"),
        ("tune top 25", "tune top 25 random-magnitude"), ("tune top 25", "lora"),
        ("tune", "tune random-magnitude"), ("tune", "lora"),
    ]  # fmt: skip
    paths = {control_mask_path(tmp_path, "magnitude", 0, size) for size in sizes}
    assert len(paths) == 3
    assert [run.neurons for run in runs if run.size == "top 25"] == [NETWORKS, "random-magnitude"]


def test_identical_arms_are_said_to_have_no_spread_not_a_detectable_size() -> None:
    """A multiple-choice set the model answers the same way under every arm: the same row values
    everywhere give no interval to speak of, and the line must not claim a detectable size of 0."""
    results, runs = _results({"key": 0.3}, 3, np.random.default_rng(4))
    for record in results["runs"].values():
        record["rows"]["task"]["accuracy"] = [1.0] * ROWS
    made = {(c["control"], c["figure"]): c for c in compare(results, runs)["comparisons"]}
    flat = made[("random-magnitude", "task_accuracy")]
    assert flat["estimate"] == 0 and not flat["shown"] and flat["detectable"] is None
    assert flat["seeds_needed"] is None
    assert flat["verdict"].endswith("no spread: arm and control differ by the same amount on every row and seed, "
                                    "so there is nothing to test")  # fmt: skip
    assert made[("random-magnitude", "task_loss")]["shown"]  # the loss still has its spread and its answer
