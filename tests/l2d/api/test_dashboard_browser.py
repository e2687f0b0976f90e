"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real l2d process: the page shows
what the API says, follows new blocks without a reload, fails no request and logs no console error."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.tx import sign
from tests.conftest import ADMIN_TOKEN, Keys

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import ConsoleMessage, Page, Request, Response, async_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(CHROMIUM is None or async_playwright is None,
                                reason="no chromium (apt-get install chromium) or playwright: browser test skipped")


def _submit(node: Any, nonce: int) -> None:
    tx = sign(LOCAL, Keys.secret(1), nonce, 1, Transfer(Keys.pubkey(2), 5000 + nonce), bytes(32))
    node.post("/api/l2/tx", {"tx": tx.raw.hex()}, ADMIN_TOKEN)


async def _shown(page: Page, key: str) -> str:
    return (await page.locator(f'[data-k="{key}"]').first.text_content() or "").strip()


def _sat(n: int) -> str:
    return f"{n:,} sat"


FIGURES = ("height", "mempool", "final_height", "state_root", "supply.minted_sat", "supply.fees_sat", "supply.records")


async def _settled(page: Page, node: Any, poll: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Once the node is idle (mempool empty) and the page shows its height: the node's snapshot and state, and the
    page's figures, all at that one height (read again if a block came meanwhile)."""
    async def idle_and_shown() -> Optional[tuple[dict[str, Any], dict[str, Any], Any]]:
        s, state = node.get("/api/dashboard"), node.get("/api/l2/state")
        if s["mempool"]["size"] or state["height"] != s["height"] or await _shown(page, "height") != str(s["height"]):
            return None
        shown: dict[str, Any] = {k: await _shown(page, k) for k in FIGURES}
        shown["state"] = await page.locator("#state").text_content()
        bars = page.locator("#strip rect")
        shown["bars"] = [int(await bars.nth(i).get_attribute("data-txs") or -1) for i in range(await bars.count())]
        if await _shown(page, "height") != str(s["height"]) or node.get("/api/status")["height"] != s["height"]:
            return None
        return dict(s), dict(state), shown
    return tuple(await poll(idle_and_shown, 30, "the node idle and the page showing its height"))  # type: ignore


async def test_the_page_shows_the_api_s_figures_and_follows_new_blocks_live(
        tmp_path: Path, l2d_process: Any, node_toml: Any, poll: Callable[..., Any]) -> None:
    alloc = {Keys.pubkey(1): 10_000_000}
    node = l2d_process(node_toml(tmp_path / "node.toml", alloc, ADMIN_TOKEN, block={"interval_ms": 100}))
    for nonce in range(3):
        _submit(node, nonce)
    failed: list[str] = []
    errors: list[str] = []
    loads: list[str] = []

    def on_response(r: Response) -> None:
        if r.status >= 400:
            failed.append(f"{r.status} {r.url}")

    def on_console(m: ConsoleMessage) -> None:
        if m.type == "error":
            errors.append(m.text)

    def on_failed(r: Request) -> None:
        failed.append(f"{r.failure} {r.url}")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1600})
            page.on("console", on_console)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", on_failed)
            page.on("response", on_response)
            page.on("load", lambda _: loads.append(page.url))
            await page.goto(node.url("/"))
            s, state, shown = await _settled(page, node, poll)
            assert shown["height"] == str(s["height"]) == str(state["height"])
            assert shown["state"] == s["status"]["state"] == "READY"
            assert shown["mempool"] == "0" and shown["final_height"] == str(s["final_height"])
            assert shown["supply.minted_sat"] == _sat(state["supply"]["minted_sat"])
            assert shown["supply.fees_sat"] == _sat(state["supply"]["fees_sat"]) == _sat(3)
            assert shown["supply.records"] == str(state["records"])
            assert s["state_root"] == state["state_root"] and s["state_root"].startswith(shown["state_root"][:12])
            assert len(shown["bars"]) == len(s["blocks"]) and sum(shown["bars"]) == 3
            # new blocks: the page follows them without a reload
            before = s["height"]
            for nonce in range(3, 6):
                _submit(node, nonce)
            s, state, shown = await _settled(page, node, poll)
            assert s["height"] > before and shown["height"] == str(state["height"])
            assert shown["supply.fees_sat"] == _sat(state["supply"]["fees_sat"]) == _sat(6)
            assert sum(shown["bars"]) == 6
            assert await page.locator("#mode").text_content() == "live"
            assert "STALE" not in (await page.locator("#freshness").text_content() or "")
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert len(loads) == 1 and not failed and not errors, (loads, failed, errors)
        finally:
            await browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert node.stop() == 0  # the open live feed does not hold the daemon's stop
