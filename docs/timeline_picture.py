"""Screenshot a timeline page's header and chart: the README picture (``docs/timeline.png``).

    voicefsm simulate --quiet --timeline /tmp/interview.html
    python docs/timeline_picture.py /tmp/interview.html docs/timeline.png

Needs the test dependencies (Playwright) and Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


async def screenshot(page_url: str, picture: str) -> None:
    """Render ``page_url`` at 1300 px wide and save its summary, chart and legend."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1300, "height": 900})
            await page.goto(page_url)
            bottom = await page.eval_on_selector(".legend", "e => e.getBoundingClientRect().bottom")
            await page.screenshot(
                path=picture, clip={"x": 0, "y": 0, "width": 1300, "height": bottom + 16}
            )
        finally:
            await browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    asyncio.run(screenshot(Path(sys.argv[1]).absolute().as_uri(), sys.argv[2]))
