"""The /dashboard page: its exposition parser and PromQL arithmetic under `node --test`, the router's files and
its 503 before `make dashboard`, and the page itself in a real headless Chromium against the real daemon with
traffic: live numbers appear, the tables fill, the parser reads /metrics exactly as prometheus_client's parser
does, no console errors; the screenshot is kept as a test artifact (dashboard.png)."""
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from daemon_process import REPO_ROOT, DaemonProcess
from serving.http.dashboard import ASSETS_DIR, STATIC, dashboard_router, missing_assets
from serving.metrics import names

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 90  # the page's first numbers need two polls (2 s apart) that both see traffic
MIN_POLLS = 6  # and a few more, so the screenshot's charts show a line
WORKFLOW = "support"  # declared under metrics.workflows, so it gets a label of its own (not "other")
TASK = "ticket-7"
NUM_SENDERS = 2  # concurrent senders, so the queue chart has something to draw
# NOTE: a shared opening longer than a few KV blocks, so the prefix cache has hits to show.
SHARED_PREFIX = "You are a patient assistant who counts out loud, one number per line, and never skips. " * 3


def test_exposition_parser_under_node():
    node = shutil.which("node")
    assert node is not None, "node is needed for the dashboard's JS tests (Node 20 or later)"
    result = subprocess.run([node, "--test", "tests/dashboard_exposition.test.mjs"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_page_names_only_metrics_from_names_py():
    exported = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and v != names.PREFIX}
    used = set(re.findall(r"frugal:[a-z0-9_]+", (ASSETS_DIR / "dashboard.js").read_text()))
    assert used and used <= exported, f"not in serving/metrics/names.py: {sorted(used - exported)}"


def built_assets(tmp_path: Path) -> Path:
    """A copy of the page's files, with stand-ins for the two that `make dashboard` copies out of npm."""
    shutil.copytree(ASSETS_DIR, tmp_path / "dashboard", ignore=shutil.ignore_patterns("node_modules", "vendor"))
    (tmp_path / "dashboard" / "vendor").mkdir()
    (tmp_path / "dashboard" / "vendor" / "uPlot.iife.min.js").write_text("var uPlot;")
    (tmp_path / "dashboard" / "vendor" / "uPlot.min.css").write_text(".uplot{}")
    return tmp_path / "dashboard"


def client_for(assets_dir: Path) -> TestClient:
    app = FastAPI()
    app.include_router(dashboard_router(assets_dir))
    return TestClient(app)


def test_router_serves_only_the_known_files_with_their_types(tmp_path):
    client = client_for(built_assets(tmp_path))
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in STATIC:
        resp = client.get(f"/dashboard/static/{name}")
        assert resp.status_code == 200, name
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        assert resp.headers["content-type"] == f"{kind}; charset=utf-8", name
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-content-type-options"] == "nosniff"
        again = client.get(f"/dashboard/static/{name}", headers={"If-None-Match": resp.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", name
        assert f"/dashboard/static/{name}" in page.text, f"index.html does not load {name}"
    for name in ("index.html", "package.json", "..%2Fdashboard.py", "vendor%2FuPlot.min.css", "nope.js"):
        assert client.get(f"/dashboard/static/{name}").status_code == 404, name


def test_router_answers_503_naming_make_dashboard_before_the_build(tmp_path):
    assets = built_assets(tmp_path)
    shutil.rmtree(assets / "vendor")
    client = client_for(assets)
    for path in ("/dashboard", "/dashboard/static/uPlot.iife.min.js", "/dashboard/static/dashboard.js"):
        resp = client.get(path)
        assert resp.status_code == 503, path
        assert "make dashboard" in resp.text and "vendor/uPlot.iife.min.js" in resp.text, resp.text


# -- the page in a real browser, against the real daemon ------------------------------------------------------

def artifacts_dir() -> Path:
    path = Path(os.environ.get("FRUGAL_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{', '.join(missing)} missing: `make services` installs chromium and chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def complete(base: str, model: str, prompt: str, headers: dict | None = None) -> None:
    resp = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4},
                      headers=headers or {}, timeout=120)
    assert resp.status_code == 200, resp.text


def send_until(stop: threading.Event, base: str, model: str) -> None:
    """Small completions, one after another, until `stop` is set (the traffic the live numbers need)."""
    num_sent = 0
    while not stop.wait(0.2):
        complete(base, model, f"{SHARED_PREFIX}Count to {num_sent}:")
        num_sent += 1


def page_requests_total(driver) -> str:
    return driver.find_element("id", "requests-total").text


def metrics_requests_total(base: str) -> str:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "frugal:requests_total")
    return f"{total:,.0f}"  # as the page writes it


def unmet(driver, model: str) -> list[str]:
    """The live numbers and table rows the page does not show yet (empty: all there)."""
    def value(element_id: str) -> str:
        return driver.find_element("id", element_id).get_attribute("data-value")

    def has_row(table: str, key: str) -> bool:
        return bool(driver.find_elements("css selector", f'#{table} tr[data-key="{key}"]'))

    checks = {
        "status live": driver.find_element("id", "status").get_attribute("data-state") == "live",
        f"{MIN_POLLS} polls": int(driver.find_element("id", "status").get_attribute("data-polls")) >= MIN_POLLS,
        "output tok/s > 0": value("tile-tok-s") not in ("", "0"),
        "p95 TTFT": value("tile-ttft") != "",
        "p95 e2e": value("tile-e2e") != "",
        "cost/hour": value("tile-cost-h") != "",
        "cost per resolved task": value("tile-cost-task") not in ("", "0"),
        "KV usage": value("tile-kv") != "",
        "saturation": value("tile-saturation") != "",
        "cost row: tenant default": has_row("cost-tenant", "default"),
        f"cost row: workflow {WORKFLOW}": has_row("cost-workflow", WORKFLOW),
        f"cost row: model {model}": has_row("cost-model", model),
        "cost row: outcome resolved": has_row("cost-outcome", "resolved"),
        f"route mix row: {model}": has_row("route-mix", model),
        "cache row: prefix": has_row("cache-hits", "prefix"),
        "prefix cache hit rate > 0": value("tile-prefix") not in ("", "0"),
        "refusals row: default": has_row("refusals", "default"),
    }
    return [name for name, ok in checks.items() if not ok]


def reference_samples(text: str) -> list[tuple]:
    return sorted((s.name, tuple(sorted(s.labels.items())), repr(float(s.value)))
                  for family in text_string_to_metric_families(text) for s in family.samples)


@pytest.mark.slow
def test_dashboard_in_chromium_against_the_daemon(tmp_path, browser):
    assert not missing_assets(ASSETS_DIR), f"{missing_assets(ASSETS_DIR)} missing: run `make dashboard`"
    daemon = DaemonProcess(tmp_path, http=True, engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512},
                           metrics={"workflows": [WORKFLOW]})
    daemon.start()
    base = f"http://127.0.0.1:{daemon.http_port}"
    stop = threading.Event()
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        # Before the page opens: an agent task in a workflow, resolved (the tables count since the start).
        task_headers = {"x-frugal-workflow-id": WORKFLOW, "x-frugal-task-id": TASK}
        for step in range(2):
            complete(base, model, f"Ticket 7, step {step}: the printer is on fire.", task_headers)
        outcome = httpx.post(f"{base}/v1/outcomes", json={"task_id": TASK, "workflow_id": WORKFLOW,
                                                           "outcome": "resolved"}, timeout=30)
        assert outcome.status_code == 200, outcome.text

        browser.get(f"{base}/dashboard")
        senders = [threading.Thread(target=send_until, args=(stop, base, model), daemon=True)
                   for _ in range(NUM_SENDERS)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while unmet(browser, model) and time.monotonic() < deadline:
            time.sleep(0.5)
        missing = unmet(browser, model)
        status = browser.find_element("id", "status").text
        assert not missing, f"after {PAGE_TIMEOUT_S} s the page still lacks {missing} (status: {status})"
        stop.set()
        for sender in senders:
            sender.join(timeout=120)

        # The page's parser reads a real scrape exactly as the reference parser does.
        scrape = httpx.get(f"{base}/metrics", timeout=10).text
        parsed = browser.execute_script(
            "return window.frugalDashboard.parseExposition(arguments[0]).samples"
            ".map(s => [s.name, Object.entries(s.labels), String(s.value)])", scrape)
        ours = sorted((name, tuple(sorted(map(tuple, labels))), repr(float(value))) for name, labels, value in parsed)
        assert ours == reference_samples(scrape)
        # With the traffic stopped, the header's request count settles on what /metrics says.
        deadline = time.monotonic() + 10
        while page_requests_total(browser) != metrics_requests_total(base) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert page_requests_total(browser) == metrics_requests_total(base)

        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, f"console errors: {errors}"
    finally:
        stop.set()
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1440, max(1000, height + 20))
        time.sleep(0.5)  # the charts follow the new width
        browser.save_screenshot(str(artifacts_dir() / "dashboard.png"))
        daemon.stop()
