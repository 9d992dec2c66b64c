"""Headless Chromium for the report tests, without CDP: `probe` loads a copy of the page with a
collector script injected first in <head> (window errors, console.error, the summary table's box,
whether a linked #fragment is revealed),
dumps the DOM and reads the collector's JSON back; `screenshot` writes a PNG of the first screen.
`python -m tests._chromium PAGE PNG` writes the screenshot committed under docs/."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
WIDTH, HEIGHT = 1280, 900

COLLECTOR = """<script>
window.__dph = {errors: []};
window.addEventListener("error", e => window.__dph.errors.push("error: " + e.message));
window.addEventListener("unhandledrejection", e => window.__dph.errors.push("rejection: " + e.reason));
(() => { const ce = console.error; console.error = (...a) => { window.__dph.errors.push("console: " + a.join(" ")); ce(...a); }; })();
window.addEventListener("load", () => setTimeout(() => {  // after the fragment navigation's reveal
  const t = document.getElementById("summary"), h = document.querySelector("body > header");
  const box = t ? t.getBoundingClientRect() : null;
  const target = location.hash ? document.getElementById(decodeURIComponent(location.hash.slice(1))) : null;
  let revealed = !!target;
  for (let e = target; e; e = e.parentElement) if (e.tagName === "DETAILS" && !e.open) revealed = false;
  Object.assign(window.__dph, {inner_height: window.innerHeight, inner_width: window.innerWidth,
    summary_tag: t ? t.tagName : null, summary_top: box ? box.top : null, summary_bottom: box ? box.bottom : null,
    after_header: h && h.nextElementSibling ? h.nextElementSibling.id : null, target_revealed: revealed});
  const pre = document.createElement("pre"); pre.id = "__dph_probe";
  pre.textContent = JSON.stringify(window.__dph); document.body.appendChild(pre);
}, 300));
</script>"""


def _run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile_dir:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile_dir}", "--enable-logging=stderr", "--v=0",
             f"--window-size={WIDTH},{HEIGHT}", *args],
            capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    """Chromium's logged page console messages and uncaught exceptions."""
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def probe(page: Path, fragment: str = "") -> dict:
    """What the collector saw in `page` (opened at #fragment, if given) at WIDTH x HEIGHT, plus
    Chromium's logged console lines. target_revealed: the fragment's element exists and no closed
    <details> hides it."""
    text = Path(page).read_text()
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "page.html"
        copy.write_text(re.sub(r"<head>", "<head>" + COLLECTOR, text, count=1))
        r = _run(["--virtual-time-budget=10000", "--dump-dom", copy.as_uri() + (f"#{fragment}" if fragment else "")])
    m = re.search(r'<pre id="__dph_probe">(.*?)</pre>', r.stdout, re.S)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"chromium rc {r.returncode}, no probe output: {r.stderr[-2000:]}")
    out = json.loads(html.unescape(m.group(1)))
    out["console"] = console_lines(r.stderr)
    return out


def screenshot(page: Path, png: Path) -> subprocess.CompletedProcess:
    r = _run([f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri()])
    if r.returncode != 0 or not Path(png).is_file():
        raise RuntimeError(f"chromium rc {r.returncode}, no screenshot: {r.stderr[-2000:]}")
    return r


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")
