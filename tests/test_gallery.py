"""The gallery's pages and figures, read back as data (the browser test loads them for real)."""

from __future__ import annotations

import html.parser
import math
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from kv3d_jax import gallery


STAGE2_KINDS = ("stage1", "static", "motion", "recon", "panel", "deform")


def _view(channel, direction=90.0, speed=1.0, psnr=30.0, objective=2.0, kinds=STAGE2_KINDS,
          **reliability) -> gallery.KernelView:
    """``reliability``: the :class:`gallery.KernelView` fields after ``media``, by name."""
    media = {kind: f"b/k{channel}_{kind}.gif" for kind in kinds}
    return gallery.KernelView(channel, objective, direction, speed, psnr, media, **reliability)


class _Tags(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def test_direction_histogram_centres_bins_on_right_and_up_and_weights_by_speed():
    centres, weights = gallery.direction_histogram([0.0, 359.0, 90.0, 95.0, 180.0, np.nan, 270.0],
                                                   [1.0, 2.0, 0.5, 0.25, 3.0, 9.0, np.inf], bins=8)
    np.testing.assert_array_equal(centres, [0, 45, 90, 135, 180, 225, 270, 315])
    np.testing.assert_array_equal(weights, [3.0, 0, 0.75, 0, 3.0, 0, 0, 0])


def test_motion_histogram_draws_angles_as_on_screen():
    fig = gallery.motion_histogram([90.0, 90.0, 0.0], [2.0, 1.0, 1.0], "t", bins=4)
    polar, speeds = fig.axes
    assert polar.get_theta_offset() == 0.0 and polar.get_theta_direction() == 1  # 0 = right, counter-clockwise
    bars = {round(math.degrees(p.get_x() + p.get_width() / 2)) % 360: p.get_height() for p in polar.patches}
    assert bars == {0: 1.0, 90: 3.0, 180: 0.0, 270: 0.0}
    assert sum(p.get_height() for p in speeds.patches) == 3


def test_contact_sheet_shows_every_static_with_its_channel():
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], np.float32)
    statics = np.broadcast_to(colours[:, None, None, :], (5, 6, 6, 3))
    fig = gallery.contact_sheet(statics, [3, 8, 9, 10, 42], "sheet")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].reshape(-1, 3)
    for colour in (colours * 255).astype(np.uint8):
        assert (pixels == colour).all(axis=1).sum() > 100, colour
    assert sorted(ax.get_title() for ax in fig.axes if ax.get_title()) == ["10", "3", "42", "8", "9"]
    with pytest.raises(ValueError, match="got 5 statics, 4 channels"):
        gallery.contact_sheet(statics, [1, 2, 3, 4], "sheet")


def test_layer_page_has_a_card_per_kernel_with_its_summary_and_pictures():
    # Channel 7 was refined (stage 3): its card shows those pictures too, channel 3's cannot.
    views = [_view(3, direction=90.0), _view(7, direction=30.0, speed=0.5, psnr=math.nan,
                                             kinds=(*gallery.MEDIA, *gallery.LINKS))]
    page = gallery.layer_page("tiny <b>", views, {"statics": "b/sheet.png"}, ["a note & more"])
    tags = _Tags(page)
    cards = [a for a in tags.all("article")]
    assert [c["data-channel"] for c in cards] == ["3", "7"]
    assert cards[1]["data-speed"] == "0.5" and cards[1]["data-psnr"] == "NaN" and cards[1]["data-direction"] == "30.0"
    assert "<title>tiny &lt;b&gt;</title>" in page and "a note &amp; more" in page
    assert [g["transform"] for g in tags.all("g")] == ["rotate(-90.0)", "rotate(-30.0)"]  # SVG's y points down
    sources = [img["src"] for img in tags.all("img")]
    shown = {3: [k for k in gallery.MEDIA if k in STAGE2_KINDS], 7: list(gallery.MEDIA)}
    assert len(shown[7]) > len(shown[3])
    assert sources == ["b/sheet.png"] + [f"b/k{c}_{kind}.gif" for c in (3, 7) for kind in shown[c]]
    linked = {3: [k for k in gallery.LINKS if k in STAGE2_KINDS], 7: list(gallery.LINKS)}
    assert {a["href"] for a in tags.all("a")} == {"index.html"} | {
        f"b/k{c}_{kind}.gif" for c in (3, 7) for kind in linked[c]}
    assert "– dB" in page  # an unknown PSNR is shown as a dash
    # Self-contained: nothing but inline scripts and styles, no other origin.
    assert all("src" not in s for s in tags.all("script")) and not tags.all("link")
    assert "http" not in page and "//" not in page.replace("://", "")


def test_layer_page_shows_videos_as_lazy_videos_and_images_as_lazy_images():
    media = {"stage1": "b/k0_stage1.mp4", "static": "b/k0_static.png", "motion": "b/k0_motion.webm",
             "recon": "b/k0_recon.gif", "panel": "b/k0_panel.mp4"}
    page = gallery.layer_page("t", [gallery.KernelView(0, 1.0, 0.0, 1.0, 30.0, media)], {"statics": "b/sheet.png"})
    tags = _Tags(page)
    videos = tags.all("video")
    assert [v["src"] for v in videos] == ["b/k0_stage1.mp4", "b/k0_motion.webm"]
    for video in videos:  # nothing loads until the script plays it in view; muted, so it may play at once
        assert video["preload"] == "none" and {"muted", "loop", "playsinline"} <= set(video)
        assert video["aria-label"] in ("optimal video, channel 0", "motion, channel 0")
    # Each in a template, in a box the script makes it in once the box is in view.
    assert [name for name, _ in tags.tags if name in ("div", "template", "video")].count("template") == 2
    assert re.findall(r'<div class="video"><template><video [^>]*></video></template></div>', page) == [
        f'<div class="video"><template><video src="{src}" muted loop playsinline preload="none" '
        f'aria-label="{label}, channel 0"></video></template></div>'
        for src, label in (("b/k0_stage1.mp4", "optimal video"), ("b/k0_motion.webm", "motion"))]
    images = {img["src"]: img for img in tags.all("img")}
    assert list(images) == ["b/sheet.png", "b/k0_static.png", "b/k0_recon.gif"]
    assert "loading" not in images["b/sheet.png"]  # the layer's figures, at the top, load at once
    assert all(images[src]["loading"] == "lazy" and images[src]["decoding"] == "async"
               for src in ("b/k0_static.png", "b/k0_recon.gif"))
    assert [a["href"] for a in tags.all("a")] == ["index.html", "b/k0_panel.mp4"]  # links stay links
    # The script makes and plays a video only once it is in view (the browser test sees it load and count).
    assert "new IntersectionObserver" in page and "importNode" in page and ".play()" in page and ".pause()" in page


def test_layer_page_shows_each_kernels_reliability():
    views = [_view(0, reliability=0.824, reliable=True), _view(1, reliability=0.306, reliable=False),
             _view(2, reliability=0.0, reliable=False, dead=True), _view(3, speed=math.nan, aliased=True),
             _view(4, reliability=0.9, reliable=True, failed=2)]
    page = gallery.layer_page("t", views)
    tags = _Tags(page)
    cards = tags.all("article")
    assert [c["class"] for c in cards] == ["kernel", "kernel", "kernel dead", "kernel", "kernel failed"]
    assert ".kernel.dead{border:1px dashed" in page  # a dead kernel's card is visibly marked
    assert [(c["data-reliability"], c["data-reliable"], c["data-dead"], c["data-failed"]) for c in cards] == [
        ("0.824", "1", "0", "0"), ("0.306", "0", "0", "0"), ("0.0", "0", "1", "0"), ("NaN", "1", "0", "0"),
        ("0.9", "1", "0", "2")]
    badges = [re.findall(r'<span class="badge (\w+)">([^<]*)</span>', card) for card in page.split("<article")[1:]]
    assert badges == [[("reliable", "reliable 0.82")], [("unreliable", "unreliable 0.31")],
                      [("unreliable", "unreliable 0.00"), ("dead", "dead")], [("reliable", "reliable –")],
                      [("reliable", "reliable 0.90"), ("failed", "failed in stage 2")]]
    assert page.count("speed ambiguous (aliased)") == 1 and page.count(" px/frame</span>") == 4
    assert cards[3]["data-speed"] == "NaN"
    # Sortable by reliability, and filterable by it through a select that round-trips in the fragment.
    assert [s["name"] for s in tags.all("select")] == ["sort", "order", "show"]
    options = [o["value"] for o in tags.all("option")]
    assert options[:len(gallery.FIELDS)] == list(gallery.FIELDS) and "reliability" in gallery.FIELDS
    assert options[-4:] == ["all", "reliable", "unreliable", "live"]
    assert '"channels", "show"];' in page  # the script's list of the controls the fragment holds
    assert "no clear gain over random videos" in page and "no temporal aliasing" in page


def test_index_page_links_every_layer():
    views = [gallery.LayerView("conv1", "conv1.html", {"statics": "conv1/s.png"}, 3, 4, 21.5, 0.25, 2, 1),
             gallery.LayerView("conv2", "conv2.html", {}, 0, 8, math.nan, math.nan)]
    tags = _Tags(gallery.index_page("run", views))
    assert [a["href"] for a in tags.all("a")] == ["conv1.html", "conv1.html", "conv2.html"]
    assert [img["src"] for img in tags.all("img")] == ["conv1/s.png"]
    page = gallery.index_page("run", views)
    assert "3 of 4" in page and "21.5 dB" in page and "0 of 8" in page
    assert "<th>reliable</th>" in page and "2 reliable, 1 dead" in page and "0 reliable, 0 dead" in page


def test_diversity_page_shows_each_channels_optima_side_by_side():
    kernels = [gallery.DiverseView(3, [10.0, 9.0, 8.5], 0.42, ["k3_div0.mp4", "k3_div1.mp4", "k3_div2.mp4"]),
               gallery.DiverseView(7, [4.0, 2.0, 3.9], 0.497, ["k7_div0.gif", "k7_div1.gif", "k7_div2.gif"],
                                   name="waving")]
    page = gallery.diversity_page("m conv3: 3 diverse optima", kernels, ["weight 2"])
    tags = _Tags(page)
    assert [v["src"] for v in tags.all("video")] == ["k3_div0.mp4", "k3_div1.mp4", "k3_div2.mp4"]
    assert [i["src"] for i in tags.all("img")] == ["k7_div0.gif", "k7_div1.gif", "k7_div2.gif"]
    rows = {int(a["data-channel"]): a for a in tags.all("article")}
    assert list(rows) == [3, 7] and rows[3]["data-max-cosine"] == "0.42"
    # Channel 3: every cosine <= 0.5 and every optimum >= 80 % of the best; channel 7's second
    # optimum reaches only half of its best.
    assert rows[3]["data-distinct"] == "1" and rows[7]["data-distinct"] == "0"
    assert re.findall(r'class="objective">([^<]*)<', page) == ["10", "9", "8.5", "4", "2", "3.9"]
    assert re.findall(r'class="fraction">([^<]*)<', page) == ["100 %", "90 %", "85 %", "100 %", "50 %", "97.5 %"]
    assert re.findall(r'class="cosine">([^<]*)<', page) == ["0.42", "0.50"]
    assert "waving" in page and "weight 2" in page and "lowest optimum 50 % of the best" in page
    assert re.findall(r'class="badge (\w+)">(\w+)<', page) == [("reliable", "distinct"), ("unreliable", "alike")]
    # A kernel none of whose optima is above 0 is dead, one with a non-finite optimum failed: no shares.
    page = gallery.diversity_page("t", [gallery.DiverseView(1, [-2.0, -1.0], 0.2, ["a.gif", "b.gif"]),
                                        gallery.DiverseView(2, [1.0, math.nan], 0.2, ["c.gif", "d.gif"], failed=True)])
    assert re.findall(r'class="badge (\w+)">(\w+)<', page) == [("dead", "dead"), ("failed", "failed")]
    assert re.findall(r'class="fraction">([^<]*)<', page) == ["– %"] * 4
    assert page.count("lowest optimum – % of the best") == 2
