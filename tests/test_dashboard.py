"""The status page (`ray-on-golem dashboard`), readable amounts and `status --watch` (issue 14).

The page is checked as a user sees it: a real headless Chromium (Debian's `chromium`, driven by
Playwright with `executable_path`) opens the one-time login link while the README's demo runs
(`ray up`, `ray submit examples/fan_out.py`, `ray down` on the local network), and what it shows is
compared with `ray-on-golem status --json` and `costs --json`. The login flow and the 401s are
checked over plain HTTP; the amount formatting is a table.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import NODE_CONFIG, REPO
from test_cluster import RAY_BIN, RaySession, free_port, wait_for, write_cluster_yaml

import ray_on_golem as rog

CHROMIUM = "/usr/bin/chromium"
# Headless (Playwright's default), a fresh profile per launch (Playwright's too), no updates, no sync,
# no first-run page: the browser talks only to our 127.0.0.1 webserver.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# --- readable amounts (pure) -------------------------------------------------------------


@pytest.mark.parametrize("amount, expected", [
    ("0.037243465220196394", "0.0372 GLM"),  # the example: 18 decimals nobody reads
    ("0", "0 GLM"),
    ("5", "5 GLM"),
    ("1.4", "1.4 GLM"),
    ("1.40000", "1.4 GLM"),
    ("36", "36 GLM"),
    ("1234.5678", "1235 GLM"),
    ("0.1", "0.1 GLM"),
    ("0.0005", "0.0005 GLM"),
    ("0.000999999", "0.001 GLM"),  # rounded, not cut
    ("0.00012345", "0.000123 GLM"),
    ("0.0000015", "0.000002 GLM"),  # never more than 6 decimals
    ("0.000000000000000001", "< 0.000001 GLM"),  # one wei is not shown as zero
    ("0.00125", "0.00125 GLM"),
    ("0.001235", "0.00124 GLM"),  # half-even at the third significant digit
])
def test_an_amount_is_rounded_to_what_matters(amount, expected):
    assert rog.format_glm(amount) == expected
    assert rog.format_glm(Decimal(amount)) == expected


@pytest.mark.parametrize("amount, decimals, unit, expected", [
    ("0.037243465220196394", 2, "GLM", "0.04 GLM"),
    ("0.037243465220196394", 6, "", "0.037243"),
    ("0.8", 3, "GLM/h", "0.8 GLM/h"),
    ("0.0000004", 6, "GLM", "< 0.000001 GLM"),
])
def test_an_amount_with_given_decimals_and_unit(amount, decimals, unit, expected):
    assert rog.format_glm(amount, decimals, unit) == expected


@pytest.mark.parametrize("parts, shown, total, note", [
    # Shared decimals: the smallest part keeps its 3 significant digits; the total is their sum as shown.
    (["0.01234", "0.0001", "0.5"], ["0.01234 GLM", "0.0001 GLM", "0.5 GLM"], "0.51244 GLM", None),
    (["0.037243465220196394", "0.012"], ["0.0372 GLM", "0.012 GLM"], "0.0492 GLM", None),
    # Three thirds: the rounded parts add up to 0.999, and the line says the exact total is 1.
    (["0.3333333", "0.3333333", "0.3333334"], ["0.333 GLM"] * 3, "0.999 GLM",
     "the parts are rounded: the exact total is 1 GLM"),
    ([], [], "0 GLM", None),
    (["0", "0"], ["0 GLM", "0 GLM"], "0 GLM", None),
])
def test_parts_and_their_total_add_up_as_shown(parts, shown, total, note):
    assert rog.format_glm_sum(parts) == (shown, total, note)
    if parts:
        assert sum(Decimal(s.split()[0]) for s in shown) == Decimal(total.split()[0])


@pytest.mark.parametrize("report, expected", [
    ({"total_budget": "5", "spent": "0.037243465220196394", "reserved": "0.066123", "remaining": "4.896633",
      "burn_rate_per_hour": "0.79412"},
     {"total_budget": "5 GLM", "spent": "0.0372 GLM", "reserved": "0.0661 GLM", "remaining": "4.8967 GLM",
      "burn_rate_per_hour": "0.794 GLM/h", "note": None}),
    ({"total_budget": "1.4", "spent": "0.2", "reserved": "0", "remaining": "1.2", "burn_rate_per_hour": "0"},
     {"total_budget": "1.4 GLM", "spent": "0.2 GLM", "reserved": "0 GLM", "remaining": "1.2 GLM",
      "burn_rate_per_hour": "0 GLM/h", "note": None}),
    # Committed beyond the budget (a stop on its way): nothing remains, and the line says why it does not add up.
    ({"total_budget": "1.4", "spent": "1.39", "reserved": "0.05", "remaining": "0", "burn_rate_per_hour": "0.1"},
     {"total_budget": "1.4 GLM", "spent": "1.39 GLM", "reserved": "0.05 GLM", "remaining": "0 GLM",
      "burn_rate_per_hour": "0.1 GLM/h", "note": "spent and reserved exceed the budget"}),
])
def test_a_budget_adds_up_as_shown(report, expected):
    shown = rog.format_budget(report)
    assert shown == expected
    if not shown["note"]:
        parts = [Decimal(shown[k].split()[0]) for k in ("spent", "reserved", "remaining")]
        assert sum(parts) == Decimal(shown["total_budget"].split()[0])


# --- login codes (pure) ----------------------------------------------------------------------


def test_a_login_code_works_once_and_expires():
    now = [1000.0]
    sessions = rog.LoginSessions(clock=lambda: now[0])
    code = sessions.new_code()
    session = sessions.redeem(code)
    assert session and sessions.valid(session)
    assert sessions.redeem(code) is None  # used up
    late = sessions.new_code()
    now[0] += rog.DASHBOARD_CODE_TTL_S + 1
    assert sessions.redeem(late) is None  # expired
    assert sessions.valid(session)
    now[0] += rog.DASHBOARD_SESSION_TTL_S
    assert not sessions.valid(session)
    assert not sessions.valid(None) and not sessions.valid("") and sessions.redeem("") is None


# --- the webserver's routes (HTTP, no browser) --------------------------------------------------


def http_get(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def page_session(tmp_path: Path):
    """A webserver on the local network (`ray-on-golem start`), stopped and checked by RaySession."""
    session = RaySession(tmp_path, tmp_path / "datadir", free_port())
    started = session.rog("start", "--network", "local", "--port", str(session.port))
    assert started.returncode == 0, started.stdout + started.stderr
    yield session
    session.close(None)


def login_url(session: RaySession) -> str:
    out = session.rog("dashboard", "--no-browser", "--port", str(session.port))
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(rf"http://127\.0\.0\.1:{session.port}(/login\?code=[\w-]+)", out.stdout)
    assert match, out.stdout
    return match.group(0)


def test_the_page_needs_a_one_time_login_and_its_cookie_opens_nothing_else(page_session):
    session, port = page_session, page_session.port
    token = (session.datadir / "webserver.token").read_text().strip()
    bodies = []

    def get(method, path, headers=None):
        status, headers_, body = http_get(port, method, path, headers)
        bodies.append(body)
        return status, headers_, body

    # Without a session every route of the page answers 401, a made-up cookie too.
    for path in rog.Dashboard.PAGE_PATHS:
        assert get("GET", path)[0] == 401, path
        assert get("GET", path, {"Cookie": f"rog_session_{port}=made-up"})[0] == 401, path

    url = login_url(session)
    path = url.split(str(port), 1)[1]
    status, headers, _ = get("GET", path)
    assert status == 303 and headers["location"] == "/dashboard"
    name_value, *attributes = [a.strip() for a in headers["set-cookie"].split(";")]
    assert name_value.startswith(f"rog_session_{port}=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    assert token not in name_value
    again = get("GET", path)
    assert again[0] == 401 and "set-cookie" not in again[1]  # the code worked once
    assert b"ray-on-golem dashboard" in again[2]

    cookie = {"Cookie": name_value}
    status, headers, page = get("GET", "/dashboard", cookie)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == rog.DASHBOARD_CSP
    assert "default-src 'none'" in rog.DASHBOARD_CSP and "frame-ancestors 'none'" in rog.DASHBOARD_CSP
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert b'<script src="/dashboard/app.js"' in page and b"<script>" not in page and b"style=" not in page
    for asset, kind in (("/dashboard/app.js", "text/javascript"), ("/dashboard/app.css", "text/css")):
        status, headers, _ = get("GET", asset, cookie)
        assert status == 200 and headers["content-type"].startswith(kind)
    status, _, data = get("GET", "/dashboard/data", cookie)
    assert status == 200 and json.loads(data)["webserver"]["url"] == f"http://127.0.0.1:{port}"

    # The cookie opens the page's GET routes only: everything else, reading or changing, needs the token.
    for method, other in (("GET", "/status"), ("GET", "/costs"), ("GET", "/clusters"), ("POST", "/shutdown"),
                          ("POST", "/dashboard/login-codes"), ("POST", "/dashboard/data"),
                          ("DELETE", "/clusters/c/nodes/node1")):
        assert get(method, other, cookie)[0] == 401, (method, other)
    # A name that resolves to 127.0.0.1 (DNS rebinding) does not reach the page with the cookie.
    assert get("GET", "/dashboard/data", {**cookie, "Host": f"evil.example:{port}"})[0] == 401
    # A second webserver's link does not log in here: the code is this webserver's.
    assert get("GET", "/login?code=" + "x" * 32)[0] == 401

    assert all(token.encode() not in body for body in bodies)
    assert session.rog("status").returncode == 0 and "Running" in session.rog("status").stdout


def test_a_stuck_node_shows_its_step_since_when_and_the_funnel_says_why(page_session):
    """A node no offer can serve sits at step 1: the page shows the step, since when, and the market
    funnel of its node type stopping at the price filter (the Funnel of network-stats)."""
    from playwright.sync_api import sync_playwright

    session = page_session
    node_config = {**NODE_CONFIG, "budget_control": {"max_cpu_per_hour_price": 0.000001}}
    body = {"provider_parameters": {"payment_network": "local", "total_budget": 1, "node_start_timeout": 120},
            "node_config": node_config, "count": 1,
            "tags": {"ray-node-type": "worker", "ray-user-node-type": "ray.worker.default"}}
    (node,) = session.api("POST", "/clusters/stuck/nodes", body)["nodes"]
    stage = "Passed Reject if cpu per hour price exceeds `max_cpu_per_hour_price` = 1e-06"

    def seen():
        data = session.api("GET", "/dashboard/data")
        (cluster,) = [c for c in data["clusters"] if c["name"] == "stuck"]
        funnels = cluster["funnels"]
        return (data, cluster) if funnels and funnels[0]["funnel"][0]["count"] > 0 else None

    data, cluster = wait_for(seen, 60, what="offers in the stuck node's funnel")
    (shown,) = cluster["nodes"]
    assert shown["node_id"] == node["node_id"] and shown["state"] == "pending"
    assert [s["text"] for s in shown["steps"]] == ["[1/7] Getting an agreement..."]
    assert shown["steps"][0]["at"] <= data["generated_at"]
    (funnel,) = cluster["funnels"]
    assert funnel["node_types"] == ["ray.worker.default"]
    counts = {row["stage"]: row["count"] for row in funnel["funnel"]}
    assert counts[stage] == 0 and counts["Initial"] > 0
    assert cluster["budget_shown"]["total_budget"] == "1 GLM" and cluster["live_nodes"] == 1

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(login_url(session))
            since = page.wait_for_selector('article[data-cluster="stuck"] [data-role="since"]')
            assert re.fullmatch(r" since \d\d:\d\d:\d\d \(\d+s\)", since.text_content()), since.text_content()
            summary = page.text_content('article[data-cluster="stuck"] details.steps summary')
            assert summary.startswith("[1/7] Getting an agreement...")
            row = page.wait_for_selector(f'article[data-cluster="stuck"] tr[data-stage="{stage}"]')
            assert row.text_content().startswith(stage) and "0" in row.text_content()
        finally:
            browser.close()
    session.api("DELETE", f"/clusters/stuck/nodes/{node['node_id']}")


def test_dashboard_without_a_webserver_says_so(tmp_path, run_cli):
    out = run_cli("dashboard", "--no-browser", "--port", str(free_port()))
    assert out.returncode == 1 and "no webserver answers" in out.stderr and "ray-on-golem start" in out.stderr


# --- status --watch -------------------------------------------------------------------------------


def interactive_sigint() -> None:
    """Ctrl-C as in a terminal: a shell's background job (`pytest ... &`) ignores SIGINT, and its
    children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_status_watch_redraws_in_place_on_a_terminal_and_ctrl_c_exits_0(page_session):
    session = page_session
    command = [sys.executable, str(REPO / "ray_on_golem.py"), "status", "--watch", "--interval", "0.3",
               "--port", str(session.port)]
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=session.env,
                            preexec_fn=interactive_sigint)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 65536)
        assert seen.count(b"\x1b[H\x1b[2J") >= 2, seen[-2000:]
        assert b"Ray on Golem webserver" in seen and b"Ctrl-C to stop" in seen
        proc.send_signal(signal.SIGINT)
        # Read on as a terminal does: a full pty would block the last flush of the exiting process.
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if select.select([master], [], [], 0.2)[0]:
                    os.read(master, 65536)
            except OSError:  # EIO: the process closed its side
                time.sleep(0.1)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)

    # Not a terminal: block after block, no escape codes; --json: one object a line.
    for extra, marker in (((), "Ray on Golem webserver"), (("--json",), '"running": true')):
        proc = subprocess.Popen([*command, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=session.env, preexec_fn=interactive_sigint)
        lines = []
        try:
            while sum(marker in line for line in lines) < 2:
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                lines.append(line)
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert "\x1b[" not in "".join(lines) + rest
        if extra:
            assert all(json.loads(line)["running"] for line in lines)


# --- the page in a real browser during the demo ---------------------------------------------------


def page_figures(page, cluster: str) -> dict | None:
    """What the page shows for one cluster: live nodes, budget (text and exact), node costs, steps, chart."""
    return page.evaluate("""(name) => {
        const card = [...document.querySelectorAll("article.cluster")].find(c => c.dataset.cluster === name);
        if (!card) return null;
        const role = r => card.querySelector(`[data-role="${r}"]`);
        const pair = r => role(r) ? {text: role(r).textContent, exact: role(r).dataset.exact} : null;
        return {
            generated_at: Number(document.getElementById("updated").dataset.generatedAt),
            live: Number(role("live-nodes").textContent),
            budget: Object.fromEntries(["spent", "reserved", "remaining", "total"].map(k => [k, pair("budget-" + k)])),
            burn: pair("burn-rate"),
            cost: pair("cluster-cost"),
            nodes: [...card.querySelectorAll("tr.node")].map(row => ({
                node_id: row.dataset.node, state: row.dataset.state,
                cost: {text: row.querySelector('[data-role="node-cost"]').textContent,
                       exact: row.querySelector('[data-role="node-cost"]').dataset.exact},
                steps: [...row.querySelectorAll("li.step")].map(li => li.firstChild.textContent)})),
            points: card.querySelectorAll("svg.spend circle.point").length,
        };
    }""", cluster)


@pytest.mark.ray
@pytest.mark.slow
def test_the_page_follows_the_demo_in_a_real_browser(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    session = RaySession(tmp_path, tmp_path / "datadir", free_port())
    config = session.config = write_cluster_yaml(
        tmp_path / "cluster.yaml", session.datadir, session.port,
        lambda c: c["provider"]["parameters"].update(node_start_timeout="3m"))
    cluster = f"t-{session.port}"
    background: list[subprocess.Popen] = []
    try:
        # As the README says: start the services, open the page, then the demo.
        started = session.rog("start", "--network", "local", "--port", str(session.port))
        assert started.returncode == 0, started.stdout + started.stderr
        token = (session.datadir / "webserver.token").read_text().strip()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                _follow_the_demo(browser, session, config, cluster, token, background, tmp_path)
            finally:
                browser.close()
    finally:
        for proc in background:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        session.close(config)


def _ray_in_background(session: RaySession, background: list, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([str(RAY_BIN), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=session.tmp_path, env=session.env, stdin=subprocess.DEVNULL)
    background.append(proc)
    return proc


def _status_json(session: RaySession) -> dict:
    out = session.rog("status", "--json", "--port", str(session.port))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["webserver"]


def numbered_steps(steps: list[str]) -> list[int]:
    """The step numbers of a node's state log lines (`[4/7] Deploying the image...` -> 4)."""
    return [int(m.group(1)) for m in (re.match(r"\[(\d)/7\]", s) for s in steps) if m]


def _follow_the_demo(browser, session, config, cluster, token, background, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    console = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))

    def no_token_in_the_page():
        """What the browser gets from every route of the page (with its cookie) never holds the token."""
        for path in rog.Dashboard.PAGE_PATHS:
            response = context.request.get(f"http://127.0.0.1:{session.port}{path}")
            assert response.status == 200 and token.encode() not in response.body(), path

    page.goto(login_url(session))
    assert page.url == f"http://127.0.0.1:{session.port}/dashboard"
    page.wait_for_selector("#updated[data-generated-at]")
    assert "No clusters yet" in page.inner_text("#clusters")
    no_token_in_the_page()

    # ray up: the page shows the head alone, with its numbered steps.
    up = _ray_in_background(session, background, "up", "-y", "--no-config-cache", str(config))
    session.up = True
    seen_live: list[int] = []

    def watch():
        figures = page_figures(page, cluster)
        if figures and (not seen_live or seen_live[-1] != figures["live"]):
            seen_live.append(figures["live"])
        return figures

    wait_for(lambda: up.poll() is not None or (watch() or {}).get("live") == 1, 300, 0.3, what="the head on the page")
    while up.poll() is None:
        watch()
        time.sleep(0.3)
    assert up.returncode == 0, up.stdout.read()[-3000:]
    head = wait_for(lambda: (lambda f: f if f and f["nodes"] and f["nodes"][0]["steps"][-1:] and
                             f["nodes"][0]["steps"][-1].startswith("[7/7] Ready on") else None)(watch()),
                    30, what="the head ready on the page")
    assert numbered_steps(head["nodes"][0]["steps"])[-7:] == list(range(1, 8))

    # ray submit: the autoscaler adds two workers; the page shows 3 live nodes, each with its steps.
    submit = _ray_in_background(session, background, "submit", "--no-config-cache", str(config),
                                str(REPO / "examples" / "fan_out.py"), "6", "20")
    three = wait_for(lambda: (lambda f: f if f and f["live"] == 3 else None)(watch()) or
                     (submit.poll() is not None and pytest.fail("submit ended before 3 nodes showed")), 300, 0.3,
                     what="3 live nodes on the page")
    assert len([n for n in three["nodes"] if n["state"] != "terminated"]) == 3
    # The same count as `status --json` (the page refreshes every 2 s: the next refresh agrees).
    wait_for(lambda: sum(n for s, n in _status_json(session)["clusters"][cluster].items() if s != "terminated")
             == (watch() or {}).get("live"), 30, what="live nodes equal to status --json")
    running = wait_for(lambda: (lambda f: f if f and sum(n["state"] == "running" for n in f["nodes"]) == 3 and all(
        n["steps"] and n["steps"][-1].startswith("[7/7] Ready on") for n in f["nodes"] if n["state"] == "running")
        else None)(watch()), 240, 0.5, what="3 running nodes with all their steps")
    for node in running["nodes"]:
        assert numbered_steps(node["steps"])[-7:] == list(range(1, 8)), node
    page.screenshot(path=str(tmp_path / "status-page-3-nodes.png"), full_page=True)
    no_token_in_the_page()
    out = submit.communicate(timeout=600)[0]
    assert submit.returncode == 0, out[-3000:]
    assert seen_live[:1] == [1] and 3 in seen_live and seen_live.index(1) < seen_live.index(3), seen_live

    # ray down: every invoice settles; then every figure equals `status --json` and `costs --json`.
    down = session.ray("down", "-y", str(config), timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    session.up = False
    agreements = session.db("SELECT COUNT(*) FROM agreements")[0][0]
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'invoice' AND status = 'accepted'")[0][0]
             == agreements, 90, what="every invoice accepted")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL") == [(0,)], 90,
             what="the allocation released")

    def agree():
        status = _status_json(session)
        costs = json.loads(session.rog("costs", cluster, "--json").stdout)["clusters"][0]
        figures = watch()
        if not figures or figures["generated_at"] < time.time() - 1.5 * rog.DASHBOARD_REFRESH_S - 1:
            return None
        budget = status["budgets"][cluster]
        shown = rog.format_budget(budget)
        live = sum(n for s, n in status["clusters"][cluster].items() if s != "terminated")
        node_costs, total, _ = rog.format_glm_sum([n["cost"] for n in costs["nodes"]])
        expected = {
            "live": live,
            "budget": {k: {"text": shown[k if k != "total" else "total_budget"],
                           "exact": budget[k if k != "total" else "total_budget"]}
                       for k in ("spent", "reserved", "remaining", "total")},
            "burn": {"text": shown["burn_rate_per_hour"], "exact": budget["burn_rate_per_hour"]},
            "cost": {"text": total, "exact": costs["cost"]},
            "nodes": {n["node_id"]: {"text": c, "exact": n["cost"]} for n, c in zip(costs["nodes"], node_costs)},
        }
        actual = {k: figures[k] for k in ("live", "budget", "burn", "cost")}
        actual["nodes"] = {n["node_id"]: n["cost"] for n in figures["nodes"]}
        return (expected, figures) if actual == expected else None

    expected, figures = wait_for(agree, 30, 1, what="the page's figures equal to status --json and costs --json")
    assert expected["live"] == 0 and Decimal(expected["budget"]["spent"]["exact"]) > 0
    assert Decimal(expected["cost"]["exact"]) == Decimal(expected["budget"]["spent"]["exact"])
    assert len(figures["nodes"]) == 3 and figures["points"] >= 2  # one per accepted debit note or invoice
    providers = page.evaluate("""() => [...document.querySelectorAll("tr[data-provider]")].map(
        row => row.children[2].textContent)""")
    assert sorted(n for line in providers for n in re.findall(r"/(node\d+) \(terminated\)", line)) == sorted(
        n["node_id"] for n in figures["nodes"])
    page.screenshot(path=str(tmp_path / "status-page-after-down.png"), full_page=True)

    # The token is in no answer the browser gets; a browser without the cookie gets 401 everywhere.
    no_token_in_the_page()
    stranger = browser.new_context()
    for path in rog.Dashboard.PAGE_PATHS:
        assert stranger.request.get(f"http://127.0.0.1:{session.port}{path}").status == 401, path
    stranger.close()
    assert not [line for line in console if "Content Security Policy" in line or line.startswith("error")], console
    context.close()
