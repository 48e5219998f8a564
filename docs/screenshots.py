"""Retake the README's two MLflow screenshots from a quickstart search.

    pip install playwright                     # in any venv; not a cabb_ray dependency
    apt-get install chromium                   # Debian's headless Chromium
    mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055 &
    python docs/screenshots.py --run-id <best trial's MLflow run id> [--url http://127.0.0.1:5055]

Writes ``docs/mlflow_search.png`` (the experiment's runs with the parent run expanded and the
pq, pc, pq_th, best_pq columns and the ``cabb_ray.outcome`` tag added) and
``docs/mlflow_trial.png`` (that trial's Model metrics tab filtered to ``raw/``). The clicks
follow MLflow 3.17's UI: close the assistant panel, expand the parent run, tick the columns in
the Columns popover.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
COLUMNS = ("pq", "pc", "pq_th", "best_pq", "cabb_ray.outcome")
SETTLE_MS = 6000  # the runs table and the charts render after the page's load event


def _close_assistant(page) -> None:
    close = page.query_selector("button[aria-label='Close']")
    if close:
        close.click()
        page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:5055")
    parser.add_argument("--experiment", default="1", help="MLflow experiment id")
    parser.add_argument("--run-id", required=True, help="the trial whose losses are shown")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    base = f"{args.url}/#/experiments/{args.experiment}/runs"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1900, "height": 700})
        page.goto(f"{base}?workflowType=machine_learning")
        page.wait_for_timeout(SETTLE_MS)
        _close_assistant(page)
        page.click("button[data-component-id*='runnamecellrenderer']")  # expand the parent
        page.wait_for_timeout(1500)
        page.click("button:has-text('Columns') >> nth=0")
        page.wait_for_timeout(1500)
        popover = page.locator(
            "[data-component-id='mlflow.experiment_page.runs_table.column_selector']"
        )
        for name in COLUMNS:
            popover.get_by_text(name, exact=True).first.click()
            page.wait_for_timeout(400)
        page.keyboard.press("Escape")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(DOCS / "mlflow_search.png"))

        page = browser.new_page(viewport={"width": 1900, "height": 1000})
        page.goto(f"{base}/{args.run_id}/model-metrics?workflowType=machine_learning")
        page.wait_for_timeout(SETTLE_MS)
        _close_assistant(page)
        page.get_by_placeholder("Search").first.fill("raw/")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(DOCS / "mlflow_trial.png"))
        browser.close()
    print(f"wrote {DOCS / 'mlflow_search.png'} and {DOCS / 'mlflow_trial.png'}")


if __name__ == "__main__":
    main()
