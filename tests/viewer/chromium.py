"""Open a viewer page in Debian's headless Chromium (software WebGL) and report what it drew.

The page is loaded from ``file://`` inside an iframe of a small check page, which waits for the
viewer's status (``ready`` / ``error: ...``), optionally runs actions on the viewer's controls, then
dumps a JSON summary into the DOM; Chromium also takes a screenshot, cropped to the viewer's
canvas. Every network name resolves to nothing (``--host-resolver-rules``), so a page that tried
to fetch anything would log a console error.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
SKIP_REASON = "needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"

_CHECK = """<!DOCTYPE html><html><head><style>body{margin:0}</style></head><body>
<iframe id="f" src="PAGE" width="1100" height="900" style="border:0;display:block"></iframe>
<script>
var actions = ACTIONS;
function finish(extra) {
  var d = document.getElementById('f').contentDocument, st = d.getElementById('mmai-viewer-status');
  var cv = d.getElementById('mmai-viewer-canvas'), r = cv ? cv.getBoundingClientRect() : null;
  var pre = document.createElement('pre'); pre.id = 'result';
  pre.textContent = JSON.stringify({status: st ? st.textContent : null, state: st ? st.dataset.state : null,
    canvas: r ? [r.left, r.top, r.width, r.height] : null,
    facts: (d.getElementById('mmai-viewer-facts') || {}).innerText || '',
    cases: Array.prototype.map.call(d.querySelectorAll('#mmai-viewer-case option'), function (o) { return o.textContent; }),
    maps: Array.prototype.map.call(d.querySelectorAll('#mmai-viewer-map option'), function (o) { return o.value; }),
    extra: extra || null});
  document.body.appendChild(pre);
}
function act(d, i) {
  if (i >= actions.length) { setTimeout(finish, 1500); return; }
  var a = actions[i], el = d.getElementById(a[0]);
  el.value = a[1]; el.dispatchEvent(new Event(a[2], {bubbles: true}));
  setTimeout(function () { act(d, i + 1); }, 1500);
}
var tries = 0;
function poll() {
  var d = document.getElementById('f').contentDocument, st = d && d.getElementById('mmai-viewer-status');
  var state = st ? st.dataset.state : null;
  if (state === 'ready') { d.getElementById('mmai-viewer').scrollIntoView(); act(d, 0); return; }
  if (state === 'error' || ++tries > 300) { finish(); return; }
  setTimeout(poll, 100);
}
document.getElementById('f').onload = function () { setTimeout(poll, 100); };
</script></body></html>
"""


def render(page: Path, actions: list[tuple[str, str, str]] | None = None) -> tuple[dict, str, np.ndarray]:
    """(summary, console lines, canvas pixels (H, W, 3) uint8) of ``page`` as Chromium draws it.

    ``actions``: (element id, value, event) run in order once the viewer is ready, e.g.
    ``("mmai-viewer-opacity", "0", "input")``.
    """
    page = Path(page)
    check = page.parent / f"check_{page.stem}.html"
    check.write_text(_CHECK.replace("PAGE", page.name).replace("ACTIONS", json.dumps(actions or [])))
    shot = page.parent / f"shot_{page.stem}.png"
    r = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--allow-file-access-from-files",
         f"--user-data-dir={page.parent / 'chromium-profile'}", "--force-device-scale-factor=1",
         "--window-size=1100,1000", "--virtual-time-budget=60000", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=240)
    m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the check page did not finish: {r.stdout[-500:]} {r.stderr[-1500:]}"
    got = json.loads(html.unescape(m.group(1)))
    console = "\n".join(line for line in r.stderr.splitlines() if "CONSOLE" in line)
    from PIL import Image

    pixels = np.zeros((0, 0, 3), np.uint8)
    if got["canvas"] and shot.exists():
        x, y, w, h = (int(round(v)) for v in got["canvas"])
        pixels = np.asarray(Image.open(shot).convert("RGB"))[y : y + h, x : x + w]
    return got, console, pixels


def warm_mask(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels tinted by the map on the planes (see :func:`warm_pixels`)."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    warm = (r > 150) & (r - b > 60) & (g > 40)
    warm[warm.sum(axis=1) >= 0.25 * pixels.shape[1]] = False
    return warm


def warm_pixels(pixels: np.ndarray) -> int:
    """Pixels tinted by the 'warm' overlay (orange to yellow, blended over the grey scan: red well
    above blue) on the planes: rows of the map's colour bar (warm over more than a quarter of the
    width) are left out. The grey scan and the cyan crosshair have red <= blue."""
    return int(warm_mask(pixels).sum())


def grey_levels(pixels: np.ndarray) -> int:
    """Distinct grey levels (R = G = B) drawn: the scan's slices."""
    grey = pixels[(pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])][:, 0]
    return len(np.unique(grey))
