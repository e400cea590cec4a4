"""Network activity and cards: planted data where the answer is known, the same activity from a folder,
an array and a model run, and the commands that print the cards and write the report page."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app
from fn_analyze.config import CollectConfig, EvaluateConfig
from fn_analyze.measure.evaluate import evaluate
from fn_analyze.networks.activity import network_activity
from fn_analyze.record.model_rows import model_rows
from fn_analyze.record.token_rows import ActivationMatrix
from fn_analyze.report.cards import network_cards
from shared.constants import EXPERIMENT_FIGURE_NAME, EXPERIMENT_TABLE_NAME
from shared.masks import MASSIVE, MaskFile, ModelInfo, Network
from tests.helpers.activations import write_activations
from tests.helpers.masks import tiny_run_with_z
from tests.helpers.processes import refused

WIDTH, LAYERS = 16, (0, 1, 2)
WORDS = [f"w{i}" for i in range(60)]
RECORDS, LENGTH = 40, 12
FIRES_ON = {0: 7, 1: 9}  # network id -> the token id it is planted to fire on
NEURONS = {0: {0: (1, 5, 9), 2: (2, 3)}, 1: {1: (0, 6, 7, 8)}}
MASSIVE_NEURONS = {1: (3, 4)}  # large at position 0: +60 and -80


def _decode(ids) -> str:
    return "".join(f" {WORDS[i]}" for i in ids)


def _planted(seed: int = 0) -> tuple[MaskFile, ActivationMatrix, dict[int, list[tuple[int, int]]]]:
    """Noise, plus each network's map (its z) times 6 wherever its token appears, plus two massive neurons
    at every record's first token; returns the mask, the rows and where each planted token sits."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 60, size=(RECORDS, LENGTH))
    where: dict[int, list[tuple[int, int]]] = {}
    for network, token in FIRES_ON.items():
        for record in rng.choice(RECORDS, size=6, replace=False):
            position = int(rng.integers(3, LENGTH - 3))
            ids[record, position] = token
            where.setdefault(network, []).append((int(record), position))
    z = {
        network: {layer: tuple(float(v) for v in rng.choice([-1, 1], len(ns)) * rng.uniform(3, 8, len(ns)))
                  for layer, ns in layers.items()}
        for network, layers in NEURONS.items()
    }  # fmt: skip
    matrix = rng.normal(0, 1, size=(RECORDS * LENGTH, len(LAYERS) * WIDTH))
    flat_ids = ids.ravel()
    for network, token in FIRES_ON.items():
        rows = flat_ids == token
        for layer, neurons in NEURONS[network].items():
            for neuron, value in zip(neurons, z[network][layer], strict=True):
                matrix[rows, layer * WIDTH + neuron] += 6 * value
    first = np.tile(np.arange(LENGTH) == 0, RECORDS)
    matrix[first, 1 * WIDTH + 3] += 60
    matrix[first, 1 * WIDTH + 4] -= 80
    rows = ActivationMatrix.of(
        matrix.astype(np.float32),
        LAYERS,
        records=np.repeat(np.arange(RECORDS), LENGTH),
        positions=np.tile(np.arange(LENGTH), RECORDS),
        token_ids=flat_ids,
    )
    mask = MaskFile(
        model=ModelInfo("synthetic", "llama", len(LAYERS), WIDTH, 8, "sha256:synthetic"),
        networks=tuple(Network(n, dict(NEURONS[n]), z=z[n]) for n in NEURONS),
        source={"ica": {"set_aside": {"size": 2, "layers": {"1": list(MASSIVE_NEURONS[1])}}}},
    )
    return mask, rows, where


def test_a_network_planted_on_one_token_lists_it_first_with_its_context() -> None:
    mask, rows, where = _planted()
    cards = network_cards(mask, rows, top=6, context=3, decode=_decode)
    by_id = {card.id: card for card in cards.cards}
    assert list(by_id) == [0, 1, MASSIVE]
    ids = rows.token_ids.reshape(RECORDS, LENGTH)
    for network, token in FIRES_ON.items():
        card = by_id[network]
        assert card.recurring[0][1] == token and card.recurring[0][2] == len(where[network])
        assert [e.token_id for e in card.examples] == [token] * len(where[network])
        assert {(e.record, e.position) for e in card.examples} == set(where[network])
        for e in card.examples:
            assert e.activity == pytest.approx(6, abs=1.5)  # the planted 6 x map, plus noise
            assert e.before == _decode(ids[e.record, e.position - 3 : e.position])
            assert e.token == f" {WORDS[token]}"
            assert e.after == _decode(ids[e.record, e.position + 1 : e.position + 4])
    massive = by_id[MASSIVE]
    # Both neurons count in the direction they are large in (+60 and -80): the group's activity is ~70.
    assert massive.examples[0].position == 0 and massive.examples[0].activity == pytest.approx(70 - 70 / LENGTH, abs=2)
    assert massive.pool == 100 and massive.first_position_share == RECORDS / 100  # every first token, then noise
    assert massive.size == 2
    assert by_id[0].massive_correlation is not None and abs(by_id[0].massive_correlation) < 0.3
    text = str(cards)
    assert f"[[ {WORDS[FIRES_ON[0]]}]]" in text and "set-aside massive neurons (2)" in text
    assert f"<mark> {WORDS[FIRES_ON[1]]}</mark>" in cards._repr_html_()


def test_activity_is_the_centered_projection_on_the_map_the_same_from_an_array_and_a_folder(tmp_path: Path) -> None:
    mask, rows, _ = _planted(seed=1)
    matrix = rows.matrix.astype(np.float16).astype(np.float64)  # a folder holds float16
    centered = matrix - matrix.mean(axis=0)
    network = mask.networks[1]
    columns = [layer * WIDTH + n for layer, ns in sorted(network.layers.items()) for n in ns]
    z = np.array([v for _, values in sorted(network.z.items()) for v in values])
    expected = centered[:, columns] @ z / (z @ z)
    folder = write_activations(tmp_path / "acts", matrix, list(LAYERS), WIDTH, rows_per_shard=100)
    from_folder = network_activity(mask, folder)
    from_array = network_activity(mask, ActivationMatrix.of(matrix, LAYERS, rows.records, rows.positions))
    np.testing.assert_allclose(from_folder.of(1), expected, atol=1e-9)
    np.testing.assert_allclose(from_array.of(1), expected, atol=1e-9)
    assert from_folder.ids == (0, 1, MASSIVE)
    assert network_activity(mask, folder, networks=[MASSIVE]).ids == (MASSIVE,)


def test_a_layer_the_rows_lack_is_refused_with_its_name() -> None:
    mask, rows, _ = _planted()
    partial = ActivationMatrix.of(rows.matrix[:, : WIDTH * 2], (0, 1))
    with pytest.raises(Exception, match="layer 2, which the activations do not record"):
        network_activity(mask, partial)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> tuple[Path, Path]:
    """An activations folder of the tiny LLaMA on 600 demo tokens and a mask file for it, with z."""
    return tiny_run_with_z(tmp_path_factory.mktemp("cards"), tiny_lm_dir, demo_dir)


def test_activity_from_a_model_run_over_the_dataset_is_the_folders(
    tiny_run: tuple[Path, Path], tiny_lm_dir: Path, demo_dir: Path
) -> None:
    acts, mask_path = tiny_run
    mask = MaskFile.load(mask_path)
    run = model_rows(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=Path("unused"), model=str(tiny_lm_dir),
                                   max_tokens=600))  # fmt: skip
    from_model, from_folder = network_activity(mask, run), network_activity(mask, acts)
    np.testing.assert_array_equal(from_model.token_ids, from_folder.token_ids)
    np.testing.assert_allclose(from_model.activity, from_folder.activity, atol=1e-6)


def test_show_examples_prints_every_card_and_report_writes_one_page(tiny_run: tuple[Path, Path], tmp_path) -> None:
    acts, mask_path = tiny_run
    runner = CliRunner()
    shown = runner.invoke(app, ["show", str(mask_path), "--examples", str(acts), "--top", "3"])
    assert shown.exit_code == 0, shown.output
    for title in ("== network 0 (20 neurons)", "== network 1 (40 neurons)", "== set-aside massive neurons (3)"):
        assert title in shown.output
    assert shown.output.count("most active tokens:") == 3 and "[[" in shown.output
    out = tmp_path / "page.html"
    written = runner.invoke(
        app, ["report", "--mask-file", str(mask_path), "--activations", str(acts), "--out", str(out)]
    )
    assert written.exit_code == 0, written.output
    assert f"report: {out}" in written.output and "3 network cards" in written.output
    page = out.read_text()
    assert page.count("class='card'") == 3 and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def test_report_joins_several_evaluations_and_experiments_in_the_order_given(
    tiny_run: tuple[Path, Path], tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    acts, mask_path = tiny_run
    first = tmp_path / "first" / "eval.json"
    evaluate(EvaluateConfig(mask_file=mask_path, dataset=str(demo_dir / "eval.csv"), model=str(tiny_lm_dir), out=first,
                            draws=2, network_draws=1, device="cpu", networks="0", limit=8))  # fmt: skip
    second = tmp_path / "second" / "eval.json"  # the same name in another folder: told apart by its path
    second.parent.mkdir()
    shutil.copy(first, second)
    experiments = []
    for name in ("seeds-a", "seeds-b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / EXPERIMENT_TABLE_NAME).write_text(f"the table of {name}\n")
        shutil.copy(first.with_suffix(".png"), folder / EXPERIMENT_FIGURE_NAME)
        experiments.append(str(folder))
    out = tmp_path / "page.html"
    base = ["report", "--mask-file", str(mask_path), "--activations", str(acts), "--out", str(out)]
    written = CliRunner().invoke(
        app, [*base, "--evaluation", str(second), str(first), "--experiment", *experiments, "--top", "2"]
    )
    assert written.exit_code == 0, written.output
    page = out.read_text()
    assert "3 network cards, 2 evaluations, 2 experiments." in page
    sections = [f"<h2>Evaluation ({second})</h2>", f"<h2>Evaluation ({first})</h2>"]
    sections += [f"<h2>Experiment ({folder})</h2>" for folder in experiments]
    assert all(section in page for section in sections)
    assert [page.index(section) for section in sections] == sorted(page.index(section) for section in sections)
    assert "the table of seeds-b" in page and page.count("data:image/png;base64,") == 1 + 4  # networks, one a section
    out.unlink()
    refused(CliRunner().invoke(app, [*base, "--evaluation", str(first), str(first)]), "--evaluation names a path twice")
    assert not out.exists()


def test_report_refuses_bad_input_in_one_line_and_writes_nothing(tiny_run: tuple[Path, Path], tmp_path) -> None:
    acts, mask_path = tiny_run
    runner = CliRunner()
    out = tmp_path / "page.html"
    base = ["report", "--mask-file", str(mask_path), "--out", str(out)]
    refused(runner.invoke(app, base), "give one of --activations", "or --dataset")
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"conditions": 3}')
    refused(runner.invoke(app, [*base, "--activations", str(acts), "--evaluation", str(bogus)]), "--evaluation")
    older = tmp_path / "older.json"
    older.write_text('{"schema_version": 1, "kind": "tuned", "tuned": "runs/tune"}')
    refused(
        runner.invoke(app, [*base, "--activations", str(acts), "--evaluation", str(older)]),
        "schema_version 1",
        "run `fn-analyze evaluate` again",
    )
    refused(runner.invoke(app, [*base, "--activations", str(acts), "--experiment", str(tmp_path)]), "table.txt")
    refused(runner.invoke(app, [*base, "--activations", str(acts), "--out", str(tmp_path / "p.htm")]), "end in .html")
    assert not out.exists() and not list(tmp_path.glob("*.html"))


def test_report_on_a_model_run_over_the_dataset_cards_the_tokens_the_folder_cards(
    tiny_run: tuple[Path, Path], demo_dir: Path, tmp_path: Path
) -> None:
    from fn_analyze.config import ReportConfig
    from fn_analyze.report.page import write_report

    acts, mask_path = tiny_run
    on_folder = write_report(ReportConfig(mask_file=mask_path, activations=acts, out=tmp_path / "a.html"))
    on_model = write_report(
        ReportConfig(mask_file=mask_path, dataset=str(demo_dir / "data.jsonl"), max_tokens=600, out=tmp_path / "b.html")
    )
    assert "model " in on_model.cards.source and str(acts) in on_folder.cards.source

    def chosen(report) -> list[list[tuple[int, int, int]]]:
        return [[(e.record, e.position, e.token_id) for e in card.examples] for card in report.cards.cards]

    assert chosen(on_model) == chosen(on_folder) and len(on_folder.cards.cards) == 3


def test_show_examples_refuses_missing_or_foreign_activations_in_one_line(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    acts, mask_path = tiny_run
    runner = CliRunner()
    missing = tmp_path / "nowhere"
    refused(runner.invoke(app, ["show", str(mask_path), "--examples", str(missing)]), str(missing), "does not exist")
    mask, rows, _ = _planted()
    foreign = write_activations(tmp_path / "foreign", rows.matrix, list(LAYERS), WIDTH)
    refused(runner.invoke(app, ["show", str(mask_path), "--examples", str(foreign)]), "was made for model")
