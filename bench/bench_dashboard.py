"""The dashboard in a real browser: time to first render and bytes transferred for the page, against a real daemon.

    python bench/bench_dashboard.py [--loads N]

Debian's chromium driven by Playwright (skipped with {"skipped": reason} without them). Each load is a fresh page:
the time from navigation start to the first snapshot rendered (the page records performance.now() then), and the
bytes of the page and of /api/dashboard as the browser transferred them (Resource Timing). The baseline, in the
same run: the time to fetch the page's HTML alone (navigation to its load event with nothing rendered).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common import keypairs, start_l2d  # noqa: E402


async def _run(api: str, loads: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    first, html_only, page_bytes, api_bytes = [], [], [], []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium)
        try:
            for _ in range(loads):
                page = await browser.new_page()
                await page.goto(api + "/")
                await page.wait_for_function("window.l2dFirstRenderMs !== undefined", polling=20, timeout=60_000)
                first.append(await page.evaluate("window.l2dFirstRenderMs"))
                nav = await page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
                html_only.append(nav["loadEventEnd"])
                page_bytes.append(nav["transferSize"])
                res = await page.evaluate("performance.getEntriesByType('resource').map(e => e.toJSON())")
                api_bytes.append(sum(r["transferSize"] for r in res if r["name"].endswith("/api/dashboard")))
                await page.close()
        finally:
            await browser.close()
    mid = loads // 2
    return {"loads": loads, "first_render_ms": round(sorted(first)[mid], 1),
            "html_load_event_ms": round(sorted(html_only)[mid], 1),
            "page_bytes": sorted(page_bytes)[mid], "snapshot_bytes": sorted(api_bytes)[mid]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, default=9)
    a = ap.parse_args(argv)
    try:
        import playwright  # noqa: F401
    except ImportError:
        out: dict[str, Any] = {"skipped": "playwright is not installed"}
    else:
        if not (shutil.which("chromium") or shutil.which("chromium-browser")):
            out = {"skipped": "chromium is not installed"}
        else:
            with tempfile.TemporaryDirectory(prefix="l2d-bench-dashboard-") as d:
                node, api = start_l2d(Path(d), {pk: 10**9 for _, pk in keypairs(3)}, REPO)
                try:
                    out = asyncio.run(_run(api, a.loads))
                finally:
                    node.stop()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
