"""The dashboard in headless Chromium on outputs raypipe wrote from the embedded model.

Each test opens one view on the real tree (`real_tree`: extract, calibrate and infer on
SmolLM2-135M-Instruct with an `instruct` and a `lora` variant), switches score modes, hovers
tokens and checks the tooltip against the projection files, and saves a screenshot.

Skipped when Playwright or Chromium is missing, without building the tree. Screenshots go to a
temporary folder, or to $RAYPIPE_SCREENSHOTS (e.g. `docs`) to refresh the committed ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.viz.real_tree import PROMPT_SET

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


def _no_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    return None


# Checked at import, so a machine without a browser skips before the real tree is built.
pytestmark = pytest.mark.skipif(_no_browser() is not None, reason=str(_no_browser()))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, request):
    """A fresh page with `page.base` (the server's URL) and `page.tree` (the real tree)."""
    # Looked up here, not as arguments: pytest would set up these session fixtures before
    # the module's `browser`, building the tree even when Chromium then fails to start.
    tree = request.getfixturevalue("real_tree")
    base = request.getfixturevalue("real_server")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.base, page.tree = base, tree
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


def _label(token: str) -> str:
    """A token as the tooltip titles it (common.js tokenLabel)."""
    text = re.sub("^[Ġ▁]", " ", token).replace("Ċ", "\n")
    return "“" + text.replace("\n", "⏎").replace("\t", "⇥") + "”"


def _inference(tree: dict, variant: str) -> Path:
    return tree["root"] / "experiments" / tree["experiment"] / "inference" / variant


def _entry(tree: dict, variant: str, trait: str, pid: str, layer: int) -> dict:
    path = _inference(tree, variant) / "projections" / trait / PROMPT_SET / f"{pid}.json"
    return next(e for e in json.loads(path.read_text())["projections"] if e["layer"] == layer)


def _response(tree: dict, variant: str, pid: str) -> dict:
    path = _inference(tree, variant) / "responses" / PROMPT_SET / f"{pid}.json"
    return json.loads(path.read_text())


def _n_response(response: dict) -> int:
    return len(response["tokens"]) - response["prompt_end"]


def test_trait_dynamics(page, shots) -> None:
    tree = page.tree
    exp = tree["experiment"]
    traits, layers = tree["traits"], tree["layers"]
    # The prompt with the longest response (ties: the first), so hovered tokens exist.
    pid = max(tree["prompt_ids"], key=lambda p: _n_response(_response(tree, "instruct", p)))
    response = _response(tree, "instruct", pid)
    end, n_resp = response["prompt_end"], _n_response(response)
    assert n_resp >= 10, "the real responses are too short for this test"

    page.goto(
        f"{page.base}/#/dynamics?experiment={exp}&variant=instruct&prompt_set={PS}&prompt_id={pid}"
    )
    chart = "#dyn-chart svg.chart"
    n = len(traits)
    page.wait_for_selector(f'{chart}[data-mode="raw"][data-series="{n}"]')
    assert page.locator(f"{chart} path.series").count() == n
    assert page.locator(f"{chart} text.marker-label").text_content() == "response starts"
    assert page.locator("#dyn-legend .legend-item").count() == n
    # Each trait starts at its best layer, the first one the pipeline wrote.
    keys = page.locator("#dyn-legend .legend-item").evaluate_all(
        "items => items.map(i => i.dataset.key)"
    )
    assert keys == [f"{t}@{layers[t][0]}" for t in traits]

    # Score modes, centering and cleaning each redraw the chart with new numbers.
    page.click('#view-dynamics button[data-mode="cosine"]')
    page.wait_for_selector(f'{chart}[data-mode="cosine"]')
    assert "cosine" in page.locator(f"{chart} text.axis-label").all_text_contents()[1]
    page.check("#dyn-centered")
    page.wait_for_selector(f'{chart}[data-mode="cosine"][data-centered="1"]')
    assert page.is_enabled("#dyn-cleaned")
    dims = ", ".join(str(d) for d in tree["massive_dims"])
    assert f"[{dims}]" in page.inner_text("#view-dynamics .controls")
    page.check("#dyn-cleaned")
    page.wait_for_selector(f'{chart}[data-cleaned="1"]')

    # Hover a response token: the tooltip shows its text and the exact cleaned, centered
    # cosine score that the projection file gives.
    trait = traits[1]
    best = layers[trait][0]
    k = min(5, n_resp - 1)
    page.hover(f'#dyn-response span.tok[data-i="{end + k}"]')
    tip = _tooltip(page)
    assert tip["title"] == _label(response["tokens"][end + k])
    assert tip["sub"] == f"#{end + k} · response token {k}"
    entry = _entry(tree, "instruct", trait, pid, best)
    clean = entry["cleaned"]
    assert clean["dims"] == tree["massive_dims"]
    want = (clean["response"][k] - entry["baseline"]) / clean["token_norms"]["response"][k]
    assert float(tip[f"{trait} L{best}"]) == pytest.approx(want, rel=1e-4, abs=1e-6)

    page.uncheck("#dyn-cleaned")
    page.wait_for_selector(f'{chart}[data-cleaned="0"][data-centered="1"]')
    page.hover(f'#dyn-response span.tok[data-i="{end + k - 1}"]')
    page.hover(f'#dyn-response span.tok[data-i="{end + k}"]')
    tip = _tooltip(page)
    want = (entry["response"][k] - entry["baseline"]) / entry["token_norms"]["response"][k]
    assert float(tip[f"{trait} L{best}"]) == pytest.approx(want, rel=1e-4, abs=1e-6)

    # Overlay a second layer of one trait, then shade the text by another series.
    two = next(t for t in traits if len(layers[t]) > 1)
    page.click(f'#dyn-traits button.chip[data-key="{two}@{layers[two][1]}"]')
    page.wait_for_selector(f'{chart}[data-series="{n + 1}"]')
    focus = f"{traits[0]}@{layers[traits[0]][0]}"
    page.click(f'#dyn-legend .legend-item[data-key="{focus}"]')
    page.wait_for_selector(f'#dyn-legend .legend-item.focus[data-key="{focus}"]')
    assert traits[0] in page.locator("#dyn-text .shade-legend").inner_text()

    # Hovering the chart reports the token under the cursor.
    box = page.locator(f"{chart} rect.overlay").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
    tip = _tooltip(page)
    index = int(re.match(r"#(\d+)", tip["sub"]).group(1))
    assert index >= end  # three quarters along the x axis lies in the response
    assert tip["title"] == _label(response["tokens"][index])
    assert len([key for key in tip if " L" in key]) == n + 1

    # Back to raw scores for the documentation screenshot, with a token hovered.
    page.click('#view-dynamics button[data-mode="raw"]')
    page.uncheck("#dyn-centered")
    focus = f"{trait}@{best}"
    page.click(f'#dyn-legend .legend-item[data-key="{focus}"]')
    page.wait_for_selector(f'{chart}[data-mode="raw"][data-centered="0"]')
    page.wait_for_selector(f'#dyn-legend .legend-item.focus[data-key="{focus}"]')
    page.hover(f'#dyn-response span.tok[data-i="{end + min(20, n_resp - 1)}"]')
    _tooltip(page)
    _screenshot(page, shots / "dashboard-dynamics.png")


def test_model_analysis(page, shots) -> None:
    tree = page.tree
    exp = tree["experiment"]
    trait = tree["traits"][0]
    layer = min(tree["layers"][trait])  # the view opens on the lowest layer both variants have
    page.goto(f"{page.base}/#/models?experiment={exp}&prompt_set={PS}&trait={quote(trait, '')}")
    page.wait_for_selector("#cmp-chart svg.chart")
    rows = page.locator("#cmp-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == len(tree["prompt_ids"])
    assert page.input_value("#cmp-variant-a") == "instruct"
    assert page.input_value("#cmp-variant-b") == "lora"

    def column(i: int) -> list[float]:
        texts = page.locator(f"#cmp-table tbody tr td:nth-child({i})").all_inner_texts()
        return [float(t) for t in texts]

    # The adapter moves the scores, so the differences are real and not all zero.
    assert any(abs(d) > 1e-3 for d in column(5))
    assert column(5) == sorted(column(5), reverse=True)  # mean Δ, largest first
    page.click('#cmp-table button[data-sort="mean_diff"]')
    assert column(5) == sorted(column(5))
    page.click('#cmp-table button[data-sort="max_diff"]')
    assert column(6) == sorted(column(6), reverse=True)

    # The LoRA variant wrote its own answer to one prompt: the diff stops where tokens diverge.
    own = tree["diverging_prompt"]
    assert own is not None, "the LoRA variant's own answer no longer differs from instruct's"
    page.click(f'#cmp-table tr[data-prompt-id="{own}"]')
    page.wait_for_selector(f'#cmp-chart svg[data-prompt-id="{own}"]')
    assert "responses diverge" in page.locator("#cmp-chart").text_content()

    # On a shared response, the tooltip gives both variants' scores and their difference.
    pid = tree["prompt_ids"][0]
    page.click(f'#cmp-table tr[data-prompt-id="{pid}"]')
    page.wait_for_selector(f'#cmp-chart svg[data-prompt-id="{pid}"]')
    page.click('#view-models button[data-mode="normalized"]')
    page.wait_for_selector(f'#cmp-chart svg[data-mode="normalized"][data-prompt-id="{pid}"]')
    response = _response(tree, "instruct", pid)
    end = response["prompt_end"]
    page.hover(f'#cmp-response span.tok[data-i="{end + 3}"]')
    tip = _tooltip(page)
    assert tip["title"] == _label(response["tokens"][end + 3])
    a, b, d = (float(tip[k]) for k in ("A instruct", "B lora", "Δ B − A"))
    assert d == pytest.approx(b - a, rel=1e-4, abs=1e-5)
    for variant, got in (("instruct", a), ("lora", b)):
        e = _entry(tree, variant, trait, pid, layer)
        norms = e["token_norms"]["response"]
        assert got == pytest.approx(e["response"][3] / (sum(norms) / len(norms)), rel=1e-4)

    # For the docs: raw scores on the shared response that the adapter moves the most.
    def moved(p: str) -> float:
        ea, eb = (_entry(tree, v, trait, p, layer)["response"] for v in ("instruct", "lora"))
        return abs(sum(eb) - sum(ea)) / max(1, len(ea))

    shown = max((p for p in tree["prompt_ids"] if p != own), key=moved)
    page.click('#view-models button[data-mode="raw"]')
    page.wait_for_selector('#cmp-chart svg[data-mode="raw"]')
    page.click('#cmp-table button[data-sort="mean_diff"]')  # back to largest difference first
    page.click(f'#cmp-table tr[data-prompt-id="{shown}"]')
    page.wait_for_selector(f'#cmp-chart svg[data-mode="raw"][data-prompt-id="{shown}"]')
    response = _response(tree, "instruct", shown)
    end, n_resp = response["prompt_end"], _n_response(response)
    page.hover(f'#cmp-response span.tok[data-i="{end + min(9, n_resp - 1)}"]')
    _tooltip(page)
    _screenshot(page, shots / "dashboard-models.png")


def test_overview(page, shots) -> None:
    tree = page.tree
    exp = tree["experiment"]
    n_prompts = len(tree["prompt_ids"])
    page.goto(f"{page.base}/#/overview?experiment={exp}&variant=instruct&prompt_set={PS}")
    page.wait_for_selector('#ov-cards[data-mode="raw"] .trait-card svg.histogram')
    cards = page.locator("#ov-cards .trait-card")
    assert cards.count() == len(tree["traits"])
    assert page.locator("#ov-summary").inner_text().startswith(PROMPT_SET)

    page.click('#view-overview button[data-mode="normalized"]')
    page.wait_for_selector('#ov-cards[data-mode="normalized"] .trait-card svg.histogram')
    page.click('#view-overview button[data-mode="cosine"]')
    page.wait_for_selector('#ov-cards[data-mode="cosine"] .trait-card svg.histogram')
    page.check("#ov-centered")
    page.wait_for_selector('#ov-cards[data-centered="1"] .trait-card svg.histogram')

    trait = next(t for t in tree["traits"] if len(tree["layers"][t]) > 1)
    second = tree["layers"][trait][1]
    card = page.locator(f'.trait-card[data-trait="{trait}"]')
    method = tree["methods"][trait][1]
    card.locator("select.layer-select").select_option(label=f"L{second} {method}")
    total = 0
    for hit in card.locator("rect.hist-hit").all():
        hit.hover()
        tip = _tooltip(page)
        total += int(tip["title"].split()[0])
        assert tip["sub"] == f"{trait} · L{second}"
    assert total == n_prompts

    page.click('#view-overview button[data-mode="raw"]')
    page.uncheck("#ov-centered")
    page.wait_for_selector('#ov-cards[data-mode="raw"][data-centered="0"] svg.histogram')
    for hit in card.locator("rect.hist-hit").all():  # from the left: the tip stays on the card
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
    key = page.locator("#dyn-legend .legend-item").get_attribute("data-key")
    assert key == f"{trait}@{second}"
