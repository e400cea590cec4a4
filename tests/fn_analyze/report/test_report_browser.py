"""The report page opened in a real headless browser: Debian's Chromium driven by Playwright.

Every network card is there, every image has loaded, the console shows no error and the page asks
for nothing but itself. Chromium comes from the system's package manager (the README's test command
installs it when it is missing); without it this test fails, it is never skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fn_analyze.config import EvaluateConfig, ReportConfig
from fn_analyze.measure.evaluate import evaluate
from fn_analyze.report.page import write_report
from tests.helpers.masks import tiny_run_with_z

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page_file(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> Path:
    """A report on the tiny LLaMA: two networks with z, a set-aside group, an evaluation."""
    folder = tmp_path_factory.mktemp("report")
    tiny_run_with_z(folder, tiny_lm_dir, demo_dir)
    results = folder / "eval.json"
    evaluate(EvaluateConfig(mask_file=folder / "mask.json", dataset=str(demo_dir / "eval.csv"), model=str(tiny_lm_dir),
                            out=results, draws=2, network_draws=1, device="cpu", networks="0"))  # fmt: skip
    report = write_report(
        ReportConfig(mask_file=folder / "mask.json", activations=folder / "acts", evaluation=results,
                     out=folder / "report.html", top=5)
    )  # fmt: skip
    return report.path


@pytest.mark.slow  # a collect, an evaluate and a browser: about 35 s on 2 busy cores
def test_the_page_shows_every_card_and_image_and_fetches_nothing(page_file: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium") or Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as the README's test "
        "command does"
    )
    url = page_file.resolve().as_uri()
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="load")
            cards = page.eval_on_selector_all("section.card", "cards => cards.map(c => c.dataset.network)")
            images = page.eval_on_selector_all(
                "img", "images => images.map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])"
            )
            marked = page.eval_on_selector_all("section.card mark", "marks => marks.length")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            printed = tmp_path / "report.pdf"
            page.pdf(path=str(printed))  # as the print dialog would lay it out
        finally:
            browser.close()
    assert cards == ["0", "1", "massive"]
    assert len(images) == 2  # the networks' figure and the evaluation's
    assert all(complete and width > 0 and src == "data:image/png;base64," for complete, width, src in images), images
    assert marked >= 3 * 5  # every example's token is marked
    assert errors == []
    assert [u for u in requests if u != url and not u.startswith("data:")] == [], requests
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed.read_bytes()[:5] == b"%PDF-" and printed.stat().st_size > 10_000
