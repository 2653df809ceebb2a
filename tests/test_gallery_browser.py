"""The gallery in a real browser: headless Chromium opens the pages from disk.

Each page reports in its ``#status`` element how many of its media in view loaded (images
complete with ``naturalWidth > 0``, videos with a frame to show) and which errors its window
saw, its first contentful paint and its JS heap. The tests drive Chromium over its DevTools
protocol (``--remote-debugging-pipe``): they wait until the status says that nothing in view is
still loading and the first paint happened, then read the DOM; ``--enable-logging=stderr``
prints every console message, which these pages never write on their own. The window is
1280×2400 px: the small pages fit in it whole, a page of 1,024 kernels does not.

Needs ``chromium`` on the PATH (Debian: ``apt-get install -y chromium``). Where the
environment variable ``CI`` is set the tests fail without it; elsewhere they are skipped.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kv3d_jax import gallery, pipeline, record, writers
from kv3d_jax.job import Job
from kv3d_jax.models import VideoModel
from kv3d_jax.store import Store

TOY = VideoModel(name="toy", apply=lambda params, video, upto: video, layers=("conv_a", "conv_b"),
                 input_shape=(4, 12, 12), linear_layers=frozenset({"conv_a"}))
JOB = Job(model="toy", preset="native", steps=1, decompose_steps=1, seed=0, media="gif")
# (direction_deg, speed, psnr, objective) of conv_b's kernels 0..5.
SUMMARIES = [(10.0, 0.2, 25.0, 1.0), (80.0, 1.5, 31.0, 0.5), (100.0, 0.9, float("nan"), 2.0),
             (170.0, 3.0, 18.0, 0.1), (275.0, 0.6, 22.0, 3.0), (45.0, 0.7, 29.0, 0.7)]
# (reliability, reliable, dead, failed stage, aliased) of the kernels 0..6 of a page built directly.
RELIABILITY = [(0.82, True, False, 0, False), (0.31, False, False, 0, False), (0.05, False, True, 0, False),
               (float("nan"), True, False, 0, False), (0.9, True, False, 3, False), (0.6, True, False, 0, True),
               (0.4, False, False, 1, False)]
_CONSOLE = re.compile(r":CONSOLE[:(]")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = "headless Chromium is needed to load the gallery: apt-get install -y chromium"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message + " (these tests fail instead of skipping where CI is set)")


def _record(rng, direction, speed, psnr, objective) -> dict:
    t, h, w = TOY.input_shape
    # A smooth texture drifting right: every picture has structure, like a real result.
    x = np.arange(w + t)[None, :] + 0.3 * np.arange(h)[:, None]
    texture = 0.5 + 0.4 * np.sin(x[..., None] * [0.5, 0.7, 0.9] + rng.uniform(0, 6, 3))
    video = np.stack([texture[:, f:f + w] for f in range(t)]).astype(np.float32)
    displacement = np.broadcast_to(np.arange(t, dtype=np.float32)[:, None, None, None] * [1.0, 0.0],
                                   (t, h, w, 2)).astype(np.float32)
    summary = {"direction_deg": direction, "speed": speed, "psnr": psnr, "objective": objective}
    # Every other field the pipeline stores (``failed``, the trust scores) is 0: a kernel whose stages all
    # went well.
    arrays = {"video": video, "static": video[0], "displacement": displacement,
              **{name: summary.get(name, 0.0) for name in record.SUMMARY + record.TRUST}}
    return JOB.record(TOY).stored(arrays)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A run folder with the gallery of two layers: conv_a's kernels 0-2, conv_b's 0-5 (of 8)."""
    out = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    with Store.open(out, {"toy": True}, "0") as store:
        for channel in range(3):
            store.write("conv_a", channel, _record(rng, 0.0, 1.0, 20.0, 1.0))
        for channel, summary in enumerate(SUMMARIES):
            store.write("conv_b", channel, _record(rng, *summary))
        views = [pipeline.build_layer_page(store, TOY, "conv_a", 3, JOB, out),
                 pipeline.build_layer_page(store, TOY, "conv_b", 8, JOB, out)]
    gallery.write_page(out / "index.html", gallery.index_page("toy", views))
    return out


class _Dom(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data

    def find(self, tag: str, **match) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in match.items())]


class _DevTools:
    """Chromium's DevTools protocol over the pipe of ``--remote-debugging-pipe``: JSON messages, each
    ended by a NUL byte, written to ``write_fd`` (the browser's fd 3) and read from ``read_fd`` (its fd 4)."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd, self.last_id, self.buffer = write_fd, read_fd, 0, b""

    def send(self, method: str, session: str | None = None, **params) -> int:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        return self.last_id

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Sends one command and returns its result, skipping the events that arrive meanwhile."""
        wanted = self.send(method, session, **params)
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.read_fd, 1 << 16)
                assert chunk, f"Chromium closed the DevTools pipe during {method}"
                self.buffer += chunk
            message, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(message)
            if reply.get("id") == wanted:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, session: str, expression: str):
        return self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")


# The page is done: its status has the observer's first report, nothing in view is still loading, and
# the first contentful paint happened.
_SETTLED = """(function () {
  var d = document.getElementById("status").dataset;
  return document.readyState === "complete" && d.inView !== undefined && d.waiting === "0"
    && d.firstPaint !== undefined;
})()"""


def _open(page: Path, profile: Path, fragment: str = "") -> tuple[_Dom, list[str]]:
    """Chromium's DOM of ``page`` (opened with ``fragment``) once it settled (:data:`_SETTLED`, at most
    30 s), and the console messages it logged; ``profile``: a fresh folder for Chromium's user data."""
    profile.mkdir(parents=True, exist_ok=True)
    to_browser, from_browser = os.pipe(), os.pipe()
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--window-size=1280,2400", "--enable-precise-memory-info", "--enable-logging=stderr", "--v=0",
               "--remote-debugging-pipe", "about:blank"]
    log = profile / "chromium.log"
    with open(log, "w") as err:  # a file, not a pipe, so Chromium's chatter never blocks it
        # bash puts the pipe's ends on the descriptors 3 and 4 that Chromium reads and writes (POSIX sh
        # need not redirect descriptors above 9).
        browser = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_browser[0]} 4>&{from_browser[1]}', "bash",
                                    *command],
                                   stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                   pass_fds=(to_browser[0], from_browser[1]))
    os.close(to_browser[0])
    os.close(from_browser[1])
    try:
        tools = _DevTools(to_browser[1], from_browser[0])
        target = tools.call("Target.createTarget", url=page.resolve().as_uri() + fragment)["targetId"]
        session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.monotonic() + 30
        while not tools.evaluate(session, _SETTLED) and time.monotonic() < deadline:
            time.sleep(0.05)
        dom = tools.evaluate(session, "document.documentElement.outerHTML")
        tools.send("Browser.close")
        browser.wait(timeout=30)
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait()
        os.close(to_browser[1])
        os.close(from_browser[0])
    stderr = log.read_text(errors="replace")
    assert browser.returncode == 0, stderr[-2000:]
    return _Dom(dom), [line for line in stderr.splitlines() if _CONSOLE.search(line)]


def _status(dom: _Dom) -> dict:
    (status,) = dom.find("p", id="status")
    return status


@pytest.mark.parametrize("page, images", [("index.html", 4), ("conv_a.html", 14), ("conv_b.html", 26)])
def test_every_image_loads_without_errors(site, tmp_path, page, images):
    source = _Dom((site / page).read_text())
    assert len(source.find("img")) == images  # figures + 4 pictures per kernel, or the index's figures
    dom, console = _open(site / page, tmp_path)
    status = _status(dom)
    assert [status[f"data-{k}"] for k in ("media", "in-view", "loaded", "failed", "errors")] == [
        str(images), str(images), str(images), "0", "0"], status  # the window holds the whole page
    assert status["class"] == "" and status.get("data-first-paint") and status.get("data-heap")
    assert console == []


def test_sorting_and_filtering_from_the_link(site, tmp_path):
    dom, console = _open(site / "conv_b.html", tmp_path, "#sort=psnr&order=desc&min_speed=0.5&direction=90&tolerance=60")
    assert console == []
    cards = dom.find("article")
    order = [int(card["data-channel"]) for card in cards]
    shown = [int(card["data-channel"]) for card in cards if "hidden" not in card]

    def gap(a, b):
        return min(abs(a - b) % 360, 360 - abs(a - b) % 360)

    def psnr_descending(channel):  # NaN last, ties by channel
        psnr = SUMMARIES[channel][2]
        return (np.isnan(psnr), -np.nan_to_num(psnr), channel)

    assert order == sorted(range(6), key=psnr_descending) == [1, 5, 0, 4, 3, 2]
    assert shown == [c for c in order if SUMMARIES[c][1] >= 0.5 and gap(SUMMARIES[c][0], 90) <= 60] == [1, 5, 2]
    (count,) = dom.find("output", id="shown")
    assert count["data-shown"] == "3"


def test_a_broken_page_says_so(site, tmp_path):
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    (broken / "conv_b" / "toy_conv_b_4_motion.gif").unlink()
    page = broken / "conv_b.html"
    page.write_text(page.read_text().replace("</body>", "<script>notDefinedAnywhere();</script></body>"))
    dom, console = _open(page, tmp_path / "profile")
    status = _status(dom)
    assert (status["data-failed"], status["data-errors"]) == ("1", "2"), status
    assert status["class"] == "bad" and "conv_b/toy_conv_b_4_motion.gif" in dom.text
    assert any("notDefinedAnywhere is not defined" in line for line in console), console


def test_a_missing_video_in_view_says_so(tmp_path):
    writers.save_video(tmp_path / "v.mp4", _record(np.random.default_rng(0), 0.0, 1.0, 20.0, 1.0)["video"])
    views = [gallery.KernelView(c, 1.0, 0.0, 1.0, 30.0, {"stage1": src}) for c, src in enumerate(("v.mp4", "gone.mp4"))]
    page = gallery.write_page(tmp_path / "page.html", gallery.layer_page("t", views))
    dom, console = _open(page, tmp_path / "profile")
    status = _status(dom)
    assert [status[f"data-{k}"] for k in ("in-view", "loaded", "failed", "errors")] == ["2", "1", "1", "1"], status
    assert status["class"] == "bad" and "failed to load (gone.mp4)" in dom.text
    assert "could not load gone.mp4" in dom.text


def _reliability_page(folder: Path, script: str = "") -> Path:
    """A layer page of the kernels of :data:`RELIABILITY` (no pictures), with ``script`` run after the
    page's own and the URL's fragment afterwards in ``body``'s ``data-hash``."""
    views = [gallery.KernelView(c, 1.0, 0.0, float("nan") if aliased else 1.0, 30.0, {}, reliability=score,
                                reliable=reliable, dead=dead, failed=failed, aliased=aliased)
             for c, (score, reliable, dead, failed, aliased) in enumerate(RELIABILITY)]
    tail = f"<script>{script}document.body.dataset.hash = location.hash;</script></body>"
    return gallery.write_page(folder / "page.html", gallery.layer_page("t", views).replace("</body>", tail))


def _cards(dom: _Dom) -> tuple[list[int], list[int]]:
    """The channels of the cards in page order, and of those shown."""
    cards = dom.find("article")
    return [int(c["data-channel"]) for c in cards], [int(c["data-channel"]) for c in cards if "hidden" not in c]


def test_sorting_and_filtering_by_reliability_from_the_link(tmp_path):
    dom, console = _open(_reliability_page(tmp_path), tmp_path / "profile", "#show=reliable&order=desc&sort=reliability")
    assert console == [] and _status(dom)["data-errors"] == "0"
    order, shown = _cards(dom)
    assert order == [4, 0, 5, 6, 1, 2, 3]  # by reliability descending, the unrated (NaN) last
    assert shown == [0, 5, 3]  # neither unreliable (1, 2, 6) nor dead (2) nor failed (4, 6)
    (body,) = dom.find("body")
    assert body["data-hash"] == "#sort=reliability&order=desc&show=reliable"  # the view's link, as it reads


@pytest.mark.parametrize("show, shown", [("unreliable", [1, 2, 4, 6]), ("live", [0, 1, 3, 5])])
def test_choosing_what_to_show_writes_the_link(tmp_path, show, shown):
    choose = (f'var form = document.getElementById("view"); form.elements.show.value = "{show}"; '
              'form.dispatchEvent(new Event("input"));')
    dom, console = _open(_reliability_page(tmp_path, choose), tmp_path / "profile")
    assert console == []
    assert _cards(dom) == (list(range(7)), shown)
    (body,) = dom.find("body")
    assert body["data-hash"] == f"#show={show}"


BIG = 1024


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A layer page of :data:`BIG` kernels, each with an MP4 stage-1 video and reconstruction, a WebM
    motion and a PNG static, and their objectives ``(BIG,)``. The pictures are hard links to three small
    videos and one PNG: a distinct file (URL) per kernel and kind, as in a real run, written in
    milliseconds."""
    out = tmp_path_factory.mktemp("big")
    folder = out / "layer"
    video = _record(np.random.default_rng(0), 0.0, 1.0, 20.0, 1.0)["video"]
    t, h, w, _ = video.shape
    sources = {"stage1": writers.save_video(out / "v.mp4", video),
               "motion": writers.save_video(out / "m.webm", np.concatenate([video[1:], video[1:, :, :6]], axis=2)),
               "recon": writers.save_video(out / "r.mp4", video[::-1]),
               "static": writers.save_png(out / "s.png", video[0])}
    folder.mkdir()
    rng = np.random.default_rng(1)
    objective = rng.permutation(BIG).astype(float) / 10
    views = []
    for c in range(BIG):
        media = {kind: f"layer/{writers.media_file(f'toy_layer_{c}', kind, 'webm' if kind == 'motion' else 'mp4')}"
                 for kind in sources}
        for kind, path in media.items():
            os.link(sources[kind], out / path)
        views.append(gallery.KernelView(c, objective[c], float(rng.uniform(0, 360)), float(c % 7) / 2, 25.0, media))
    gallery.write_page(out / "layer.html", gallery.layer_page("toy layer", views))
    return out / "layer.html", objective


@pytest.mark.slow
def test_a_page_of_1024_kernels_paints_fast_loads_only_the_media_in_view_and_sorts_and_filters(big_layer, tmp_path):
    """Opened with a link that sorts by objective and keeps the faster kernels: the first card is the
    best kernel, the filter holds, the first paint comes within 2 s, and of the 4,096 pictures only
    those in the window are made and load, all of them. (One page load checks all of it: each takes
    seconds.)"""
    page, objective = big_layer
    dom, console = _open(page, tmp_path, "#sort=objective&order=desc&min_speed=1.5")
    status = _status(dom)
    first_paint, heap = int(status["data-first-paint"]), int(status["data-heap"])
    print(f"{BIG} kernels ({page.stat().st_size / 2**20:.1f} MiB of HTML): first contentful paint {first_paint} ms, "
          f"JS heap {heap / 2**20:.1f} MiB; {status['data-in-view']} of {status['data-media']} media in view")
    assert console == []
    in_view = int(status["data-in-view"])
    assert status["data-media"] == str(4 * BIG) and 8 <= in_view < 400  # a few dozen cards fill the window
    # Every video is a template; only those that came into view were made (the DOM shows both): a little
    # more than are in view now, as the window held more cards while the page was being laid out.
    assert len(dom.find("div", **{"class": "video"})) == len(dom.find("template")) == 3 * BIG
    videos = dom.find("video", preload="none")
    made = len(videos) - 3 * BIG
    assert all({"muted", "loop", "playsinline"} <= set(v) for v in videos) and 0 < made <= 3 * in_view, made
    assert len(dom.find("img", loading="lazy", decoding="async")) == BIG
    assert [status[f"data-{k}"] for k in ("loaded", "failed", "waiting", "errors")] == [str(in_view), "0", "0", "0"]
    assert status["class"] == "" and f"all {in_view} media in view" in dom.text
    assert first_paint <= 2000
    order, shown = _cards(dom)
    fast = [c for c in range(BIG) if c % 7 >= 3]  # speed (c % 7) / 2 >= 1.5
    assert order[0] == int(np.argmax(objective)) and len(order) == BIG
    assert shown == sorted(fast, key=lambda c: -objective[c])
    (count,) = dom.find("output", id="shown")
    assert count["data-shown"] == str(len(fast))
