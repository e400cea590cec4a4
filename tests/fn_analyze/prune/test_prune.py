"""fn-analyze prune: a physically pruned tiny model equals the original with the pruned neurons set to
their means (or zero) through the mask hooks, to float32 rounding (atol 1e-5 on logits of size ~1);
it loads with a plain from_pretrained; its remapped mask works with fn-train and evaluate; the
networks' neurons are kept first; bad input is refused in one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.config import CollectConfig, PruneConfig
from fn_analyze.neurons.magnitude import NeuronStats, stats_from_activations
from fn_analyze.prune.importance import importance
from fn_analyze.prune.pruning import choose_at_random, choose_by_importance, keep_count, prune, prune_model
from fn_analyze.record.collect import collect
from shared.ablation import Ablation, NeuronMeans
from shared.arch import find_down_projections
from shared.constants import PRUNE_MASK_NAME, PRUNE_NEURONS_NAME, PRUNE_RECORD_NAME
from shared.errors import UserError
from shared.hooks import count_hooks
from shared.layer_masks import LayerMasks
from shared.masked_model import MaskedModel
from shared.masks import check_compatible, load_mask_file
from shared.models import model_info
from tests.helpers.masks import write_mask
from tests.helpers.processes import refused
from tests.helpers.tiny_models import forward_logits, intermediate_size, random_ids, tiny_model

TOLERANCE = 1e-5  # float32: the pruned matmul sums fewer terms, in another order, than the masked one
PRUNABLE = ("llama", "gpt2", "gpt_neox", "opt", "phi")  # a down-projection bias, or a config that turns one on


def _means(model) -> np.ndarray:
    """Made-up means, large enough that dropping a neuron's mean visibly changes the logits."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 3.0, size=(model.config.num_hidden_layers, intermediate_size(model.config)))


def _kept(model, keep: float = 0.6) -> np.ndarray:
    size = intermediate_size(model.config)
    rng = np.random.default_rng(1)
    n = keep_count(keep, size)
    return np.stack([np.sort(rng.choice(size, n, replace=False)) for _ in range(model.config.num_hidden_layers)])


def _masked_logits(model, kept: np.ndarray, means: np.ndarray | None, ids: torch.Tensor) -> torch.Tensor:
    """The original model's logits with every neuron not in `kept` set to its mean (or zero) by the hooks."""
    size = intermediate_size(model.config)
    vectors = {}
    for layer, row in enumerate(kept):
        vector = torch.zeros(size)
        vector[torch.as_tensor(row)] = 1.0
        vectors[layer] = vector
    layer_masks = LayerMasks(vectors, (), int(sum(int((v == 0).sum()) for v in vectors.values())))
    ablation = Ablation() if means is None else Ablation("mean", means=NeuronMeans(means.astype(np.float32), "t", 1))
    with MaskedModel.from_layer_masks(model, ablation.apply(layer_masks)):
        return forward_logits(model, ids)


@pytest.mark.parametrize("compensate", [True, False], ids=["mean-compensated", "zero"])
@pytest.mark.parametrize("model_type", PRUNABLE)
def test_pruned_model_equals_the_masked_original(model_type: str, compensate: bool) -> None:
    original = tiny_model(model_type)
    ids = random_ids(original)
    kept, means = _kept(original), _means(original)
    expected = _masked_logits(original, kept, means if compensate else None, ids)
    unmasked = forward_logits(original, ids)
    pruned = tiny_model(model_type)
    prune_model(pruned, kept, means if compensate else None)
    got = forward_logits(pruned, ids)
    assert count_hooks(pruned) == 0
    assert [p.in_features for p in find_down_projections(pruned)] == [kept.shape[1]] * kept.shape[0]
    assert (expected - unmasked).abs().max() > 100 * TOLERANCE  # the pruning changes the model
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("model_type", PRUNABLE)
def test_pruned_model_loads_with_plain_from_pretrained(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    ids, kept = random_ids(model), _kept(model)
    prune_model(model, kept, _means(model))
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert intermediate_size(loaded.config) == kept.shape[1] < intermediate_size(tiny_model(model_type).config)
    saved = model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()  # as tiny_model
    torch.testing.assert_close(forward_logits(eager, ids), forward_logits(model, ids), atol=0, rtol=0)


def test_an_architecture_without_a_down_projection_bias_is_refused_compensation() -> None:
    model = tiny_model("qwen2")
    kept = _kept(model)
    with pytest.raises(UserError, match="qwen2's down-projection has none .* prune with --no-compensate"):
        prune_model(model, kept, _means(model))
    prune_model(model, kept)  # without compensation it prunes
    assert find_down_projections(model)[0].in_features == kept.shape[1]


def test_a_fused_gate_and_up_projection_loses_both_halves_of_a_neuron() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "phi3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config).eval()
    pruned = AutoModelForCausalLM.from_config(config).eval()
    pruned.load_state_dict(original.state_dict())
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    kept = np.stack([np.sort(np.random.default_rng(layer).choice(96, 40, replace=False)) for layer in range(2)])
    expected = _masked_logits(original, kept, None, ids)
    prune_model(pruned, kept)
    assert pruned.model.layers[0].mlp.gate_up_proj.out_features == 80 and pruned.config.intermediate_size == 40
    torch.testing.assert_close(forward_logits(pruned, ids), expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_importance_keeps_networks_first_then_the_largest() -> None:
    scores = np.array([[5.0, 1.0, 4.0, 3.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    chosen = choose_by_importance(scores, {0: (5,), 1: (0, 1, 2, 3)}, 3)
    # layer 0: the network's neuron 5 (score 0), then 0 and 2; layer 1: 4 network neurons for 3 places.
    np.testing.assert_array_equal(chosen.kept, [[0, 2, 5], [1, 2, 3]])
    assert chosen.networks_cut == {1: 1}


def test_random_choice_is_seeded_and_counts_the_lost_network_neurons() -> None:
    first = choose_at_random(3, 50, 20, {0: tuple(range(50))}, seed=4)
    assert (first.kept == choose_at_random(3, 50, 20, {}, seed=4).kept).all()
    assert not (first.kept == choose_at_random(3, 50, 20, {}, seed=5).kept).all()
    assert first.networks_cut == {0: 30}


def test_importance_is_variance_times_column_norm_when_compensated() -> None:
    model = tiny_model("llama")
    projections = find_down_projections(model)
    size = intermediate_size(model.config)
    mean = np.full((2, size), 2.0)
    moments = NeuronStats(None, mean, mean**2 + 0.25, "t", 1)  # variance 0.25, E[a^2] 4.25
    norms = np.stack([(p.module.weight.detach().double() ** 2).sum(0).numpy() for p in projections])
    np.testing.assert_allclose(importance(moments, projections, compensated=True), 0.25 * norms)
    np.testing.assert_allclose(importance(moments, projections, compensated=False), 4.25 * norms)


def _write_mask(model_dir: Path, path: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    size = intermediate_size(model.config)
    return write_mask(model, {0: {0: list(range(0, size, 4)), 1: [1, 2, 3]}, 1: {1: list(range(100, 120))}}, path)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("prune")
    mask = _write_mask(tiny_lm_dir, folder / "mask.json")
    prune(PruneConfig(mask_file=mask, keep=0.5, out=folder / "pruned", model=str(tiny_lm_dir),
                      dataset=str(demo_dir / "eval.csv"), device="cpu"))  # fmt: skip
    return folder / "pruned"


def test_prune_from_activations_caches_its_moments_and_needs_every_layer(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    mask = _write_mask(tiny_lm_dir, tmp_path / "mask.json")
    data = str(demo_dir / "data.jsonl")
    for name, layers in (("acts", None), ("half", "1")):
        collect(CollectConfig(dataset=data, out=tmp_path / name, model=str(tiny_lm_dir), layers=layers, device="cpu"))
    common = dict(mask_file=mask, keep=0.5, model=str(tiny_lm_dir), device="cpu")
    with pytest.raises(UserError, match="lack layer 0, and pruning ranks the neurons of every layer"):
        prune(PruneConfig(out=tmp_path / "p0", activations=tmp_path / "half", **common))
    prune(PruneConfig(out=tmp_path / "p", activations=tmp_path / "acts", **common))
    record = json.loads((tmp_path / "p" / PRUNE_RECORD_NAME).read_text())
    assert record["measured_on"].startswith(f"activations {tmp_path / 'acts'} (")
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "neuron-stats").iterdir())
    assert cached == ["mean.npy", "mean_square.npy"]  # written by the command, read by the next call
    stats = stats_from_activations(tmp_path / "acts", load_mask_file(mask).model, ["mean"])
    np.testing.assert_array_equal(np.load(tmp_path / "p" / PRUNE_NEURONS_NAME)["means"], stats.mean)


def test_prune_writes_a_plain_model_its_provenance_and_a_remapped_mask(pruned_dir: Path, tiny_lm_dir: Path) -> None:
    record = json.loads((pruned_dir / PRUNE_RECORD_NAME).read_text())
    assert record["intermediate_size"] == {"before": 176, "after": 88}
    assert record["compensation"] and record["selection"] == "networks first, then importance"
    assert record["mask_digest"].startswith("sha256:") and "eval.csv" in record["measured_on"]
    assert record["network_neurons"] == {"selected": 67, "kept": 67, "cut_per_layer": {}}
    assert record["parameters"]["after"] < record["parameters"]["before"]
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert model.config.intermediate_size == 88 and model.config.mlp_bias
    stored = np.load(pruned_dir / PRUNE_NEURONS_NAME)
    kept = stored["kept"]
    assert kept.shape == (2, 88) and stored["importance"].shape == (2, 176)  # the importance it ranked on
    # The remapped mask fits the pruned model (and not the original) and names the same neurons.
    remapped = load_mask_file(pruned_dir / PRUNE_MASK_NAME)
    check_compatible(remapped, model_info(model, str(pruned_dir)))
    original = load_mask_file(pruned_dir.parent / "mask.json")
    for old, new in zip(original.networks, remapped.networks, strict=True):
        assert old.id == new.id and old.size == new.size
        for layer, neurons in new.layers.items():
            assert [int(kept[layer][n]) for n in neurons] == list(old.layers[layer])
    with pytest.raises(UserError, match="intermediate_size"):
        check_compatible(original, model_info(model, str(pruned_dir)))


def test_fn_train_runs_on_the_pruned_model_with_its_mask(pruned_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    from fn_train.trainer import train
    from tests.helpers.training import small_run

    out = tmp_path / "ft"
    train(small_run(pruned_dir, demo_dir, out, pruned_dir / PRUNE_MASK_NAME, max_steps=2, networks="0"))
    assert (out / "fn_mask.json").is_file()


def test_the_command_prunes_and_refuses_bad_input(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    mask = _write_mask(tiny_lm_dir, tmp_path / "mask.json")
    base = ["prune", "--model", str(tiny_lm_dir), "--mask-file", str(mask), "--device", "cpu"]
    data = ["--dataset", str(demo_dir / "eval.csv")]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--keep", "0.7", "--out", str(tmp_path / "p"), *data])
    assert result.exit_code == 0, result.output
    assert "176 -> 123" in result.output and (tmp_path / "p" / PRUNE_RECORD_NAME).is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private folder
    refused(runner.invoke(app, [*base, "--keep", "0.7", "--out", str(tmp_path / "p"), *data]), "--overwrite")
    refused(runner.invoke(app, [*base, "--keep", "1.5", "--out", str(tmp_path / "q"), *data]), "--keep")
    refused(runner.invoke(app, [*base, "--keep", "0.5", "--out", str(tmp_path / "q")]), "--dataset")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused(runner.invoke(app, [*base, "--keep", "0.5", "--out", str(tmp_path / "other"), *data]), "did not write")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # --random --no-compensate needs no data; --overwrite replaces an earlier prune.
    result = runner.invoke(app, [*base, "--keep", "0.5", "--out", str(tmp_path / "p"), "--random",
                                 "--no-compensate", "--overwrite"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "p" / PRUNE_RECORD_NAME).read_text())
    assert record["selection"] == "random (seed 0)" and not record["compensation"]
    assert not list(tmp_path.glob(".p.*"))  # no staging folder left


def test_evaluate_scores_the_pruned_model_next_to_the_original_and_random_prunings(
    pruned_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    args = ["evaluate", "--pruned", str(pruned_dir), "--dataset", str(demo_dir / "eval.csv"), "--draws", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    original, pruned, drawn, alone = results["rows"]
    assert [row["name"] for row in results["rows"]] == ["original", "pruned", "random pruning", "importance only"]
    assert original["parameters"] > pruned["parameters"] == drawn["parameters"] == alone["parameters"]
    assert len(drawn["losses"]) == 2 and drawn["losses"][0] != drawn["losses"][1]
    assert all(np.isfinite(row["loss"]) for row in results["rows"]) and pruned["loss"] != original["loss"]
    assert "random pruning (2 draws)" in result.output and f"{pruned['loss']:.4f}" in result.output
    # The prefill speed of both models, measured in this run, and the figure beside the results.
    speed = results["prefill_speed"]
    assert set(speed["tokens_per_second"]) == {"original", "pruned"}
    assert all(rate > 0 for rate in speed["tokens_per_second"].values())
    assert all(len(seconds) == 7 for seconds in speed["seconds"].values())  # --speed-rounds' default
    assert speed["speedup"]["pruned"] > 0 and speed["batch"]["sequences"] >= 1
    assert f"original {speed['tokens_per_second']['original']:,.0f}, pruned" in result.output
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert results["chance"] is None  # question/answer data: no choices, no chance level
    assert 0 < alone["share_kept_alike"] < 1 and alone["loss"] != pruned["loss"]  # the networks changed the choice
    # The pruned model against each control, paired by rows: importance alone over the rows (one model
    # each), the random prunings over the rows and the draws.
    by_control = {c["control"]: c for c in results["comparisons"] if c["figure"] == "loss"}
    assert by_control["importance only"]["draws"] == 1 and by_control["random pruning"]["draws"] == 2
    for control, row in (("importance only", alone), ("random pruning", drawn)):
        comparison = by_control[control]
        assert comparison["estimate"] == pytest.approx(pruned["loss"] - row["loss"], abs=1e-9)
        assert comparison["low"] < comparison["estimate"] < comparison["high"]
        assert comparison["rows"] == results["dataset"]["rows"] and comparison["method"]
        assert f"pruned - {control}, loss: {comparison['estimate']:+.4f} [" in result.output
    # The first random draw of seed 0 is the model `prune --random` keeps, scored alike.
    mask = pruned_dir.parent / "mask.json"
    config = PruneConfig(mask_file=mask, keep=0.5, out=tmp_path / "random", model=results["base_model"],
                         dataset=str(demo_dir / "eval.csv"), random=True, device="cpu")  # fmt: skip
    prune(config)
    again = CliRunner().invoke(app, [*args[:2], str(tmp_path / "random"), *args[3:], "--out", str(tmp_path / "r.json"),
                                     "--device", "cpu"])  # fmt: skip
    assert again.exit_code == 0, again.output
    randomly = json.loads((tmp_path / "r.json").read_text())
    assert randomly["rows"][1]["loss"] == pytest.approx(drawn["losses"][0])
    assert "importance only" not in [row["name"] for row in randomly["rows"]]
    assert randomly["left_out"] == {"importance only": "the folder was pruned at random, by no importance"}
    assert "importance only: left out, the folder was pruned at random" in again.output


def test_the_importance_only_control_keeps_each_layers_most_important_neurons(
    pruned_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import fn_analyze.prune.pruned_eval as pruned_eval
    from fn_analyze.config import PrunedEvalConfig

    pruned_with: list[np.ndarray] = []

    def recording(model, kept, means=None):
        pruned_with.append(kept)
        prune_model(model, kept, means)

    monkeypatch.setattr(pruned_eval, "prune_model", recording)
    config = PrunedEvalConfig(pruned=pruned_dir, dataset=str(demo_dir / "eval.csv"), draws=1, limit=4,
                              out=tmp_path / "e.json", device="cpu")  # fmt: skip
    results = pruned_eval.evaluate_pruned(config)
    stored = np.load(pruned_dir / PRUNE_NEURONS_NAME)
    ranked, folder = stored["importance"], stored["kept"]
    assert len(pruned_with) == 2  # one random draw, then importance alone
    alone = pruned_with[-1]
    for layer, kept in enumerate(alone):
        assert len(kept) == 88 and ranked[layer][kept].min() >= np.delete(ranked[layer], kept).max()
    assert not np.array_equal(alone, folder)  # the folder kept the networks' neurons first
    shared = sum(len(np.intersect1d(a, b)) for a, b in zip(alone, folder, strict=True)) / folder.size
    assert results["rows"][-1]["share_kept_alike"] == pytest.approx(shared)


def test_evaluate_refuses_a_folder_that_is_not_a_pruned_model(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "x").mkdir()
    args = ["evaluate", "--pruned", str(tmp_path / "x"), "--dataset", str(demo_dir / "eval.csv")]
    refused(CliRunner().invoke(app, [*args, "--out", str(tmp_path / "e.json")]), "fn-analyze prune")
    refused(CliRunner().invoke(app, [*args, "--networks", "0"]), "--networks", "--pruned")


def test_evaluate_measures_the_networks_on_the_pruned_model_with_its_mask(
    pruned_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "networks.json"
    args = ["evaluate", "--model", str(pruned_dir), "--mask-file", str(pruned_dir / PRUNE_MASK_NAME),
            "--dataset", str(demo_dir / "eval.csv"), "--draws", "1", "--union-only", "--out", str(out),
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    union = json.loads(out.read_text())["conditions"][0]
    assert union["neurons"] == 67 and np.isfinite(union["loss"])
    original_mask = ["--mask-file", str(pruned_dir.parent / "mask.json")]
    again = [*args[:3], *original_mask, *args[5:], "--overwrite"]
    refused(CliRunner().invoke(app, again), "intermediate_size", progress_bars=True)
    one_row = ["evaluate", "--pruned", str(pruned_dir), "--dataset", str(demo_dir / "eval.csv"), "--limit", "1",
               "--out", str(tmp_path / "one.json"), "--device", "cpu"]  # fmt: skip
    refused(CliRunner().invoke(app, one_row), "gave 1 row to score", "raise --limit")


def _choice_set(path: Path, records: int, choices: list[str], gold: list[int]) -> Path:
    """A multiple-choice csv of `records` records, each with `choices`, the right one `gold[record]`."""
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "choices", "answer"])
        for record in range(records):
            writer.writerow([f"Question {record}: which one?", json.dumps(choices), gold[record]])
    return path


def test_the_chance_level_flags_an_original_model_at_chance_and_not_one_above_it(
    pruned_dir: Path, tmp_path: Path
) -> None:
    """Planted data. Four identical choices: the model cannot tell them apart (ties go to the first), so with
    the right one in each position in turn its accuracy is 1/4, chance itself. A one-token right answer
    against long distractors: the summed log-likelihood favours it whatever the model, well above chance."""
    same = _choice_set(tmp_path / "same.csv", 16, ["yes"] * 4, [record % 4 for record in range(16)])
    easy = _choice_set(tmp_path / "easy.csv", 16, ["yes", *[" ".join(["fish"] * 20)] * 3], [0] * 16)
    outputs = {}
    for data in (same, easy):
        out = tmp_path / f"{data.stem}.json"
        args = ["evaluate", "--pruned", str(pruned_dir), "--dataset", str(data), "--draws", "1", "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--speed-rounds", "1", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        outputs[data.stem] = (json.loads(out.read_text()), result.output)
    results, output = outputs["same"]
    chance = results["chance"]
    assert chance["chance"] == 0.25 and chance["records"] == 16 and results["rows"][0]["accuracy"] == 0.25
    assert chance["at_chance"] and chance["low"] <= 0.25 <= chance["high"]
    assert "warning: the base model is at chance on this set" in output
    accuracy_lines = [line for line in output.splitlines() if line.startswith("pruned - ") and "accuracy:" in line]
    assert accuracy_lines and all(line.endswith("accuracy comparisons on it are noise]") for line in accuracy_lines)
    results, output = outputs["easy"]
    assert results["rows"][0]["accuracy"] > 0.9 and results["chance"]["chance"] == 0.25
    assert not results["chance"]["at_chance"] and results["chance"]["low"] > 0.25
    assert "at chance" not in output.replace("above chance", "") and "warning" not in output
