"""Regenerate the README screenshot (``assets/screenshot.png``) and its raw runs
(``bench/results/screenshot_runs.jsonl``) by driving the real app in Debian's headless chromium.

The app runs on the CPU with its defaults (default model, texts and windows) in a fresh workspace.
The script profiles the model (Spectra tab: also the first sensitivity view), measures dense, then
runs four labelled plans set with the Budget tab's presets: uniform 4-bit and 3-bit RTN, svd-llm
at 60 % of break-even (bits kept), and ranks and bits allocated to 0.3 of the dense bytes. It then
shots the Run & compare tab (status, run table, both trade-off plots) and prints each run's figures.

    .venv/bin/python bench/take_screenshot.py [--out assets/screenshot.png]

Needs /usr/bin/chromium (``apt-get install chromium``) and takes several minutes on a CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
RUNS_OUT = ROOT / "bench" / "results" / "screenshot_runs.jsonl"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# label, Budget preset: ("uniform", rank %, bits) or ("allocate", target fraction of dense bytes)
RUNS = [("4-bit RTN", ("uniform", 100, "4")), ("3-bit RTN", ("uniform", 100, "3")),
        ("svd-llm 60 %", ("uniform", 60, "keep")), ("allocated 0.3", ("allocate", 0.3))]
LONG = 1_800_000  # ms: profiling, the first view and a run on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(workspace: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU only
    log = open(workspace / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited: {(workspace / 'app.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the app did not open its port in 180 s")


def set_slider(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")
    expect(page.get_by_label(f"range slider for {label}", exact=True)).to_have_value(str(value))


def apply_preset(page, preset) -> None:
    page.get_by_role("tab", name="Budget").click()
    readout = page.locator("#readout")
    if preset[0] == "uniform":
        _, rank, bits = preset
        set_slider(page, "Uniform rank %", rank)
        page.locator("#uniform-bits input").click()
        page.get_by_role("option", name=bits, exact=True).click()
        page.get_by_role("button", name="Preset: uniform").click()
        expect(page.locator("#rank-0 input[type=number]")).to_have_value(str(rank))
        expect(page.locator("#bits-0 input")).to_have_value(bits)
    else:
        set_slider(page, "Target size (fraction of dense bytes)", preset[1])
        page.get_by_label("ranks and bits", exact=True).check()
        page.locator("#alloc-btn").click()
        expect(readout).to_contain_text(f"target of {preset[1]:.2f}", timeout=LONG)
    expect(readout).to_contain_text("from the first view")
    page.wait_for_timeout(1000)  # the readout's figures follow the text


def records(workspace: Path) -> list[dict]:
    path = workspace / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    out = ap.parse_args().out.resolve()
    t0 = time.time()
    workspace = Path(tempfile.mkdtemp(prefix="ranklab-shot-"))
    proc, url = start_app(workspace)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            expect.set_options(timeout=300_000)
            page.goto(url)
            expect(page.locator("#model-status")).to_contain_text("Fingerprint")

            page.get_by_role("tab", name="Spectra").click()
            page.locator("#profile-btn").click()
            expect(page.locator("#profile-info")).to_contain_text("first sensitivity view is ready", timeout=LONG)
            print(f"profiled: {time.time() - t0:.0f} s", flush=True)

            page.get_by_role("tab", name="Run & compare").click()
            page.get_by_role("button", name="Measure dense").click()
            status = page.locator("#run-status")
            expect(status).to_contain_text("Dense: perplexity", timeout=LONG)
            dense = status.inner_text().splitlines()[0]
            print(f"dense measured: {time.time() - t0:.0f} s: {dense}", flush=True)

            for i, (label, preset) in enumerate(RUNS):
                apply_preset(page, preset)
                page.get_by_role("tab", name="Run & compare").click()
                page.get_by_label("Run label (optional)").fill(label)
                page.locator("#run-btn").click()
                deadline = time.time() + LONG / 1000
                while len(records(workspace)) <= i and time.time() < deadline:
                    time.sleep(1)
                rec = records(workspace)[i]
                if rec["status"] != "ok":
                    raise RuntimeError(f"run {label} {rec['status']}: {rec.get('error')}")
                expect(status).to_contain_text(re.compile(rf"Run\s+{rec['run_id']}\s+done in"))
                expect(page.locator("#run-table")).to_contain_text(label)
                print(f"{label}: {time.time() - t0:.0f} s", flush=True)

            page.wait_for_timeout(2000)  # the plots render after the table
            plots = page.locator("#tradeoff-bytes").bounding_box()  # page top down to the plots' bottom edge
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True,
                            clip=dict(x=0, y=0, width=1400, height=plots["y"] + plots["height"] + 24))
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    RUNS_OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(workspace / "runs.jsonl", RUNS_OUT)

    print(f"\n{dt.datetime.now().isoformat(timespec='seconds')}  screenshot {out}  runs {RUNS_OUT}  "
          f"workspace {workspace}  ({time.time() - t0:.0f} s)")
    print(dense)
    print(f"{'label':<16}{'predicted':>10}{'measured':>10}{'MB':>10}{'bits/w':>8}")
    for r in records(workspace):
        pred, m = r["predicted"].get("ppl"), r["measured"]
        print(f"{r['label']:<16}{pred if pred is None else round(pred, 2):>10}{m['ppl']:>10.2f}"
              f"{m['bytes'] / 1e6:>10.2f}{m['bits_per_weight']:>8.3f}\n    protocol: {m['protocol']}")


if __name__ == "__main__":
    main()
