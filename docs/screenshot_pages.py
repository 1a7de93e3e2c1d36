"""The pictures of ``make screenshots`` (docs/screenshots.py): one function per picture, each
driving headless Chromium through a prepared Dagster UI and waiting for its content first.

Also what both halves share: the days pictured, the window, and the small helpers.

Example::

    take_pictures("http://127.0.0.1:3000", "/usr/bin/chromium", Path("docs/images"))
    # -> [PosixPath('docs/images/asset-graph.png'), ...]
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

COLLECTED_DAYS = ["2026-11-22", "2026-11-23"]
IN_FLIGHT_DAY = "2026-11-24"
CANCELLED_DAY = "2026-11-25"  # in flight like IN_FLIGHT_DAY, then cancelled by its job
VIEWPORT = {"width": 1400, "height": 900}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


def log(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def take_pictures(url: str, chromium: str, out: Path) -> list[Path]:
    """Drive headless Chromium through the UI; every picture waits for its content first."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport=VIEWPORT, timezone_id="UTC", locale="en-US")
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.goto(url + "/asset-groups")
            dismiss_modal(page)
            page.get_by_text("Hide navigation").click()  # remembered for every later page
            for name, shoot in PICTURES:
                path = out / name
                page.set_viewport_size(VIEWPORT)
                shoot(page, url)
                check_clean(page, name)
                page.screenshot(path=str(path))
                saved.append(path)
                log(f"saved {path} ({path.stat().st_size // 1024} KB)")
        finally:
            browser.close()
    return saved


def dismiss_modal(page: Any) -> None:
    """Close Dagster's "Join the Dagster community" dialog if it shows (nux is off anyway)."""
    for label in ("Skip", "Dismiss", "No thanks", "Close"):
        button = page.get_by_role("button", name=label, exact=True)
        if button.count() and button.first.is_visible():
            button.first.click()


def settle(page: Any) -> None:
    """No spinner left and no dialog in the way; then let the last paint land."""
    dismiss_modal(page)
    wait_for(
        "the page's spinners to stop",
        lambda: (
            page.locator('[class*="pinner"]:visible, [role="progressbar"]:visible').count() == 0
        ),
        timeout=60,
        every=0.25,
    )
    page.wait_for_timeout(800)


def check_clean(page: Any, name: str) -> None:
    """A picture with an error toast or a dialog over it is not taken."""
    toasts = page.locator('[class*="toast"]:visible, [class*="Toast"]:visible')
    if toasts.count():
        raise RuntimeError(f"{name}: the UI shows a toast: {toasts.first.inner_text()!r}")
    dialogs = page.locator('[role="dialog"]:visible')
    if dialogs.count():
        text = dialogs.first.inner_text()[:200]
        raise RuntimeError(f"{name}: a dialog covers the page: {text!r}")


def asset_graph(page: Any, url: str) -> None:
    """The lineage, zoomed so that every node shows its details, centred."""
    page.goto(url + "/asset-groups")
    page.locator('button:has([aria-label="panel_show_right"])').click()  # hide the asset list
    page.locator("svg foreignObject").nth(7).wait_for()
    settle(page)
    width, height = VIEWPORT["width"], VIEWPORT["height"]
    canvas = {"x0": 80.0, "y0": 120.0, "x1": width - 60.0, "y1": height - 20.0}
    for _ in range(12):  # zoom (ctrl + wheel around the graph's centre) until it fills the view
        box = _graph_box(page)
        scale = min(
            (canvas["x1"] - canvas["x0"]) / (box["x1"] - box["x0"]),
            (canvas["y1"] - canvas["y0"]) / (box["y1"] - box["y0"]),
        )
        if scale < 1.08:
            break
        page.mouse.move((box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2)
        page.keyboard.down("Control")
        page.mouse.wheel(0, -40)
        page.keyboard.up("Control")
        page.wait_for_timeout(400)
    for _ in range(6):  # then pan (a plain wheel) until it is centred
        box = _graph_box(page)
        dx = (canvas["x0"] + canvas["x1"]) / 2 - (box["x0"] + box["x1"]) / 2
        dy = (canvas["y0"] + canvas["y1"]) / 2 - (box["y0"] + box["y1"]) / 2
        if abs(dx) < 8 and abs(dy) < 8:
            break
        page.mouse.move((canvas["x0"] + canvas["x1"]) / 2, (canvas["y0"] + canvas["y1"]) / 2)
        page.mouse.wheel(-dx / 0.7, -dy / 0.7)
        page.wait_for_timeout(400)
    page.mouse.move(canvas["x1"] - 10, canvas["y0"] + 10)  # no node hovered (highlighted)
    page.get_by_text("Latest event").first.wait_for()  # nodes drawn in full, not as names only
    settle(page)


def _graph_box(page: Any) -> dict[str, float]:
    return page.evaluate(
        """() => {
          const r = [...document.querySelectorAll('svg foreignObject')]
            .map(e => e.getBoundingClientRect()).filter(b => b.width > 0);
          return {x0: Math.min(...r.map(b => b.left)), y0: Math.min(...r.map(b => b.top)),
                  x1: Math.max(...r.map(b => b.right)), y1: Math.max(...r.map(b => b.bottom))};
        }"""
    )


def live_progress(page: Any, url: str) -> None:
    """The in-flight partition's progress observations on review_sentiment_batches."""
    page.goto(f"{url}/assets/review_sentiment_batches?view=events&partition={IN_FLIGHT_DAY}")
    page.get_by_text("eta_seconds", exact=True).first.wait_for()
    settle(page)


def results_partition(page: Any, url: str) -> None:
    """A collected partition of review_sentiment_results: its metadata and summary."""
    day = COLLECTED_DAYS[-1]
    page.goto(f"{url}/assets/review_sentiment_results?view=partitions&partition={day}")
    page.get_by_text("cost_reported_by_provider_usd", exact=True).first.wait_for()
    page.get_by_text("succeeded", exact=True).last.wait_for()  # the summary's table
    settle(page)
    fit_height(page, page.get_by_text("succeeded", exact=True).last)


def checks_per_partition(page: Any, url: str) -> None:
    """The failure_rate check, partition by partition: the breached day is selected."""
    day = COLLECTED_DAYS[0]
    page.goto(f"{url}/assets/review_sentiment_failed?view=checks")
    page.get_by_text("failure_rate", exact=True).first.wait_for()
    page.get_by_text("Partitions", exact=True).filter(visible=True).last.click()
    page.get_by_text(day, exact=True).filter(visible=True).last.click()
    page.get_by_text(re.compile(r"% \(at most ")).first.wait_for()  # the check's rate
    settle(page)


def failed_table(page: Any, url: str) -> None:
    """A partition of review_sentiment_failed: how many rows failed, why, how many retryable."""
    day = COLLECTED_DAYS[0]
    page.goto(f"{url}/assets/review_sentiment_failed?view=partitions&partition={day}")
    page.get_by_text("error_codes", exact=True).first.wait_for()
    page.get_by_text("retryable", exact=True).first.wait_for()
    settle(page)
    fit_height(page, page.get_by_text("retryable", exact=True).first)


def cancel_run(page: Any, url: str) -> None:
    """The cancel job's run: its log names each batch it cancelled."""
    page.goto(f"{url}/runs/{_latest_run_id(url, 'review_sentiment_cancel')}")
    first = page.get_by_text(re.compile(": cancelled batch ")).first
    first.wait_for()
    settle(page)
    # The log opens scrolled to its end; scroll it (not the page) to the first batch cancelled.
    first.evaluate(
        """e => {
          let box = e.parentElement;
          while (box && !(box.scrollHeight > box.clientHeight
                          && /auto|scroll/.test(getComputedStyle(box).overflowY))) {
            box = box.parentElement;
          }
          if (box) box.scrollTop += e.getBoundingClientRect().top
                                    - box.getBoundingClientRect().top - 8;
        }"""
    )
    page.wait_for_timeout(800)


def cancelled_partition(page: Any, url: str) -> None:
    """The cancelled day of review_sentiment_failed: its rows failed as batch_cancelled."""
    page.goto(f"{url}/assets/review_sentiment_failed?view=partitions&partition={CANCELLED_DAY}")
    page.get_by_text("error_codes", exact=True).first.wait_for()
    page.get_by_text("retryable", exact=True).first.wait_for()
    settle(page)
    fit_height(page, page.get_by_text("retryable", exact=True).first)


def _latest_run_id(url: str, job: str) -> str:
    """The newest run of ``job``, asked of the webserver (so ``--url`` works too)."""
    query = (
        "query($f: RunsFilter) {runsOrError(filter: $f, limit: 1) {... on Runs {results {runId}}}}"
    )
    body = {"query": query, "variables": {"f": {"pipelineName": job}}}
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["data"]["runsOrError"]["results"]
    if not runs:
        raise RuntimeError(f"no run of {job} to picture")
    return runs[0]["runId"]


def fit_height(page: Any, last: Any, most: int = 1500) -> None:
    """Make the window tall enough to show everything down to ``last`` (a metadata table does
    not fit 900 pixels), without scrolling the page header out of the picture."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": most})
    page.wait_for_timeout(500)
    box = last.bounding_box()
    if box is None:
        raise RuntimeError("the element to show is not on the page")
    bottom = box["y"] + box["height"]
    for ancestor in ("tr", "table"):  # the whole row, and the summary's whole table
        outer = last.locator(f"xpath=ancestor::{ancestor}[1]")
        if outer.count():
            outer_box = outer.bounding_box()
            if outer_box:
                bottom = max(bottom, outer_box["y"] + outer_box["height"])
    height = int(min(most, max(VIEWPORT["height"], bottom + 16)))
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    settle(page)


PICTURES: list[tuple[str, Callable[[Any, str], None]]] = [
    ("asset-graph.png", asset_graph),
    ("live-progress.png", live_progress),
    ("results-partition.png", results_partition),
    ("checks-per-partition.png", checks_per_partition),
    ("failed-table.png", failed_table),
    ("cancel-run.png", cancel_run),
    ("cancelled-partition.png", cancelled_partition),
]
