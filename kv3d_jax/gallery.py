"""The HTML gallery of a run: a page per layer, an index across layers, and per-layer figures.

Pages are self-contained: inline CSS and vanilla JS, pictures by relative links to the
files written beside them, nothing fetched from elsewhere. A layer page shows every
kernel's stage-1 video, static texture, motion and reconstruction with its summary and
reliability, sortable and filterable; the view (sort order, filters) lives in the URL's
``#`` fragment, so a link reopens the same view. A page of a thousand kernels stays light:
images load when scrolled near (``loading="lazy"``), and an MP4 or WebM is a ``<video>`` that
is made from its ``<template>`` when it first comes into view (a video element costs the
browser ~150 nodes even unloaded), then plays while in view and pauses when it leaves. Each
page states at the bottom whether all of its media in view loaded and whether any script
error happened, so a broken gallery says so.

Figures (Matplotlib, Agg): a contact sheet of a layer's statics and a two-panel motion
histogram (directions as a polar histogram weighted by speed; speeds).
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kv3d_jax.files import write_atomically

# What a kernel card shows, in order: media kind -> caption. The refined kinds exist only for a
# run with the refinement (stage 3), the attribution only for a MACO run; a card shows the kinds
# its kernel has.
MEDIA = {
    "stage1": "optimal video",
    "static": "static texture",
    "motion": "motion",
    "recon": "reconstruction",
    "attribution": "attribution",
    "refined_video": "refined video",
    "refined_static": "refined static",
    "refined_motion": "refined motion",
}
# A kernel's diverse optima side by side (a run with diverse optima): shown in a row of their own.
DIVERSE = "diverse"
# What a kernel card links to: media kind -> link text.
LINKS = {"panel": "side by side", "deform": "static + motion", "refined_deform": "refined static + motion"}
# Sortable summary fields: data attribute -> label.
FIELDS = {
    "channel": "channel",
    "objective": "objective",
    "speed": "speed",
    "psnr": "PSNR",
    "direction": "direction",
    "reliability": "reliability",
}
# Sortable fields a page offers only when one of its kernels has a value for them: data attribute -> label.
OPTIONAL_FIELDS = {"slowness": "slow/fast index", "diverse_cosine": "diverse optima's largest cosine"}


@dataclasses.dataclass(frozen=True)
class KernelView:
    """One kernel as a layer page shows it.

    Attributes:
      channel: the channel index.
      objective: the stage-1 objective reached (activation).
      direction_deg: dominant motion direction, degrees (0° = right, 90° = up).
      speed: mean speed, px/frame.
      psnr: reconstruction PSNR, dB.
      media: media kind (keys of :data:`MEDIA` and :data:`LINKS`) -> file path relative to the page; a
        path ending ``.mp4`` or ``.webm`` is shown as a ``<video>``, any other as an ``<img>``.
      reliability: how far the kernel's result can be trusted, in [0, 1] (NaN: not rated).
      reliable: whether the result counts as reliable.
      dead: the optimisation did not clearly beat random videos, or never activated the kernel.
      aliased: the speed cannot be told from its temporal alias (``speed`` is then NaN).
      failed: 0, or the stage (1, 2, 3) whose result turned non-finite.
      name: the channel's name (a classifier's class, ``VideoModel.names_of``), or ``""``.
      slowness: the slow/fast index (:mod:`kv3d_jax.slowfast`; dimensionless, high = slow), NaN where the
        run has none or it does not apply.
      diverse_objective: ``(N,)`` the objective of each of the kernel's diverse optima (:mod:`kv3d_jax.diversity`,
        drawn side by side as ``media[DIVERSE]``), or ``()`` for a run without them.
      diverse_cosine: the largest pairwise cosine of the diverse optima's activation patterns (NaN: none).
      diverse_failed: the diverse optima's run turned non-finite.
    """

    channel: int
    objective: float
    direction_deg: float
    speed: float
    psnr: float
    media: Mapping[str, str]
    reliability: float = math.nan
    reliable: bool = True
    dead: bool = False
    aliased: bool = False
    failed: int = 0
    name: str = ""
    slowness: float = math.nan
    diverse_objective: Sequence[float] = ()
    diverse_cosine: float = math.nan
    diverse_failed: bool = False


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer as the index shows it: its page and figures (caption -> path, relative to the
    index), kernels ``done`` of ``total`` asked for, mean PSNR (dB), mean speed (px/frame), how
    many of the kernels are ``reliable`` and how many ``dead``, and the median slow/fast index
    (NaN for a run without it)."""

    layer: str
    page: str
    figures: Mapping[str, str]
    done: int
    total: int
    mean_psnr: float
    mean_speed: float
    reliable: int = 0
    dead: int = 0
    median_slowness: float = math.nan


def save_figure(fig: Figure, path) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (replacing it whole; a failed write leaves no temporary file);
    returns the path."""
    FigureCanvasAgg(fig)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def contact_sheet(statics, channels: Sequence[int], title: str, names: Sequence[str] = ()) -> Figure:
    """A grid of ``statics`` ``(K, H, W, 3)`` in [0, 1] (clipped), each titled with its channel and,
    given ``names`` (one per static), its name."""
    statics = np.clip(np.asarray(statics, np.float32), 0.0, 1.0)
    k = len(statics)
    if k == 0 or len(channels) != k:
        raise ValueError(f"contact_sheet needs at least one static and one channel per static; "
                         f"got {k} statics, {len(channels)} channels")
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(1.1 * cols, 1.1 * rows + 0.4), dpi=100)
    fig.suptitle(title, fontsize=9)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i < k:
            ax.imshow(statics[i], interpolation="nearest")
            ax.set_title(f"{channels[i]} {names[i]}" if names else str(channels[i]), fontsize=7 if not names else 5,
                         pad=2)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / fig.get_figheight(),
                        wspace=0.1, hspace=0.3)
    return fig


def direction_histogram(direction_deg, speed, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Speed-weighted histogram of directions: ``(centres_deg, weights)``, both ``(bins,)``.

    Bin ``i`` is centred on ``i * 360 / bins`` degrees (so 0° = right and 90° = up are bin
    centres); each kernel adds its ``speed`` (px/frame) to its direction's bin. Kernels
    with a non-finite direction or speed are left out.
    """
    direction, speed = np.asarray(direction_deg, np.float64), np.asarray(speed, np.float64)
    finite = np.isfinite(direction) & np.isfinite(speed)
    index = np.round(direction[finite] % 360.0 / (360.0 / bins)).astype(int) % bins
    return np.arange(bins) * 360.0 / bins, np.bincount(index, weights=speed[finite], minlength=bins)


def motion_histogram(direction_deg, speed, title: str, bins: int = 16) -> Figure:
    """Two panels: the directions ``(K,)`` (degrees, 0° = right, 90° = up, drawn as on screen)
    as a polar histogram weighted by ``speed`` ``(K,)`` px/frame, and a histogram of speeds."""
    centres, weights = direction_histogram(direction_deg, speed, bins)
    speed = np.asarray(speed, np.float64)
    speed = speed[np.isfinite(speed)]
    fig = Figure(figsize=(8, 3.6), dpi=100)
    fig.suptitle(title, fontsize=9)
    polar = fig.add_subplot(1, 2, 1, projection="polar")
    # Matplotlib's polar axes put 0 rad to the right and turn counter-clockwise: as our angles.
    polar.bar(np.deg2rad(centres), weights, width=np.deg2rad(360.0 / bins), color="tab:blue", edgecolor="white")
    polar.set_title("direction, weighted by speed (0° = right, 90° = up)", fontsize=8)
    polar.tick_params(labelsize=7)
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(speed, bins=min(bins, max(len(speed), 1)), color="tab:orange", edgecolor="white")
    ax.set_xlabel("mean speed (px/frame)", fontsize=8)
    ax.set_ylabel("kernels", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.15, top=0.82, wspace=0.35)
    return fig


# A picture that has not loaded yet keeps a 128 px square (aspect-ratio's fallback), so cards do not
# collapse or jump as a long page's media arrive.
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:.2em 0}
.note{color:#8a5a00}
.figures img{max-width:48%;height:auto;margin-right:1%;vertical-align:top;border:1px solid #ddd;background:#fff}
form{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:1em 0;padding:.6em;background:#eee}
form input[type=number]{width:5em}
#kernels{display:flex;flex-wrap:wrap;gap:10px}
.kernel{margin:0;padding:6px;background:#fff;border:1px solid #ddd}
.kernel[hidden]{display:none}
.kernel.dead{border:1px dashed #999;opacity:.55}
.kernel.failed{border:1px dashed #b00020}
.badge{padding:0 .4em;border-radius:3px;font-size:12px}
.badge.reliable{background:#d7f0d7;color:#1e6b1e}.badge.unreliable{background:#fbe6bd;color:#8a5a00}
.badge.dead{background:#ddd;color:#444}.badge.failed{background:#f8d0d0;color:#b00020}
.media{display:flex;gap:4px}
.media figure{margin:0;text-align:center;font-size:11px;color:#666}
.media img,.media video{height:128px;width:auto;aspect-ratio:auto 1/1;image-rendering:pixelated;display:block}
.media div.video{min-width:128px;height:128px}
.media.diverse{margin-top:8px}
.summary{display:flex;flex-wrap:wrap;gap:.2em .8em;align-items:center;margin-top:4px}
.arrow{width:22px;height:22px}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
#status{margin-top:2em;color:#2a6b2a}#status.bad{color:#b00020;font-weight:bold}
"""

# Registered first in <head>, so errors of pictures that fail before the page's script runs
# are counted too (a failed image or video fires "error" on the element; it reaches window only
# in the capture phase).
_ERRORS_JS = """
window.kv3dErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.kv3dErrors.push(t && t !== window && t.src ? "could not load " + t.getAttribute("src")
                                                    : String(e.message));
}, true);
"""

# Media in view: what the IntersectionObserver reports intersecting the viewport now (an image, or
# the box a video is made in). A video is made from its template when its box first comes into
# view and plays only while in view (its first play() is what loads it, as preload="none"), and
# lazy images load only near the view, so the status counts those; the rest of a long page is not
# fetched until scrolled to. It is rewritten as media load or fail and as the view changes, and also
# reports the first contentful paint (ms) and the JS heap in use (bytes; Chromium only).
_STATUS_JS = """
(function () {
  "use strict";
  var status = document.getElementById("status");
  var media = Array.prototype.slice.call(document.querySelectorAll("img, div.video"));
  var inView = new Set(), observed = media.length === 0;
  /* A looping video drops back to "metadata only" for a moment at each restart, so a video counts as
     loaded once it has had a frame to show. */
  var played = new WeakSet();
  function isVideo(el) { return el.tagName === "DIV"; }
  /* The box's video, once made (querySelector does not look into a template). */
  function video(box) { return box.querySelector("video"); }
  function source(el) { return isVideo(el) ? el.firstElementChild.content.firstElementChild.getAttribute("src")
                                            : el.getAttribute("src"); }
  function loaded(el) {
    var v = isVideo(el) && video(el);
    return isVideo(el) ? !!v && (played.has(v) || v.readyState >= 2) : el.complete && el.naturalWidth > 0;
  }
  function broken(el) {
    return isVideo(el) ? !!video(el) && video(el).error !== null : el.complete && el.naturalWidth === 0;
  }
  function update() {
    if (!observed) return;  /* what is in view is known from the observer's first report on */
    var shown = Array.from(inView), errors = window.kv3dErrors;
    var ok = shown.filter(loaded), bad = shown.filter(broken), waiting = shown.length - ok.length - bad.length;
    var d = status.dataset, paint = performance.getEntriesByName("first-contentful-paint")[0];
    d.media = media.length; d.inView = shown.length; d.loaded = ok.length; d.failed = bad.length;
    d.waiting = waiting; d.errors = errors.length;
    var extra = "";
    if (paint) { d.firstPaint = Math.round(paint.startTime); extra += "; first paint after " + d.firstPaint + " ms"; }
    if (performance.memory) {
      d.heap = performance.memory.usedJSHeapSize;
      extra += "; JS heap " + (d.heap / 1048576).toFixed(1) + " MiB";
    }
    var whole = shown.length === media.length, scope = whole ? "" : " in view";
    var rest = whole ? "" : " (" + media.length + " on the page; the others load when scrolled to)";
    if (bad.length || errors.length) {
      status.className = "bad";
      status.textContent = bad.length + " of " + shown.length + " media" + scope + " failed to load ("
        + bad.map(source).join(", ") + ")" + rest + "; "
        + errors.length + " errors: " + errors.join("; ") + extra;
    } else {
      status.className = waiting ? "waiting" : "";
      status.textContent = (waiting ? "loading: " + ok.length + " of " + shown.length : "all " + shown.length)
        + " media" + scope + " loaded" + rest + ", no errors" + extra;
    }
  }
  var observer = new IntersectionObserver(function (entries) {
    entries.forEach(function (e) {
      var el = e.target;
      if (e.isIntersecting) {
        inView.add(el);
        if (isVideo(el)) {
          if (!video(el)) el.appendChild(document.importNode(el.firstElementChild.content, true));
          var v = video(el);
          v.muted = true;  /* a video made by script starts unmuted whatever its attribute says */
          /* A failed play() shows as the video's error event and v.error, counted above. */
          v.play().catch(function () {});
        }
      } else {
        inView.delete(el);
        if (isVideo(el) && video(el)) video(el).pause();
      }
    });
    observed = true;
    update();
  });
  media.forEach(function (el) { observer.observe(el); });
  document.addEventListener("loadeddata", function (e) { played.add(e.target); update(); }, true);
  ["load", "error"].forEach(function (type) { document.addEventListener(type, update, true); });
  window.addEventListener("load", update);
  new PerformanceObserver(update).observe({type: "paint", buffered: true});
})();
"""

_LAYER_JS = """
(function () {
  "use strict";
  var grid = document.getElementById("kernels");
  var form = document.getElementById("view");
  var cards = Array.prototype.slice.call(grid.children);
  var names = ["sort", "order", "min_speed", "min_psnr", "direction", "tolerance", "channels", "show"];
  function value(card, key) { return parseFloat(card.dataset[key]); }
  /* A dead or failed kernel has nothing to see, so it never counts as reliable. */
  function shows(card, show) {
    var live = card.dataset.dead === "0" && card.dataset.failed === "0";
    var reliable = live && card.dataset.reliable === "1";
    return show === "reliable" ? reliable : show === "unreliable" ? !reliable : show === "live" ? live : true;
  }
  function gap(a, b) { var d = Math.abs(a - b) % 360; return Math.min(d, 360 - d); }
  function channelSet(text) {
    var wanted = [];
    text.split(",").forEach(function (part) {
      var m = /^\\s*(\\d+)\\s*(?:-\\s*(\\d+)\\s*)?$/.exec(part);
      if (m) wanted.push([+m[1], m[2] === undefined ? +m[1] : +m[2]]);
    });
    return wanted.length ? wanted : null;
  }
  function state() {
    var s = {};
    names.forEach(function (n) { s[n] = form.elements[n].value; });
    return s;
  }
  function apply() {
    var s = state(), sign = s.order === "desc" ? -1 : 1, key = s.sort;
    var minSpeed = parseFloat(s.min_speed), minPsnr = parseFloat(s.min_psnr);
    var dir = parseFloat(s.direction), tol = parseFloat(s.tolerance), ranges = channelSet(s.channels);
    var sorted = cards.slice().sort(function (a, b) {
      var x = value(a, key), y = value(b, key);
      if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;
      return (isNaN(x) || x === y ? 0 : sign * (x < y ? -1 : 1)) || value(a, "channel") - value(b, "channel");
    });
    var shown = 0;
    sorted.forEach(function (card) {
      var c = value(card, "channel");
      var ok = (isNaN(minSpeed) || value(card, "speed") >= minSpeed)
        && (isNaN(minPsnr) || value(card, "psnr") >= minPsnr)
        && (isNaN(dir) || isNaN(tol) || gap(value(card, "direction"), dir) <= tol)
        && (!ranges || ranges.some(function (r) { return c >= r[0] && c <= r[1]; }))
        && shows(card, s.show);
      card.hidden = !ok;
      shown += ok ? 1 : 0;
      grid.appendChild(card);
    });
    var count = document.getElementById("shown");
    count.textContent = shown + " of " + cards.length + " kernels shown";
    count.dataset.shown = shown;
    var fragment = names.filter(function (n) { return s[n] !== defaults[n]; })
      .map(function (n) { return encodeURIComponent(n) + "=" + encodeURIComponent(s[n]); }).join("&");
    history.replaceState(null, "", fragment ? "#" + fragment : location.pathname + location.search);
  }
  function fromFragment() {
    location.hash.slice(1).split("&").forEach(function (pair) {
      var kv = pair.split("="), name = decodeURIComponent(kv[0]);
      if (names.indexOf(name) >= 0 && kv.length === 2) form.elements[name].value = decodeURIComponent(kv[1]);
    });
  }
  var defaults = state();
  form.addEventListener("input", apply);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  window.addEventListener("hashchange", function () { fromFragment(); apply(); });
  fromFragment();
  apply();
})();
"""


def _number(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else "–"


def _attr(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "NaN"


def _arrow(direction_deg: float) -> str:
    """An inline SVG arrow pointing along ``direction_deg`` (0° = right, 90° = up)."""
    if not math.isfinite(direction_deg):
        return '<svg class="arrow" viewBox="-10 -10 20 20" role="img" aria-label="no direction"></svg>'
    # SVG's y axis points down, so an angle counter-clockwise on screen is a negative rotation.
    return (
        f'<svg class="arrow" viewBox="-10 -10 20 20" role="img" aria-label="{direction_deg:.0f}°">'
        f'<g transform="rotate({-direction_deg:.1f})"><line x1="-7" y1="0" x2="5" y2="0" '
        'stroke="#c0392b" stroke-width="2"/><path d="M8 0 L2 -4 L2 4 Z" fill="#c0392b"/></g></svg>'
    )


def _page(title: str, body: str, script: str = "") -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        f"<script>{_ERRORS_JS}</script></head>\n<body>\n{body}\n"
        '<p id="status">checking media…</p>\n'
        f"<script>{_STATUS_JS}</script>\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _badges(view: KernelView) -> str:
    rating = "reliable" if view.reliable else "unreliable"
    score = f"{view.reliability:.2f}" if math.isfinite(view.reliability) else "–"
    badges = f'<span class="badge {rating}">{rating} {score}</span>'
    if view.dead:
        badges += '<span class="badge dead">dead</span>'
    if view.failed:
        badges += f'<span class="badge failed">failed in stage {view.failed}</span>'
    return badges


VIDEO_SUFFIXES = (".mp4", ".webm")


def _picture(path: str, label: str) -> str:
    """The element showing one picture: a box holding the ``<template>`` of a muted, looping ``<video>``
    that loads nothing until the page's script makes and plays it in view, or a lazily loaded ``<img>``."""
    if path.lower().endswith(VIDEO_SUFFIXES):
        return (f'<div class="video"><template><video src="{html.escape(path)}" muted loop playsinline '
                f'preload="none" aria-label="{html.escape(label)}"></video></template></div>')
    return f'<img src="{html.escape(path)}" alt="{html.escape(label)}" loading="lazy" decoding="async">'


def _kernel_card(view: KernelView) -> str:
    figures = "".join(
        f'<figure>{_picture(view.media[kind], f"{caption}, channel {view.channel}")}'
        f'<figcaption>{html.escape(caption)}</figcaption></figure>'
        for kind, caption in MEDIA.items()
        if kind in view.media
    )
    links = "".join(f' <a href="{html.escape(view.media[kind])}">{html.escape(text)}</a>'
                    for kind, text in LINKS.items() if kind in view.media)
    data = (
        f'data-channel="{view.channel}" data-objective="{_attr(view.objective)}" '
        f'data-speed="{_attr(view.speed)}" data-psnr="{_attr(view.psnr)}" '
        f'data-direction="{_attr(view.direction_deg)}" data-reliability="{_attr(view.reliability)}" '
        f'data-reliable="{int(view.reliable)}" data-dead="{int(view.dead)}" data-failed="{view.failed}" '
        f'data-slowness="{_attr(view.slowness)}"'
        + (f' data-diverse_cosine="{_attr(view.diverse_cosine)}"' if view.diverse_objective else "")
    )
    classes = "kernel" + (" dead" if view.dead else "") + (" failed" if view.failed else "")
    speed = "speed ambiguous (aliased)" if view.aliased else f"{_number(view.speed)} px/frame"
    return (
        f'<article class="{classes}" id="channel-{view.channel}" {data}>'
        f'<div class="media">{figures}</div><div class="summary"><b>#{view.channel}</b>'
        f'{f"<b>{html.escape(view.name)}</b>" if view.name else ""}{_badges(view)}'
        f"{_arrow(view.direction_deg)}<span>{_number(view.direction_deg, 4)}°</span>"
        f"<span>{speed}</span>"
        + (f'<span title="slow/fast index: the fraction of the objective kept under a temporal-variation '
           f'penalty (high = slow)">slow/fast {view.slowness:.2f}</span>' if math.isfinite(view.slowness) else "")
        + f"<span>{_number(view.psnr)} dB</span>"
        f"<span>objective {_number(view.objective)}</span>{links}</div>{_diverse_strip(view)}</article>"
    )


def _diverse_strip(view: KernelView) -> str:
    """A kernel card's row of diverse optima: the side-by-side picture, each optimum's objective as a
    percentage of the best, the largest pairwise cosine and the badge of :func:`_diverse_verdict`; empty
    for a kernel without them."""
    if not view.diverse_objective:
        return ""
    n = len(view.diverse_objective)
    fractions, _, badge = _diverse_verdict(view.diverse_objective, view.diverse_cosine, view.diverse_failed)
    shares = ", ".join(f'<span class="fraction">{_number(100 * f)} %</span>' for f in fractions)
    picture = (_picture(view.media[DIVERSE], f"{n} diverse optima, channel {view.channel}")
               if DIVERSE in view.media else "")
    return (f'<div class="media diverse"><figure>{picture}<figcaption>{n} diverse optima: {shares} of the best'
            f'</figcaption></figure></div><div class="summary">{badge}<span>max pairwise cosine '
            f'<span class="cosine">{_cosine(view.diverse_cosine)}</span></span></div>')


def layer_page(
    title: str,
    kernels: Sequence[KernelView],
    figures: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    index: str | None = "index.html",
) -> str:
    """The HTML of a layer page: ``figures`` (caption -> relative path), ``notes``, one card per kernel.
    The slow/fast index and the diverse optima's largest cosine are shown and sortable only when some kernel
    has one."""
    offered = {key: label for key, label in OPTIONAL_FIELDS.items()
               if any(math.isfinite(getattr(v, key)) for v in kernels)}
    fields, slowfast = {**FIELDS, **offered}, "slowness" in offered
    sort_options = "".join(f'<option value="{k}">{v}</option>' for k, v in fields.items())
    controls = (
        '<form id="view" autocomplete="off">'
        f'<label>sort by <select name="sort">{sort_options}</select></label>'
        '<label><select name="order"><option value="asc">ascending</option>'
        '<option value="desc">descending</option></select></label>'
        '<label>speed ≥ <input type="number" name="min_speed" step="any" value=""> px/frame</label>'
        '<label>PSNR ≥ <input type="number" name="min_psnr" step="any" value=""> dB</label>'
        '<label>direction <input type="number" name="direction" step="any" value="">° '
        '± <input type="number" name="tolerance" step="any" value="45">°</label>'
        '<label>channels <input type="text" name="channels" value="" placeholder="e.g. 0-7,12"></label>'
        '<label>show <select name="show"><option value="all">all</option>'
        '<option value="reliable">reliable</option><option value="unreliable">unreliable, dead or failed</option>'
        '<option value="live">all but dead or failed</option></select></label>'
        '<output id="shown"></output></form>'
    )
    body = [f"<h1>{html.escape(title)}</h1>"]
    if index:
        body.append(f'<p><a href="{html.escape(index)}">all layers</a></p>')
    body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    if figures:
        body.append('<div class="figures">' + "".join(
            f'<img src="{html.escape(path)}" alt="{html.escape(caption)}" title="{html.escape(caption)}">'
            for caption, path in figures.items()) + "</div>")
    body.append('<p>Per kernel: the optimal video, its static texture, its motion (hue = direction '
                'as on the colour wheel at the right, brightness = speed; grey = not read out) and the '
                'reconstruction from the two; the arrow shows the dominant direction of motion. '
                'The badge gives its reliability, 0–1, computed from the kernel\'s own optimisation and '
                'decomposition: the objective\'s gain over random videos, how much of the frames\' change one '
                'translation explains, no temporal aliasing (green = reliable, amber = not; dead = no clear gain '
                'over random videos or no positive activation, so there is nothing '
                'to see; “failed in stage N” = that stage\'s result turned non-finite; “speed ambiguous” = the '
                'speed cannot be told from its temporal alias).'
                + (' “slow/fast” = the fraction of the kernel\'s stage-1 objective that its optimum keeps under a '
                   'penalty on change between frames (Feichtenhofer et al.): near 1 = slow, it needs little '
                   'change over time; low = fast, it needs motion or flicker.' if slowfast else '')
                + '</p>')
    if any(view.diverse_objective for view in kernels):
        body.append('<p>Diverse optima: below each kernel\'s summary, N videos that each maximise its objective '
                    'while a penalty pushes their activation patterns at the layer apart (docs/diversity.md), '
                    'side by side, each with its objective (unjittered) as a percentage of the best of them, then '
                    'the largest cosine between two optima\'s activation patterns (1: they excite the layer '
                    f'alike). {_DIVERSE_BADGES} “failed” = the diverse run turned non-finite.</p>')
    if any("attribution" in view.media for view in kernels):
        body.append('<p>Attribution (MACO): the optimal video seen through its attribution map, opaque where '
                    'the objective draws on the video (|∂objective/∂pixel| summed over 8 noisy, jittered '
                    'copies), fading to white where it does not.</p>')
    body.append(controls)
    body.append('<div id="kernels">' + "\n".join(_kernel_card(v) for v in kernels) + "</div>")
    return _page(title, "\n".join(body), _LAYER_JS)


def index_page(title: str, layers: Sequence[LayerView], notes: Sequence[str] = ()) -> str:
    """The HTML of the index: one row per layer with its counts, figures and a link to its page (and
    its median slow/fast index, when some layer has one)."""
    slowfast = any(math.isfinite(v.median_slowness) for v in layers)
    rows = "".join(
        f'<tr><td><a href="{html.escape(v.page)}">{html.escape(v.layer)}</a></td>'
        f"<td>{v.done} of {v.total}</td><td>{v.reliable} reliable, {v.dead} dead</td>"
        f"<td>{_number(v.mean_speed)} px/frame</td>"
        + (f"<td>{_number(v.median_slowness, 2)}</td>" if slowfast else "")
        + f"<td>{_number(v.mean_psnr)} dB</td><td>"
        + "".join(f'<a href="{html.escape(v.page)}"><img src="{html.escape(path)}" alt="{html.escape(caption)}" '
                  f'title="{html.escape(caption)}" height="120"></a>' for caption, path in v.figures.items())
        + "</td></tr>"
        for v in layers
    )
    body = (
        f"<h1>{html.escape(title)}</h1>"
        + "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
        + "<table><thead><tr><th>layer</th><th>kernels done</th><th>reliable</th><th>mean speed</th>"
        + ("<th>median slow/fast index</th>" if slowfast else "")
        + f"<th>mean PSNR</th><th>figures</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    return _page(title, body)


# Issue #25's acceptance for a kernel's diverse optima: every pairwise cosine of their activation
# patterns at most DISTINCT_COSINE and every optimum at least DISTINCT_FRACTION of the best one's objective.
DISTINCT_COSINE = 0.5
DISTINCT_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class DiverseView:
    """One kernel's N diverse optima (``kv3d maximize --diversity N``) as the diversity page shows them.

    Attributes:
      channel: the channel index.
      objective: ``(N,)`` each optimum's objective (activation, unjittered).
      max_cosine: the largest pairwise cosine of the N optima's activation patterns.
      media: ``(N,)`` each optimum's moving picture, a path relative to the page (``.mp4``/``.webm`` shown
        as a ``<video>``, anything else as an ``<img>``).
      failed: an optimum turned non-finite.
      name: the channel's name (``VideoModel.names_of``), or ``""``.
    """

    channel: int
    objective: Sequence[float]
    max_cosine: float
    media: Sequence[str]
    failed: bool = False
    name: str = ""


def _diverse_verdict(objective: Sequence[float], max_cosine: float, failed: bool) -> tuple[list[float], bool, str]:
    """How a kernel's N diverse optima compare, from their objectives ``(N,)``, the largest pairwise cosine
    of their activation patterns and whether their run ``failed``: each objective as a fraction of the best
    (NaN when none is above 0 or one is not finite), whether they are distinct (every cosine at most
    :data:`DISTINCT_COSINE`, every optimum at least :data:`DISTINCT_FRACTION` of the best) and the badge's
    HTML: failed, dead (no optimum above 0), distinct or alike."""
    finite = all(math.isfinite(x) for x in objective)
    best = max(objective) if finite else math.nan
    # No optimum above 0 (or a non-finite one): a share of the best means nothing.
    dead = finite and best <= 0
    fractions = [x / best if best > 0 else math.nan for x in objective]
    distinct = not failed and max_cosine <= DISTINCT_COSINE and all(f >= DISTINCT_FRACTION for f in fractions)
    if failed:
        badge = '<span class="badge failed">failed</span>'
    elif dead:
        badge = '<span class="badge dead">dead</span>'
    else:
        badge = (f'<span class="badge {"reliable" if distinct else "unreliable"}">'
                 f'{"distinct" if distinct else "alike"}</span>')
    return fractions, distinct, badge


def _cosine(max_cosine: float) -> str:
    # Two decimals, so a cosine just above the bound does not read as the bound itself.
    return f"{max_cosine:.2f}" if math.isfinite(max_cosine) else "–"


def _lowest(fractions: Sequence[float]) -> str:
    """The weakest optimum's share of the best, in %."""
    return _number(100 * min(fractions) if all(math.isfinite(f) for f in fractions) else math.nan)


# What a diverse optima badge means, on every page that shows one.
_DIVERSE_BADGES = (f"“distinct” = every cosine at most {DISTINCT_COSINE:g} and every optimum at least "
                   f"{100 * DISTINCT_FRACTION:g} % of the best; “alike” otherwise; “dead” = no optimum reaches a "
                   "positive objective.")


def _diverse_row(view: DiverseView) -> str:
    fractions, distinct, badge = _diverse_verdict(view.objective, view.max_cosine, view.failed)
    figures = "".join(
        f'<figure>{_picture(path, f"optimum {i}, channel {view.channel}")}<figcaption>optimum {i}: '
        f'<span class="objective">{_number(x)}</span> (<span class="fraction">{_number(100 * f)} %</span> '
        "of the best)</figcaption></figure>"
        for i, (path, x, f) in enumerate(zip(view.media, view.objective, fractions)))
    return (
        f'<article class="kernel" id="channel-{view.channel}" data-channel="{view.channel}" '
        f'data-max-cosine="{_attr(view.max_cosine)}" data-distinct="{int(distinct)}">'
        f'<div class="media">{figures}</div><div class="summary"><b>#{view.channel}</b>'
        f'{f"<b>{html.escape(view.name)}</b>" if view.name else ""}{badge}'
        f'<span>max pairwise cosine <span class="cosine">{_cosine(view.max_cosine)}</span></span>'
        f"<span>lowest optimum {_lowest(fractions)} % of the best</span>"
        "</div></article>"
    )


def diversity_page(title: str, kernels: Sequence[DiverseView], notes: Sequence[str] = ()) -> str:
    """The HTML of a page of diverse optima: one row per kernel, its N optima side by side, each with its
    objective and its fraction of the kernel's best, then the kernel's largest pairwise cosine and a
    badge, "distinct" when every cosine is at most :data:`DISTINCT_COSINE` and every optimum reaches
    :data:`DISTINCT_FRACTION` of the best."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    body.append(
        "<p>Per channel: its optima side by side, each with its objective (the channel's mean activation, "
        "without jitter) and that as a percentage of the best of them; then the largest cosine between two "
        "optima's activation patterns at the layer (1: they excite the layer alike). "
        f"{_DIVERSE_BADGES}</p>")
    body.append('<div id="kernels">' + "\n".join(_diverse_row(v) for v in kernels) + "</div>")
    return _page(title, "\n".join(body))


def write_page(path, text: str) -> Path:
    """Writes a page's HTML ``text`` to ``path`` (replacing it whole, never half-written; a failed write
    leaves no temporary file); returns the path."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
