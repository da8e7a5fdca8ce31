"""The status page in a real headless Chromium: sign in, see a failure, approve an update
and see the agent offered it, download the CSV, sign out; a wrong token and a missing
CSRF token are refused.

One browser serves the whole module. Selenium calls block, so they run in a thread
while the relay (in this process) keeps serving on the event loop. Screenshots go
to ``$RELAY_SCREENSHOT_DIR`` when set (``docs/screenshots`` in the repository),
else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.wait import WebDriverWait

from tests.fleet_support import TOKEN, V2, populate, start_fleet
from tests.support import relay_state

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        f"none of {', '.join(names)} is on PATH: install the Debian packages chromium and "
        "chromium-driver (.ci/run does)"
    )


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = _tool("chromium", "chromium-browser", "google-chrome")
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,900")
    service = Service(executable_path=_tool("chromedriver"))
    drv = webdriver.Chrome(service=service, options=options)
    drv.set_page_load_timeout(20)
    yield drv
    drv.quit()


def _replaced(page):
    """``staleness_of(page)``, also when Chromium answers that the node left the document.

    While the next page replaces this one, ChromeDriver may answer "Node with given id
    does not belong to the document" instead of a stale-element error: the same fact.
    """
    stale = staleness_of(page)

    def check(driver) -> bool:
        try:
            return stale(driver)
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return True
            raise

    return check


class Browser:
    """The module's browser, driven from a thread so the in-process relay keeps serving."""

    def __init__(self, driver, base: str, shots: Path) -> None:
        self.d = driver
        self.base = base.rstrip("/")
        self.shots = shots

    async def do(self, func, *args):
        return await asyncio.to_thread(func, *args)

    async def get(self, path: str) -> None:
        await self.do(self.d.get, self.base + path)

    async def text(self) -> str:
        return await self.do(lambda: self.d.find_element(By.TAG_NAME, "body").text)

    def _click_and_wait(self, element, navigate: bool) -> None:
        page = self.d.find_element(By.TAG_NAME, "html")
        element.click()
        if navigate:  # wait until the next page replaced this one
            WebDriverWait(self.d, 10).until(_replaced(page))

    async def click(self, css: str, *, navigate: bool = True) -> None:
        await self.do(
            lambda: self._click_and_wait(self.d.find_element(By.CSS_SELECTOR, css), navigate)
        )

    async def sign_in(self, token: str) -> None:
        await self.get("/ui/login")

        def fill():
            box = self.d.find_element(By.NAME, "token")
            box.clear()
            box.send_keys(token)
            self._click_and_wait(self.d.find_element(By.CSS_SELECTOR, "form.login button"), True)

        await self.do(fill)

    async def shot(self, name: str) -> None:
        """Save the whole page (the window grown to its height) as ``name``."""
        self.shots.mkdir(parents=True, exist_ok=True)

        def take():
            size = self.d.get_window_size()
            height = self.d.execute_script("return document.documentElement.scrollHeight")
            self.d.set_window_size(size["width"], min(max(height + 140, 600), 4000))
            self.d.save_screenshot(str(self.shots / name))
            self.d.set_window_size(size["width"], size["height"])

        await self.do(take)

    async def url(self) -> str:
        return await self.do(lambda: self.d.current_url)


@pytest.fixture
async def browser(driver, tmp_path, aiohttp_server):
    fleet = await start_fleet(tmp_path, aiohttp_server, **{"store.max_bytes": "50MB"})
    await populate(fleet)
    shots = Path(os.environ.get("RELAY_SCREENSHOT_DIR") or tmp_path / "shots")
    b = Browser(driver, fleet.url, shots)
    b.fleet = fleet
    await asyncio.to_thread(driver.set_window_size, 1280, 900)
    await b.get("/ui/login")
    await asyncio.to_thread(driver.delete_all_cookies)
    return b


async def test_sign_in_failure_approve_csv_sign_out(browser, tmp_path):
    b, fleet = browser, browser.fleet
    # Nothing without signing in.
    await b.get("/ui/")
    assert (await b.url()).endswith("/ui/login")
    await b.shot("login.png")
    # A wrong token is refused.
    await b.sign_in("not-the-token")
    assert "Wrong token." in await b.text()
    assert await b.do(b.d.get_cookie, "relay_session") is None
    # The right one opens a session: HttpOnly, SameSite=Strict, not the token.
    await b.sign_in(TOKEN)
    assert (await b.url()).endswith("/ui/")
    cookie = await b.do(b.d.get_cookie, "relay_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    # The failed agent and its reason.
    page = await b.text()
    assert "broken" in page and "install_failed" in page and "disk full" in page
    assert "deferred" in page and "pending" in page
    await b.shot("status.png")
    await b.click('a[href="/ui/agents/broken"]')
    page = await b.text()
    assert "Recent events (newest first)" in page and "install_failed" in page
    await b.shot("agent.png")

    # A new version waits for approval; approve it in the page.
    await fleet.publish(V2, "1.1.0", wait_deltas=False)
    answer = (await asyncio.to_thread(fleet.agent("ok").checkin))[1]
    assert {o["version"] for o in answer["offers"] if o["action"] == "install"} == set()
    await b.get("/ui/#updates")
    await b.click('form[aria-label="app 1.1.0 for all groups"] button[value="approved"]')
    assert (await b.url()).endswith("/ui/#updates")
    answer = (await asyncio.to_thread(fleet.agents["ok"].checkin))[1]
    (offer,) = answer["offers"]
    assert offer["action"] == "install" and offer["version"] == "1.1.0"
    await b.get("/ui/?state=pending")
    rows = await b.do(
        lambda: [
            r.text for r in b.d.find_elements(By.CSS_SELECTOR, "table[aria-label=agents] tbody tr")
        ]
    )
    assert any(r.split()[0] == "ok" and "1.1.0" in r.split() for r in rows), rows
    _, audit, _ = await fleet.admin("GET", "/v1/admin/audit")
    assert (
        audit["audit"][-1]["action"] == "set-approved" and audit["audit"][-1]["version"] == "1.1.0"
    )

    # The CSV download.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    await b.do(
        b.d.execute_cdp_cmd,
        "Browser.setDownloadBehavior",
        {"behavior": "allow", "downloadPath": str(downloads)},
    )
    await b.get("/ui/")
    await b.click('a[href="/ui/report.csv?state=failed"]', navigate=False)
    target = downloads / "relay-report.csv"
    for _ in range(600):
        if target.exists() and target.stat().st_size:
            break
        await asyncio.sleep(0.05)
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"), newline="")))
    assert [(r["agent_id"], r["state"], r["reason"]) for r in rows] == [
        ("broken", "failed", "install_failed")
    ]

    # Sign out: the session is gone.
    await b.click("header form button")
    assert (await b.url()).endswith("/ui/login")
    await b.get("/ui/")
    assert (await b.url()).endswith("/ui/login")
    assert len(relay_state(fleet.relay).config.admin_token()) > 0


async def test_missing_csrf_token_is_refused(browser):
    b, fleet = browser, browser.fleet
    await b.sign_in(TOKEN)
    await b.get("/ui/")
    before = relay_state(fleet.relay).policy.state
    # Remove the hidden CSRF field from one approval form, then submit it.
    form = 'form[aria-label="app 1.0.0 for all groups"]'
    await b.do(
        b.d.execute_script,
        f"document.querySelector('{form} input[name=csrf]').remove()",
    )
    await b.click(f'{form} button[value="declined"]')
    assert "missing or wrong CSRF token" in await b.text()
    assert relay_state(fleet.relay).policy.state == before
    # The same with a wrong token.
    await b.get("/ui/")
    await b.do(
        b.d.execute_script,
        f"document.querySelector('{form} input[name=csrf]').value = 'forged'",
    )
    await b.click(f'{form} button[value="declined"]')
    assert "missing or wrong CSRF token" in await b.text()
    assert relay_state(fleet.relay).policy.state == before


async def test_readable_on_a_phone(browser):
    b = browser
    await b.sign_in(TOKEN)
    await b.do(b.d.set_window_size, 390, 844)
    await b.get("/ui/")
    # The page itself does not scroll sideways; wide tables scroll in their box.
    widths = await b.do(
        b.d.execute_script,
        "return [document.documentElement.scrollWidth, window.innerWidth]",
    )
    assert widths[0] <= widths[1], widths
    await b.shot("phone.png")
