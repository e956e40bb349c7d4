"""The viewer in a real headless browser (Debian's chromium driven by Playwright), served by
the real `tdb-agent view RUN_DIR` command. Expected numbers are computed here with the ops,
independently of the page. Screenshots of every page go to artifacts/viewer/ (or
$TDB_ARTIFACTS/viewer/)."""

import os
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tdb_agent import ops
from tdb_agent.engine import DEFAULT_MODEL, Engine
from tests.viewer_fixtures import ioi_example, make_run, viewer_process

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TDB_ARTIFACTS", REPO / "artifacts")) / "viewer"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]  # last: small /dev/shm in containers


def find_chromium() -> str | None:
    for name in (os.environ.get("TDB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def engine():
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.skip("the bundled model is not built")
    return Engine.load()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """`tdb-agent view RUN_DIR` on a free loopback port; yields its base URL."""
    run = make_run(engine, tmp_path_factory.mktemp("view") / "ioi-test")
    with viewer_process(run, run.parent / "server.log", "/run/ioi-test") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium found: `make test` installs Debian's chromium where it runs as root with apt-get; "
                    "otherwise install chromium or set TDB_CHROMIUM to a Chromium/Chrome binary")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=BROWSER_ARGS)
        yield b
        b.close()


class Page:
    """A browser tab that records console errors, page errors and failed requests."""

    def __init__(self, browser, base):
        self.base = base
        self.page = browser.new_page(viewport={"width": 1280, "height": 860})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status} {r.url}"))

    def open(self, path: str):
        self.page.goto(self.base + path)
        self.page.wait_for_selector("body[data-ready]", timeout=30000)
        assert not self.page.locator("#app .error").count(), self.page.inner_text("#app .error")
        return self.page

    def shot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.mouse.move(0, 0)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server)
    yield t
    t.page.close()
    assert not t.problems, t.problems


def explorer_path(kinds="head,neuron,mlp"):
    ex = ioi_example()
    return "/prompt?" + urlencode({"prompt": ex.prompt, "target": ex.target, "distractor": ex.distractor,
                                   "kinds": kinds})


def test_every_page_loads_without_console_errors(tab):
    pages = {"model": "/", "component-head": "/component/L3.H1", "component-neuron": "/component/L1.N7",
             "component-sae-latent": "/component/L2.resid.F5", "component-mlp": "/component/L2.MLP",
             "prompt-explorer": explorer_path(), "run": "/run/ioi-test"}
    for name, path in pages.items():
        page = tab.open(path)
        if name == "prompt-explorer":
            page.wait_for_selector("#attribution tbody tr")
            page.wait_for_selector("#attention canvas")
        if name == "component-head":
            assert page.locator(".examples .tok").count() > 10 and page.locator("canvas.heatmap").count() == 1
            assert page.locator(".explanation .score").inner_text()
        if name == "run":
            page.wait_for_selector("#step-view h3")
        assert page.locator("#app").inner_text().strip(), name
        tab.shot(name)


def test_attribution_table_shows_the_expected_top_component(tab, engine):
    ex = ioi_example()
    want = ops.attribute(engine, ex.prompt, ex.target, ex.distractor, kinds=["head"], top_k=40)  # as the page asks
    page = tab.open(explorer_path(kinds="head"))
    page.wait_for_selector("#attribution tbody tr")
    first = page.locator("#attribution tbody tr").first
    assert first.get_attribute("data-id") == want.rows[0].id
    assert float(first.locator("td").nth(3).inner_text()) == pytest.approx(want.rows[0].effect, abs=1e-4)
    assert float(page.inner_text("#metric-before")) == pytest.approx(want.metric, abs=1e-4)
    # a head row's "pattern" button shows that head's attention heatmap
    second = page.locator("#attribution tbody tr").nth(1)
    second.locator("button.show-pattern").click()
    page.wait_for_selector(f"#attention canvas[data-head='{second.get_attribute('data-id')}']")
    # sortable: two clicks sort by effect ascending (most negative first); its link opens its page
    page.click("#attribution th[data-key=effect]")
    page.click("#attribution th[data-key=effect]")
    lowest = min(want.rows, key=lambda r: r.effect)
    assert page.locator("#attribution tbody tr").first.get_attribute("data-id") == lowest.id
    page.locator("#attribution tbody tr").first.locator("a").click()
    page.wait_for_selector("h1.component-id")
    assert "/component/" in page.url


def test_clicking_a_graph_node_opens_its_component_page(tab):
    page = tab.open("/run/ioi-test")
    head = page.locator("g.node[data-id*='.H']").first
    node_id = head.get_attribute("data-id")
    head.click()
    assert page.inner_text("#detail-id") == node_id
    page.wait_for_selector("#detail .node-page .explanation")  # its component page, inside the run view
    assert page.locator("#detail table").count() >= 2  # the evidence of its edges
    page.click("#detail a.open-page")
    page.wait_for_selector("h1.component-id")
    assert page.url.endswith(f"/component/{node_id}") and page.inner_text("h1.component-id") == node_id
    # the transcript steps forward
    page.go_back()
    page.wait_for_selector("#step-view h3")
    page.click("#step-next")
    assert page.inner_text("#step-counter").startswith("step 2 of")


def test_an_ablation_click_changes_the_metric(tab, engine):
    ex = ioi_example()
    page = tab.open(explorer_path(kinds="head"))
    page.wait_for_selector("#attribution tbody tr")
    row = page.locator("#attribution tbody tr").first
    component = row.get_attribute("data-id")
    row.locator("input.ablate").check()
    page.wait_for_function("document.querySelector('#metric-after').dataset.value !== undefined")
    want = ops.ablate(engine, ex.prompt, [component], ex.target, ex.distractor, mode="zero")
    after = float(page.get_attribute("#metric-after", "data-value"))
    assert after == pytest.approx(want.after, abs=1e-4) and want.delta != 0
    assert float(page.get_attribute("#metric-delta", "data-value")) == pytest.approx(want.delta, abs=1e-4)
    assert after != pytest.approx(float(page.get_attribute("#metric-before", "data-value")))
    tab.shot("prompt-explorer-ablated")
