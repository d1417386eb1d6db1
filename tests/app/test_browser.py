"""End-to-end: the real app on the default model, driven in Debian's headless chromium.

Open the app, cancel profiling and profile, move a slider and see the predicted point move,
pick a layer's bits and see the predicted size fall, run a small
compression, see the measured point and the run-table row appear, reload the page and
find the history and the plan it had. Screenshots land in artifacts/ (one is the README's).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it (apt-get install chromium)")
    port = _free_port()
    ws = tmp_path_factory.mktemp("workspace")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(ws / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(ws),
                             "--seqlen", "128", "--calib-windows", "12", "--eval-windows", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited: {(ws / 'app.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    yield url, ws
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(ws / "app.log", ARTIFACTS / "app.log")


def _plot_data(page, elem_id: str):
    """The figure's traces as JSON (Plotly ships arrays as typed/base64 data: compare text)."""
    return page.evaluate(f"""() => {{
        const el = document.querySelector('#{elem_id} .js-plotly-plot');
        if (!el || !el.data) return null;
        return el.data.map(t => JSON.stringify([t.name, t.x, t.y])); }}""")


def test_profile_slider_run_reload(app_url):
    from playwright.sync_api import expect, sync_playwright

    app_url, workspace = app_url

    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=300_000)  # CPU-only CI: profiling and a run take tens of seconds
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(240_000)
        page.goto(app_url)
        expect(page.locator("#model-status")).to_contain_text("Fingerprint", timeout=240_000)
        expect(page.locator("#model-status")).to_contain_text("SmolLM2")

        # a model that cannot be loaded: said in the page, and the loaded one stays shown
        page.locator("#model-spec").get_by_role("textbox").fill("org/no-such-model")
        page.locator("#load-btn").click()
        expect(page.locator("#model-status")).to_contain_text("org/no-such-model was not loaded")
        expect(page.locator("#model-status")).to_contain_text("SmolLM2")
        page.locator("#model-spec").get_by_role("textbox").fill("default")

        page.get_by_role("tab", name="Spectra").click()
        # Cancel stops profiling + first view (one job), which then says so in place of "Cancel requested"
        page.locator("#profile-btn").click()
        # wait for the job's own progress line: a Cancel before the job has started has nothing to
        # stop (waiting for any progress text, a CI run once clicked too early and profiling ran to the end)
        expect(page.locator("#profile-info")).to_contain_text("step 1/2")
        page.locator("#profile-cancel").click()
        expect(page.locator("#profile-info")).to_contain_text(re.compile(r"cancelled", re.I))  # the job's own words
        page.locator("#profile-btn").click()
        expect(page.locator("#profile-info")).to_contain_text("tokens")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "spectra.png"), full_page=True)

        page.get_by_role("tab", name="Budget").click()
        readout = page.locator("#readout")
        expect(readout).to_contain_text(re.compile(r"perplexity \d"))  # the first view predicts
        page.wait_for_timeout(2000)  # let the tab's refresh settle before taking the "before" state
        before_text = readout.inner_text()
        before = _plot_data(page, "predicted-plot")
        # drag layer 0's rank slider to the left and release it
        slider = page.locator("#rank-0 input[type=range]")
        slider.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        box = slider.bounding_box()
        page.mouse.move(box["x"] + box["width"] - 4, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        assert page.locator("#rank-0 input[type=number]").input_value() != "100"
        expect(readout).not_to_have_text(before_text)
        for _ in range(40):  # the figure re-renders just after the readout
            after = _plot_data(page, "predicted-plot")
            if after and after != before:
                break
            page.wait_for_timeout(250)
        assert after and after != before, "the predicted point did not move"
        # bits are picked as real widths: layer 0 at 3 bits lowers the predicted bits per weight
        bpw = re.compile(r"([\d.]+) bits per decoder-linear weight")
        before_bits = float(bpw.search(readout.inner_text()).group(1))
        page.locator("#bits-0 input").click()
        page.get_by_role("option", name="3", exact=True).click()
        expect(readout).to_contain_text(re.compile(r"bits per decoder-linear weight"))
        for _ in range(40):
            found_bits = bpw.search(readout.inner_text())
            if found_bits and float(found_bits.group(1)) < before_bits:
                break
            page.wait_for_timeout(250)
        assert found_bits and float(found_bits.group(1)) < before_bits, readout.inner_text()
        page.screenshot(path=str(ARTIFACTS / "budget.png"), full_page=False)

        page.get_by_role("tab", name="Run & compare").click()
        page.locator("#run-btn").click()
        expect(page.locator("#run-status")).to_contain_text(re.compile(r"Run\s+\w+\s+done in"), timeout=300_000)
        table = page.locator("#run-table")
        expect(table).to_contain_text("ok")
        run_status = page.locator("#run-status").inner_text()
        found = re.search(r"Run\s+(\w+)\s+done in", run_status)
        assert found, run_status
        run_id = found.group(1)
        measured = _plot_data(page, "tradeoff-bytes")
        assert measured and any(t.startswith('["sliders (measured)"') for t in measured), measured
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "run.png"), full_page=False)

        # a page reloaded mid-run: the run is not lost; it finishes and is saved (its model then freed)
        page.locator("#run-btn").click()
        page.locator(".progress-text").first.wait_for(state="visible")
        page.reload()
        history = workspace / "runs.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline:
            records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            if len(records) == 2:
                break
            time.sleep(0.5)
        assert len(records) == 2 and records[-1]["status"] == "ok", records[-1:]
        expect(page.locator("#model-status")).to_contain_text("Fingerprint", timeout=240_000)
        expect(page.locator("#model-status")).to_contain_text("Taken back from before the reload: the profile")
        page.get_by_role("tab", name="Run & compare").click()
        expect(page.locator("#run-table")).to_contain_text(run_id)
        # ... and the reloaded page has its plan back on the sliders (the browser kept it)
        page.get_by_role("tab", name="Budget").click()
        expect(page.locator("#readout")).to_contain_text("Restored the plan this page had", timeout=60_000)
        expect(page.locator("#bits-0 input")).to_have_value("3")
        assert page.locator("#rank-0 input[type=number]").input_value() != "100"

        # a plan file goes back into the sliders; a broken one is refused and changes nothing
        ARTIFACTS.mkdir(exist_ok=True)
        good, bad = ARTIFACTS / "plan-4bit.json", ARTIFACTS / "broken.json"
        good.write_text(json.dumps({"version": 1, "default": {"bits": 4, "group_size": 16}, "modules": {}}))
        bad.write_text("{ this is not json")
        page.get_by_role("tab", name="Budget").click()
        readout = page.locator("#readout")
        page.locator("#plan-upload input[type=file]").set_input_files(str(good))
        expect(readout).to_contain_text("Loaded plan-4bit.json", timeout=60_000)
        expect(page.locator("#bits-0 input")).to_have_value("4")
        page.locator("#plan-upload input[type=file]").set_input_files(str(bad))
        expect(readout).to_contain_text("The plan file was not loaded", timeout=60_000)
        expect(page.locator("#bits-0 input")).to_have_value("4")
        browser.close()
