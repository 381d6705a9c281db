"""The offline 3D viewer: one self-contained HTML block (NiiVue + the volumes + the controls).

The block inlines everything it needs, so the page opens from ``file://`` with no network:

- NiiVue's browser build (``mmai/assets/niivue/niivue.umd.js``, vendored from npm by
  ``tools/vendor_niivue.sh``), gzip-compressed and base64-encoded (2.3 MB -> 1.1 MB); the page
  decompresses it with the browser's ``DecompressionStream`` and evaluates it, which defines the
  global ``niivue``; its BSD-2-Clause licence is copied into the page as a comment;
- the cases as JSON (``<script type="application/json" id="mmai-viewer-data">``): per case its
  facts (case, model, probability, ...), the scan and its maps as base64 ``.nii.gz``
  (:mod:`mmai.viewer.volumes`), and the map's peak voxel;
- the controls: a case selector (when there are several), a map selector (saliency / attention),
  the overlay's opacity and the value below which the map is hidden.

NiiVue shows the three planes (axial, coronal, sagittal; radiological convention: the patient's
right on the left of the axial and coronal planes) in world (RAS mm) space, the crosshair on the
map's peak, with colour bars for the scan and the map. ``#mmai-viewer-status`` reads ``ready`` once
the first case is drawn, or ``error: ...`` (also logged with ``console.error``).
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from mmai.errors import MmaiError
from mmai.utils import atomic_write_text

ASSET_DIR = "assets/niivue"
DATA_ID = "mmai-viewer-data"
_COLORMAP = "warm"
_STYLE = (".mmai-viewer{font-family:sans-serif;max-width:70em}.mmai-viewer canvas{width:100%;height:100%;display:block}"
          ".mmai-viewer .nvbox{width:100%;height:30em;background:#000}.mmai-viewer label{margin-right:1.2em}"
          ".mmai-viewer table{border-collapse:collapse;margin:.5em 0}.mmai-viewer td,.mmai-viewer th"
          "{border:1px solid #bbb;padding:.2em .5em;text-align:left}.mmai-viewer th{background:#eee}"
          ".mmai-viewer small{color:#555}")


def _asset(name: str) -> bytes:
    path = resources.files("mmai").joinpath(f"{ASSET_DIR}/{name}")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MmaiError(f"viewer: the vendored NiiVue file {ASSET_DIR}/{name} is missing from the mmai package; "
                        "reinstall mmai, or run tools/vendor_niivue.sh in a source checkout") from exc


@functools.lru_cache(maxsize=1)
def niivue_bundle() -> tuple[str, str, str]:
    """(version, licence text, gzip+base64 of niivue.umd.js), read once from the package."""
    code = _asset("niivue.umd.js")
    version = _asset("VERSION").decode().strip()
    licence = _asset("LICENSE").decode()
    packed = base64.b64encode(gzip.compress(code, compresslevel=9, mtime=0)).decode("ascii")
    return version, licence, packed


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element (no "</" can close it)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


_JS = r"""
(function () {
  'use strict';
  var root = document.getElementById('mmai-viewer');
  var status = document.getElementById('mmai-viewer-status');
  function $(id) { return document.getElementById(id); }
  function fail(msg) {
    status.textContent = 'error: ' + msg; status.dataset.state = 'error';
    console.error('mmai viewer: ' + msg);
  }
  async function loadNiivue() {
    var bin = atob($('mmai-niivue-gz').textContent.trim());
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    var code = await new Response(stream).text();
    (0, eval)(code);  // NiiVue's UMD build: defines the global `niivue`
    return window.niivue;
  }
  var data = JSON.parse($('mmai-viewer-data').textContent);
  var nvlib = null, nv = null, current = -1, busy = Promise.resolve();
  function fillFacts(c) {
    var body = $('mmai-viewer-facts');
    body.textContent = '';
    c.facts.forEach(function (kv) {
      var tr = document.createElement('tr'), th = document.createElement('th'), td = document.createElement('td');
      th.textContent = kv[0]; td.textContent = kv[1]; tr.appendChild(th); tr.appendChild(td); body.appendChild(tr);
    });
    var maps = $('mmai-viewer-map'), keep = maps.value;
    maps.textContent = '';
    Object.keys(c.maps).forEach(function (k) {
      var o = document.createElement('option'); o.value = k; o.textContent = k; maps.appendChild(o);
    });
    if (keep && c.maps[keep]) maps.value = keep;
    $('mmai-viewer-map-label').hidden = Object.keys(c.maps).length < 2;
  }
  async function loadOverlay(c) {
    while (nv.volumes.length > 1) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    var name = $('mmai-viewer-map').value;
    if (!c.maps[name]) return;
    var ov = await nvlib.NVImage.loadFromBase64({base64: c.maps[name], name: name + '.nii.gz',
      colormap: data.colormap, opacity: Number($('mmai-viewer-opacity').value) / 100,
      cal_min: Number($('mmai-viewer-threshold').value) / 100, cal_max: 1});
    nv.addVolume(ov);
  }
  async function showCase(ci) {
    var c = data.cases[ci];
    current = ci;
    fillFacts(c);
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    var img = await nvlib.NVImage.loadFromBase64({base64: c.image, name: 'scan.nii.gz', colormap: 'gray',
      cal_min: c.image_range[0], cal_max: c.image_range[1], colorbarVisible: true});
    nv.addVolume(img);
    await loadOverlay(c);
    nv.updateGLVolume();
    nv.scene.crosshairPos = nv.mm2frac(c.peak_mm);  // the map's peak (world mm)
    nv.drawScene();
  }
  function queue(fn) {
    busy = busy.then(fn).catch(function (e) { fail(e && e.message ? e.message : String(e)); });
    return busy;
  }
  async function main() {
    nvlib = await loadNiivue();
    if (!nvlib || !nvlib.Niivue) throw new Error('NiiVue did not load');
    nv = new nvlib.Niivue({isColorbar: true, isRadiologicalConvention: true, logLevel: 'warn',
      multiplanarShowRender: nvlib.SHOW_RENDER.NEVER, crosshairColor: [0.2, 0.8, 1.0, 0.7],
      crosshairWidth: 1, backColor: [0, 0, 0, 1], show3Dcrosshair: false});
    await nv.attachToCanvas($('mmai-viewer-canvas'));
    nv.setSliceType(nv.sliceTypeMultiplanar);
    var sel = $('mmai-viewer-case');
    data.cases.forEach(function (c, i) {
      var o = document.createElement('option'); o.value = String(i); o.textContent = c.label; sel.appendChild(o);
    });
    $('mmai-viewer-case-label').hidden = data.cases.length < 2;
    sel.addEventListener('change', function () { queue(function () { return showCase(Number(sel.value)); }); });
    $('mmai-viewer-map').addEventListener('change', function () {
      queue(async function () { await loadOverlay(data.cases[current]); nv.updateGLVolume(); });
    });
    $('mmai-viewer-opacity').addEventListener('input', function () {
      $('mmai-viewer-opacity-value').textContent = this.value + '%';
      if (nv.volumes.length > 1) nv.setOpacity(1, Number(this.value) / 100);
    });
    $('mmai-viewer-threshold').addEventListener('input', function () {
      var v = Number(this.value) / 100;
      $('mmai-viewer-threshold-value').textContent = v.toFixed(2);
      if (nv.volumes.length > 1) { nv.volumes[1].cal_min = v; nv.updateGLVolume(); }
    });
    await queue(function () { return showCase(0); });
    if (status.dataset.state !== 'error') { status.textContent = 'ready'; status.dataset.state = 'ready'; }
    root.mmaiNiivue = nv;
  }
  main().catch(function (e) { fail(e && e.message ? e.message : String(e)); });
})();
"""


def viewer_block(cases: list[dict[str, Any]], *, opacity: float = 0.6, threshold: float = 0.1,
                 note: str = "") -> str:
    """The viewer as an HTML fragment (style, controls, canvas, data, scripts) for any page's <body>.

    Args:
        cases: per case {"label": text of the case selector, "facts": [[name, value], ...]} plus the
            output of :func:`mmai.viewer.volumes.encode`.
        opacity: the map's starting opacity in [0, 1].
        threshold: the map value below which it is hidden at first, in [0, 1].
        note: one line under the viewer (e.g. how the cases were chosen).

    Raises:
        MmaiError: no case, or opacity / threshold outside [0, 1].
    """
    if not cases:
        raise MmaiError("viewer: no case to show")
    for name, v in (("opacity", opacity), ("threshold", threshold)):
        if not 0.0 <= v <= 1.0:
            raise MmaiError(f"viewer: {name} must lie in [0, 1], got {v}")
    version, licence, packed = niivue_bundle()
    esc = html.escape
    data = {"colormap": _COLORMAP, "cases": cases}
    op, th = round(opacity * 100), round(threshold * 100)
    shrink = [c for c in cases if any(f > 1 for f in c.get("factors", []))]
    small = (f"Volumes are shown downsampled (block mean for the scan, block max for the maps) to "
             f"{' x '.join(str(n) for n in shrink[0]['shape'])} from "
             f"{' x '.join(str(n) for n in shrink[0]['source_shape'])} voxels. ") if len(cases) == 1 and shrink else ""
    return "\n".join([
        f"<!-- NiiVue {esc(version)} (inlined below, gzip + base64), BSD-2-Clause licence:\n"
        f"{esc(licence).replace('--', '- -')}-->",
        f"<style>{_STYLE}</style>",
        '<div class="mmai-viewer" id="mmai-viewer">',
        '<p><label id="mmai-viewer-case-label">case <select id="mmai-viewer-case"></select></label>'
        '<label id="mmai-viewer-map-label">map <select id="mmai-viewer-map"></select></label>'
        f'<label>opacity <input type="range" id="mmai-viewer-opacity" min="0" max="100" step="1" value="{op}">'
        f' <span id="mmai-viewer-opacity-value">{op}%</span></label>'
        f'<label>hide map below <input type="range" id="mmai-viewer-threshold" min="0" max="99" step="1" '
        f'value="{th}"> <span id="mmai-viewer-threshold-value">{threshold:.2f}</span></label>'
        '<output id="mmai-viewer-status" data-state="loading">loading the viewer...</output></p>',
        '<table><tbody id="mmai-viewer-facts"></tbody></table>',
        '<div class="nvbox"><canvas id="mmai-viewer-canvas"></canvas></div>',
        f"<p><small>{esc(small)}Three planes through the map's peak, in world (RAS mm) space, radiological "
        "convention (the patient's right on the screen's left). Click to move the crosshair; scroll to "
        "change slice; drag with the right button to change the scan's contrast. "
        f"{esc(note)} Viewer: NiiVue {esc(version)} (BSD-2-Clause), inlined; the page works offline.</small></p>",
        "</div>",
        f'<script type="application/json" id="{DATA_ID}">{_json_for_script(data)}</script>',
        f'<script type="text/plain" id="mmai-niivue-gz">{packed}</script>',
        f"<script>{_JS}</script>",
    ])


def case_entry(encoded: dict[str, Any], facts: list[tuple[str, str]], label: str) -> dict[str, Any]:
    """One case of :func:`viewer_block`: its selector label, its facts and its encoded volumes."""
    return {"label": label, "facts": [[str(k), str(v)] for k, v in facts], **encoded}


def write_page(path: Path, cases: list[dict[str, Any]], *, title: str, **block_kw: Any) -> Path:
    """A whole HTML document holding the viewer (atomic write)."""
    esc = html.escape
    text = "\n".join([
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        "<style>body{font-family:sans-serif;margin:1.5em}</style></head><body>",
        f"<h1>{esc(title)}</h1>", viewer_block(cases, **block_kw), "</body></html>\n"])
    atomic_write_text(Path(path), text)
    return Path(path)


def read_cases(path: Path) -> list[dict[str, Any]]:
    """The cases embedded in a page written by :func:`write_page` (its ``mmai-viewer-data`` block).

    Raises:
        MmaiError: the file has no viewer data block, or the block is not valid JSON.
    """
    text = Path(path).read_text(encoding="utf-8")
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = text.find(start_tag)
    end = text.find("</script>", start + len(start_tag)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise MmaiError(f"{path}: no viewer data block ({DATA_ID}); remake it with mmai predict --explain")
    try:
        return list(json.loads(text[start + len(start_tag):end])["cases"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MmaiError(f"{path}: the viewer data block cannot be read ({exc}); remake it with mmai predict "
                        "--explain") from exc
