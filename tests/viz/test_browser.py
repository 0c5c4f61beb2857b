"""The dashboard in headless Chromium: open each view, switch score modes, hover tokens.

Skipped when Playwright or Chromium is missing. Screenshots go to a temporary folder, or to
$RAYPIPE_SCREENSHOTS (e.g. `docs`) to refresh the committed ones.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.viz.fixture_tree import PROMPT_SET

CHROMIUM = os.environ.get("RAYPIPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PS = quote(PROMPT_SET, safe="")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.base = server
    yield page
    context.close()
    assert errors == [], f"browser console errors: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("RAYPIPE_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tooltip(page) -> dict[str, str]:
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    rows = {}
    for row in tip.locator("tr").all():
        cells = row.locator("td").all_inner_texts()
        rows[cells[1]] = cells[2]
    return {
        "title": tip.locator(".tt-title").inner_text(),
        "sub": tip.locator(".tt-sub").inner_text(),
        **rows,
    }


def _entry(tree: dict, variant: str, trait: str, pid: str, layer: int) -> dict:
    base = tree["root"] / "experiments/demo/inference" / variant
    data = json.loads((base / "projections" / trait / PROMPT_SET / f"{pid}.json").read_text())
    return next(e for e in data["projections"] if e["layer"] == layer)


def _response(tree: dict, variant: str, pid: str) -> dict:
    base = tree["root"] / "experiments/demo/inference" / variant / "responses" / PROMPT_SET
    return json.loads((base / f"{pid}.json").read_text())


def test_trait_dynamics(page, tree, shots) -> None:
    page.goto(
        f"{page.base}/#/dynamics?experiment=demo&variant=instruct&prompt_set={PS}&prompt_id=2"
    )
    chart = "#dyn-chart svg.chart"
    page.wait_for_selector(f'{chart}[data-mode="raw"][data-series="3"]')
    assert page.locator(f"{chart} path.series").count() == 3
    assert page.locator(f"{chart} text.marker-label").text_content() == "response starts"
    assert page.locator("#dyn-legend .legend-item").count() == 3

    # Score modes, centering and cleaning each redraw the chart with new numbers.
    page.click('#view-dynamics button[data-mode="cosine"]')
    page.wait_for_selector(f'{chart}[data-mode="cosine"]')
    assert "cosine" in page.locator(f"{chart} text.axis-label").all_text_contents()[1]
    page.check("#dyn-centered")
    page.wait_for_selector(f'{chart}[data-mode="cosine"][data-centered="1"]')
    assert page.is_enabled("#dyn-cleaned")
    page.check("#dyn-cleaned")
    page.wait_for_selector(f'{chart}[data-cleaned="1"]')
    page.uncheck("#dyn-cleaned")
    page.wait_for_selector(f'{chart}[data-cleaned="0"][data-centered="1"]')

    # Hover a response token: the tooltip shows its text and the exact centered cosine score.
    response = _response(tree, "instruct", "2")
    end, k = response["prompt_end"], 5
    page.hover(f'#dyn-response span.tok[data-i="{end + k}"]')
    tip = _tooltip(page)
    assert tip["title"] == f"“{response['tokens'][end + k]}”"
    assert tip["sub"] == f"#{end + k} · response token {k}"
    entry = _entry(tree, "instruct", "emotion/joy", "2", 12)
    want = (entry["response"][k] - entry["baseline"]) / entry["token_norms"]["response"][k]
    assert float(tip["emotion/joy L12"]) == pytest.approx(want, rel=1e-4)

    # Overlay a second layer of one trait, then shade the text by another series.
    page.click('#dyn-traits button.chip[data-key="emotion/joy@16"]')
    page.wait_for_selector(f'{chart}[data-series="4"]')
    page.click('#dyn-legend .legend-item[data-key="safety/refusal@12"]')
    page.wait_for_selector('#dyn-legend .legend-item.focus[data-key="safety/refusal@12"]')
    assert "safety/refusal" in page.locator("#dyn-text .shade-legend").inner_text()

    # Hovering the chart reports the token under the cursor.
    box = page.locator(f"{chart} rect.overlay").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
    tip = _tooltip(page)
    index = int(re.match(r"#(\d+)", tip["sub"]).group(1))
    assert tip["title"] == f"“{response['tokens'][index]}”".replace("\n", "⏎")
    assert len([key for key in tip if " L" in key]) == 4

    # Back to raw scores for the documentation screenshot, with a token hovered.
    page.click('#view-dynamics button[data-mode="raw"]')
    page.uncheck("#dyn-centered")
    page.click('#dyn-legend .legend-item[data-key="emotion/joy@12"]')
    page.wait_for_selector(f'{chart}[data-mode="raw"][data-centered="0"]')
    page.hover(f'#dyn-response span.tok[data-i="{end + 20}"]')
    _tooltip(page)
    _screenshot(page, shots / "dashboard-dynamics.png")


def test_model_analysis(page, tree, shots) -> None:
    trait = quote("persona/sycophancy", safe="")
    page.goto(f"{page.base}/#/models?experiment=demo&prompt_set={PS}&trait={trait}")
    page.wait_for_selector("#cmp-chart svg.chart")
    rows = page.locator("#cmp-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 5

    def column(i: int) -> list[float]:
        texts = page.locator(f"#cmp-table tbody tr td:nth-child({i})").all_inner_texts()
        return [float(t) for t in texts]

    assert column(5) == sorted(column(5), reverse=True)  # mean Δ, largest first
    page.click('#cmp-table button[data-sort="mean_diff"]')
    assert column(5) == sorted(column(5))
    page.click('#cmp-table button[data-sort="max_diff"]')
    assert column(6) == sorted(column(6), reverse=True)

    # The LoRA variant wrote its own answer to prompt 4: the diff stops where tokens diverge.
    page.click(f'#cmp-table tr[data-prompt-id="{tree["diverging_prompt"]}"]')
    page.wait_for_selector(f'#cmp-chart svg[data-prompt-id="{tree["diverging_prompt"]}"]')
    assert "responses diverge" in page.locator("#cmp-chart").text_content()

    page.click('#cmp-table tr[data-prompt-id="2"]')
    page.wait_for_selector('#cmp-chart svg[data-prompt-id="2"]')
    page.click('#view-models button[data-mode="normalized"]')
    page.wait_for_selector('#cmp-chart svg[data-mode="normalized"][data-prompt-id="2"]')
    end = _response(tree, "instruct", "2")["prompt_end"]
    page.hover(f'#cmp-response span.tok[data-i="{end + 3}"]')
    tip = _tooltip(page)
    a, b, d = (float(tip[k]) for k in ("A instruct", "B lora", "Δ B − A"))
    assert d == pytest.approx(b - a, rel=1e-4, abs=1e-6)
    ea = _entry(tree, "instruct", "persona/sycophancy", "2", 12)
    want_a = ea["response"][3] / (sum(ea["token_norms"]["response"]) / len(ea["response"]))
    assert a == pytest.approx(want_a, rel=1e-4)

    page.click('#view-models button[data-mode="raw"]')
    page.wait_for_selector('#cmp-chart svg[data-mode="raw"]')
    page.click('#cmp-table button[data-sort="mean_diff"]')  # back to largest difference first
    page.hover(f'#cmp-response span.tok[data-i="{end + 9}"]')
    _tooltip(page)
    _screenshot(page, shots / "dashboard-models.png")


def test_overview(page, tree, shots) -> None:
    page.goto(f"{page.base}/#/overview?experiment=demo&variant=instruct&prompt_set={PS}")
    page.wait_for_selector('#ov-cards[data-mode="raw"] .trait-card svg.histogram')
    cards = page.locator("#ov-cards .trait-card")
    assert cards.count() == 3
    assert page.locator("#ov-summary").inner_text().startswith(PROMPT_SET)

    page.click('#view-overview button[data-mode="normalized"]')
    page.wait_for_selector('#ov-cards[data-mode="normalized"] .trait-card svg.histogram')
    page.click('#view-overview button[data-mode="cosine"]')
    page.wait_for_selector('#ov-cards[data-mode="cosine"] .trait-card svg.histogram')
    page.check("#ov-centered")
    page.wait_for_selector('#ov-cards[data-centered="1"] .trait-card svg.histogram')

    card = page.locator('.trait-card[data-trait="emotion/joy"]')
    card.locator("select.layer-select").select_option(label="L16 probe")
    total = 0
    for hit in card.locator("rect.hist-hit").all():
        hit.hover()
        tip = _tooltip(page)
        total += int(tip["title"].split()[0])
        assert tip["sub"] == "emotion/joy · L16"
    assert total == 5

    page.click('#view-overview button[data-mode="raw"]')
    page.uncheck("#ov-centered")
    page.wait_for_selector('#ov-cards[data-mode="raw"][data-centered="0"] svg.histogram')
    for hit in card.locator("rect.hist-hit").all()[::-1]:
        hit.hover()
        if not _tooltip(page)["title"].startswith("0 "):
            break
    _screenshot(page, shots / "dashboard-overview.png")

    # The top prompt opens in Trait Dynamics with that trait and layer plotted.
    first = card.locator("a.top-prompt").first
    pid = first.get_attribute("data-prompt-id")
    first.click()
    page.wait_for_selector('#dyn-chart svg.chart[data-series="1"]')
    assert page.input_value("#dyn-prompt") == pid
    assert page.locator("#dyn-legend .legend-item").get_attribute("data-key") == "emotion/joy@16"
