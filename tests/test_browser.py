"""End to end in headless Chromium (Debian's, driven by Playwright): the chat page and the dashboard.

Skipped with a reason when /usr/bin/chromium or Playwright is missing; .ci/run installs both.
A failing test leaves a screenshot of each page it had open under test-output/.
"""

import contextlib
import os
import re
from pathlib import Path

import pytest

from tests.conftest import wait_for_state
from tests.test_agent_output import OutputLines
from tests.test_ops_cli import LIMITS, shown_limits
from tests.test_start_checks import USER_AGENTS
from corral.supervisor import errors
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
TOKEN = "browser-test-admin-token"
WAIT_MS = 20_000  # generous: the machine may be loaded

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install playwright)"),
]


@pytest.fixture
async def browser(tmp_path):
    """A headless Chromium with an empty profile."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def server(aiohttp_server, make_config):
    """A live corral server (dev mode on loopback, with an admin token)."""
    app = create_app(make_config(admin_token=TOKEN))
    return await aiohttp_server(app)


@contextlib.asynccontextmanager
async def screenshots_on_failure(name: str, **pages):
    """On an exception, save a screenshot of each page as test-output/NAME-PAGE.png."""
    try:
        yield
    except BaseException:
        OUTPUT.mkdir(exist_ok=True)
        for label, page in pages.items():
            with contextlib.suppress(Exception):
                await page.screenshot(path=str(OUTPUT / f"{name}-{label}.png"), full_page=True)
        raise


async def live_session(sup, session_id: str, tenant: str = "acme"):
    """A session of the supervisor with its process running."""
    s = await sup.get_or_create(session_id, tenant)
    await sup.ensure_live(s)
    return s


async def open_dashboard(page, server) -> None:
    """Open the dashboard and give it the admin token."""
    await page.goto(str(server.make_url("/admin")))
    await page.fill("#token", TOKEN)
    await page.press("#token", "Enter")


async def test_chat_page_streams_and_keeps_the_conversation(server, browser):
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("chat", chat=page):
        await page.goto(str(server.make_url("/")))
        await expect(page.locator("#status")).not_to_have_text(re.compile("connecting|offline"), timeout=WAIT_MS)
        session_id = await page.evaluate("localStorage.getItem('corral_session_id')")
        assert await page.locator("#session-id").text_content() == session_id
        assert await space_below_the_input(page) < 4  # at the bottom of the window, even with no message yet

        await page.fill("#input", "my name is Alice")
        await page.press("#input", "Enter")
        await expect(page.locator(".msg.assistant")).to_have_text(["Got it: your name is Alice."], timeout=WAIT_MS)
        await page.fill("#input", "what is my name?")
        await page.click("#send")
        assistant = page.locator(".msg.assistant")
        await expect(assistant).to_have_text(["Got it: your name is Alice.", "Your name is Alice."], timeout=WAIT_MS)
        # The POSTs said wait:false: the replies could only come over the event stream, in chunks.
        assert await page.evaluate("chatManager.deltaCount") >= 4

        await page.reload()
        await expect(page.locator(".msg")).to_have_count(4, timeout=WAIT_MS)
        await expect(page.locator(".msg.user").first).to_have_text("my name is Alice")
        assert await page.evaluate("localStorage.getItem('corral_session_id')") == session_id

        await page.click("#new-session")
        await expect(page.locator(".msg")).to_have_count(0)
        assert await page.evaluate("localStorage.getItem('corral_session_id')") != session_id

        await expect(page.locator("#status")).not_to_have_text(re.compile("connecting|offline"), timeout=WAIT_MS)
        # more than a window holds, drawn as the page draws messages: the conversation scrolls, the input stays put
        await page.evaluate("chatManager.onMessages([...Array(30).keys()].map((i) => ({role: 'user', content: `line ${i}`})))")
        await expect(page.locator(".msg")).to_have_count(30)
        assert await space_below_the_input(page) < 4
        assert await page.locator(".msg").last.is_visible()


async def space_below_the_input(page) -> float:
    """Pixels between the chat input's bottom edge and the bottom of the window."""
    box = await page.locator("#composer").bounding_box()
    return page.viewport_size["height"] - (box["y"] + box["height"])


async def test_dashboard_lists_live_and_kills(server, browser, aiohttp_client):
    sup = server.app[SUPERVISOR]
    victim, bystander = await live_session(sup, "victim"), await live_session(sup, "bystander")
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("dashboard", admin=page):
        await page.goto(str(server.make_url("/admin")))
        await expect(page.locator("#login")).to_be_visible()  # the stream answered 401: it asks
        await page.fill("#token", TOKEN)
        await page.press("#token", "Enter")
        rows = page.locator("#sessions tbody tr")
        await expect(rows).to_have_count(2)
        await expect(page.locator("tr[data-session-id=victim] td").nth(2)).to_have_text(str(victim.pid))
        assert await page.evaluate("sessionStorage.getItem('corral_admin_token')") == TOKEN

        # A session that starts now shows up without a reload (pushed over SSE).
        await live_session(sup, "late", "globex")
        await expect(rows).to_have_count(3)

        # Kill asks first: dismissed, nothing happens; accepted, the session goes.
        asked = []

        async def answer(dialog):
            asked.append(dialog.message)
            await (dialog.accept() if len(asked) > 1 else dialog.dismiss())

        page.on("dialog", answer)
        await page.click("tr[data-session-id=victim] button.kill")
        await expect(page.locator("tr[data-session-id=victim] td").nth(3)).to_have_text("idle")
        assert len(asked) == 1 and "victim" in asked[0] and victim.state == "idle"
        await page.click("tr[data-session-id=victim] button.kill")
        await expect(page.locator("tr[data-session-id=victim]")).to_have_count(0)
        assert await wait_for_state(sup, victim, {"killed"}) == "killed"
        assert len(asked) == 2
        await expect(rows).to_have_count(2)
        assert bystander.state == "idle"


async def test_dashboard_shows_each_sessions_limits_beside_its_memory(aiohttp_server, make_config, browser):
    server = await aiohttp_server(create_app(make_config(admin_token=TOKEN, **LIMITS)))
    sup = server.app[SUPERVISOR]
    s, long_id = await live_session(sup, "limited"), await live_session(sup, "3f0c1a2e-9b7d-4c1e-8a5f-0123456789ab")
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("dashboard-limits", admin=page):
        await open_dashboard(page, server)
        headers = page.locator("#sessions thead th")
        await expect(headers.nth(5)).to_have_text("RSS")
        assert await headers.all_text_contents() == [
            "Session", "Tenant", "PID", "State", "Idle", "RSS", "USS", "CPU %", "Cores", "Procs", "Files",
            "Messages", "Restarts", "Node", ""]
        cells = page.locator("tr[data-session-id=limited] td")
        await expect(cells.nth(2)).to_have_text(str(s.pid))
        assert [await cells.nth(i).text_content() for i in (8, 9, 10)] == shown_limits(sup, s, dash="–")
        # 15 columns and a long id still fit a 1280-pixel window: the id gives way (ellipsis, full in its title)
        await expect(page.locator(f"tr[data-session-id='{long_id.id}'] button.kill")).to_be_in_viewport(ratio=1)
        await expect(page.locator(f"tr[data-session-id='{long_id.id}'] td.sid")).to_have_attribute("title", long_id.id)


async def test_a_locked_dashboard_says_it_needs_the_admin_token(server, browser):
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("dashboard-locked", admin=page):
        await page.goto(str(server.make_url("/admin")))
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#locked")).to_have_text(re.compile("needs the server's admin token"))
        await expect(page.locator("#empty")).to_be_hidden()  # not "No live sessions": it cannot know
        await expect(page.locator("#status")).to_have_text("locked")
        await page.fill("#token", "not-the-token")
        await page.press("#token", "Enter")
        await expect(page.locator("#login-error")).to_have_text("That token was refused.")
        await expect(page.locator("#empty")).to_be_hidden()
        await page.fill("#token", TOKEN)
        await page.press("#token", "Enter")
        await expect(page.locator("#empty")).to_be_visible()  # now it knows: no live sessions
        await expect(page.locator("#login")).to_be_hidden()


async def open_logs(page, server, session_id: str):
    """Open the dashboard and a session's Logs panel; the panel's text."""
    await open_dashboard(page, server)
    await page.click(f"tr[data-session-id={session_id}] button.logs")
    return page.locator(f"tr[data-logs-for={session_id}] pre.logs")


async def test_dashboard_shows_a_sessions_agent_output(aiohttp_server, make_config, browser):
    server = await aiohttp_server(create_app(make_config(admin_token=TOKEN, agent="tests.output_agents:Printer")))
    sup = server.app[SUPERVISOR]
    lines = OutputLines(sup)
    s = await sup.get_or_create("printer", "acme")
    await sup.command(s, "say", {"text": "a line for the dashboard", "stream": "stderr"})
    await lines.wait_for("a line for the dashboard")
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("dashboard-logs", admin=page):
        panel = await open_logs(page, server, "printer")
        await expect(panel).to_contain_text(f"{s.pid} stderr a line for the dashboard")
        await sup.command(s, "say", {"text": "a later line"})
        await lines.wait_for("a later line")
        await page.click("tr[data-logs-for=printer] button")  # Refresh
        await expect(panel).to_contain_text(f"{s.pid} stdout a later line")
        await page.click("tr[data-session-id=printer] button.logs")
        await expect(page.locator("tr[data-logs-for=printer]")).to_have_count(0)


async def test_dashboard_logs_show_the_source_line_of_a_crash(aiohttp_server, make_config, browser, tmp_path, monkeypatch):
    (tmp_path / "mybot.py").write_text(USER_AGENTS)  # in a dir the sandboxed agent cannot read
    monkeypatch.syspath_prepend(str(tmp_path))
    server = await aiohttp_server(create_app(make_config(admin_token=TOKEN, agent="mybot:Raises")))
    sup = server.app[SUPERVISOR]
    s = await sup.get_or_create("crashy", "acme")
    with pytest.raises(errors.AgentDied):
        await sup.chat(s, "hello")
    await sup.ensure_live(s)  # respawned: its row is live, its tail kept across the restart
    page = await browser.new_page()
    async with screenshots_on_failure("dashboard-traceback", admin=page):
        await expect(await open_logs(page, server, "crashy")).to_contain_text(
            'return str(total["pears"])  # the line a reader of the traceback needs', timeout=WAIT_MS)


async def test_chat_page_asks_for_an_api_key_when_the_server_wants_one(aiohttp_server, make_config, tmp_path, browser):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenants.alice]\nkeys = ["alice-browser-key"]\n')
    server = await aiohttp_server(create_app(make_config(tenants=tenants)))
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    dialogs = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))  # there must be none
    async with screenshots_on_failure("chat-key", chat=page):
        await page.goto(str(server.make_url("/")))
        await expect(page.locator("#key-form")).to_be_visible()  # the stream answered 401: a form asks
        await expect(page.locator("#status")).to_have_text("locked")
        await expect(page.locator("#send")).to_be_disabled()  # nothing can be sent without a key
        await expect(page.locator("#input")).to_be_disabled()
        await page.fill("#api-key", "a-wrong-key")
        await page.press("#api-key", "Enter")
        await expect(page.locator("#key-reason")).to_have_text("That key was refused.")
        await page.fill("#api-key", "alice-browser-key")
        await page.click("#key-form button")
        await expect(page.locator("#key-form")).to_be_hidden()
        await expect(page.locator("#send")).to_be_enabled()
        await page.fill("#input", "hello")
        await page.press("#input", "Enter")
        await expect(page.locator(".msg.assistant")).to_have_text(["You said: hello"], timeout=WAIT_MS)
        assert dialogs == []
        assert await page.evaluate("localStorage.getItem('corral_api_key')") == "alice-browser-key"
        session_id = await page.evaluate("localStorage.getItem('corral_session_id')")
        assert server.app[SUPERVISOR].sessions[f"alice/{session_id}"].tenant == "alice"


async def test_dashboard_plots_the_node_the_tenants_and_a_session_as_the_api_says(aiohttp_server, make_config, browser, tmp_path):
    """The node's last hour, usage by tenant and a session's life are drawn (uPlot, shipped) with the API's numbers."""
    app = create_app(make_config(admin_token=TOKEN, usage_interval=0.3))
    server = await aiohttp_server(app)
    sup = app[SUPERVISOR]
    for sid, tenant in (("a1", "alice"), ("b1", "bob")):
        s = await live_session(sup, sid, tenant)
        await sup.chat(s, "hello")
        await sup.stop(s, "ended")
    await live_session(sup, "watch", "carol")
    await live_session(sup, "watch", "dave")  # the same id in another tenant: each row plots its own session
    headers = {"Authorization": f"Bearer {TOKEN}"}
    page = await browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(WAIT_MS)
    async with screenshots_on_failure("plots", admin=page):
        await open_dashboard(page, server)
        await page.wait_for_function("window.corralPlots && corralPlots.charts.live && corralPlots.charts.live.data[0].length >= 2")
        await page.wait_for_function("corralPlots.tenantChart !== null")
        for tenant in ("carol", "dave"):  # a row opens its plot
            await page.click(f"tr[data-session-id=watch][data-tenant={tenant}] td.sid")
            await page.wait_for_function(f"corralPlots.sessionCharts['{tenant}/watch'] && "
                                         f"corralPlots.sessionCharts['{tenant}/watch'].data[0].length >= 1")
        drawn = await page.evaluate("""() => ({
            node: Object.fromEntries(Object.entries(corralPlots.charts).map(([k, u]) => [k, u.data])),
            tenants: corralPlots.tenantChart.data, tenantNames: Object.keys(corralPlots.tenants.tenants).sort(),
            sessions: [corralPlots.sessionCharts["carol/watch"].data, corralPlots.sessionCharts["dave/watch"].data],
            canvases: document.querySelectorAll("#plots canvas, tr.plot-row canvas").length,
        })""")
        shot = await page.screenshot(path=str(tmp_path / "dashboard-plots.png"), full_page=True)
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / "dashboard-plots.png").write_bytes(shot)

        async with server_client(server) as client:
            node = await (await client.get("/admin/timeline", headers=headers)).json()
            usage = await (await client.get("/admin/usage?since=24h", headers=headers)).json()
            lives = [await (await client.get(f"/admin/sessions/watch/timeline?tenant={tenant}", headers=headers)).json()
                     for tenant in ("carol", "dave")]
        assert drawn["canvases"] >= 8  # 5 node charts, the tenants' and the two sessions'
        points = {t: i for i, t in enumerate(node["t"])}  # the ring moved on since: compare the points both have
        for key in ("live", "memory_mib", "cpu_cores", "turns_per_s"):
            shown = dict(zip(*drawn["node"][key]))
            assert shown and all(node[key][points[t]] == value for t, value in shown.items() if t in points), key
        assert max(drawn["node"]["live"][1]) == 2  # carol's and dave's; alice's and bob's ended before the first sample
        assert sum(drawn["node"]["ends"][1]) == sum(node["ends"]["ended"]) == 2  # the only reason so far
        assert drawn["tenantNames"] == ["alice", "bob", "carol", "dave"]
        for i, tenant in enumerate(drawn["tenantNames"][:2]):  # ended: their sums no longer move
            used = usage["tenants"][tenant]
            assert drawn["tenants"][1][i] == used["cpu_seconds"] and drawn["tenants"][3][i] == used["turns"] == 1
            assert abs(drawn["tenants"][2][i] - used["memory_mib_seconds"] / 3600) < 1e-9
        for session, life in zip(drawn["sessions"], lives):
            assert session[0] == life["t"][:len(session[0])]
            assert session[1][:1] == [pytest.approx(life["memory_mib"][0], rel=1e-6)]


@contextlib.asynccontextmanager
async def server_client(server):
    """An aiohttp client session against a test server."""
    import aiohttp

    async with aiohttp.ClientSession(base_url=str(server.make_url("/"))) as session:
        yield session
