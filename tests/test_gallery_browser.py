"""The gallery in a real browser: headless Chromium opens the pages from disk.

Each page reports in its ``#status`` element how many of its images loaded (complete with
``naturalWidth > 0``) and which errors its window saw; Chromium's ``--dump-dom`` prints
the DOM after the load event, and ``--enable-logging=stderr`` prints every console
message, which these pages never write on their own.

Needs ``chromium`` on the PATH (Debian: ``apt-get install -y chromium``). Where the
environment variable ``CI`` is set the tests fail without it; elsewhere they are skipped.
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kv3d_jax import gallery, pipeline
from kv3d_jax.models import VideoModel
from kv3d_jax.store import Store

TOY = VideoModel(name="toy", apply=lambda params, video, upto: video, layers=("conv_a", "conv_b"),
                 input_shape=(4, 12, 12), linear_layers=frozenset({"conv_a"}))
SETTINGS = pipeline.Settings(model="toy", preset="native", steps=1, decompose_steps=1, seed=0)
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
    return {"video": video, "static": video[0], "displacement": displacement, "reconstruction": video,
            **{name: np.float32(summary.get(name, 0.0)) for name in pipeline.SUMMARY + pipeline.TRUST}}


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
        views = [pipeline.build_layer_page(store, TOY, "conv_a", 3, SETTINGS, out),
                 pipeline.build_layer_page(store, TOY, "conv_b", 8, SETTINGS, out)]
    gallery.write_page(out / "index.html", gallery.index_page("toy", views))
    return out


class _Dom(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, **match) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in match.items())]


def _open(page: Path, profile: Path, fragment: str = "") -> tuple[_Dom, list[str]]:
    """Chromium's DOM of ``page`` (opened with ``fragment``) after loading, and the console messages
    it logged; ``profile``: a fresh folder for Chromium's user data."""
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return _Dom(result.stdout), [line for line in result.stderr.splitlines() if _CONSOLE.search(line)]


def _status(dom: _Dom) -> dict:
    (status,) = dom.find("p", id="status")
    return status


@pytest.mark.parametrize("page, images", [("index.html", 4), ("conv_a.html", 14), ("conv_b.html", 26)])
def test_every_image_loads_without_errors(site, tmp_path, page, images):
    source = _Dom((site / page).read_text())
    assert len(source.find("img")) == images  # figures + 4 pictures per kernel, or the index's figures
    dom, console = _open(site / page, tmp_path)
    status = _status(dom)
    assert (status["data-images"], status["data-loaded"], status["data-failed"], status["data-errors"]) == (
        str(images), str(images), "0", "0"), status
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
    assert status["class"] == "bad"
    assert any("notDefinedAnywhere is not defined" in line for line in console), console


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
