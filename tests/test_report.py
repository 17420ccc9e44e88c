"""The report page: fits its width, videos have controls, plots have units and show the
exponent offsets, metrics read as words."""

from __future__ import annotations

import html.parser
import re

import numpy as np

from wanquant.evaluation.report import clip_table_figure, error_map_figure, metric_label, write_report

MANIFEST = {"experts": {
    "transformer": {"role": "high", "layers": {
        "blocks.0.attn1.to_qkv": {"clip_table": [[0.55, 1.0], [0.8, 0.0], [1.0, -1.0]]},
        "blocks.0.ffn.net.2": {"clip_table": [[1.0, 0.0], [0.9, 1.0], [0.7, 0.0]]}}},
    "transformer_2": {"role": "low", "layers": {
        "blocks.0.attn1.to_qkv": {"clip_table": [[0.6, 0.0], [0.6, 1.0], [0.6, 1.0]]}}},
}}


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _page(tmp_path) -> tuple[str, list]:
    sample = {"name": "eval0", "prompt": "a red circle moves right",
              "metrics": {"psnr_w4a4_vs_baseline_db": 31.2, "traj_err_w4a4_px": 2.5, "new_score_db": 1.0},
              "videos": {"W4A4": "eval0_w4a4.mp4"}, "images": {"error map": "eval0_error.png"},
              "strips": {"frames (W4A4)": "eval0_w4a4.png"}}
    page = write_report(tmp_path, "t", {"k": 1.0}, [sample], ["clip_tables.png"]).read_text()
    parser = _Tags()
    parser.feed(page)
    return page, parser.tags


def test_videos_have_controls_and_nothing_has_a_fixed_size(tmp_path):
    page, tags = _page(tmp_path)
    videos = [a for t, a in tags if t == "video"]
    assert videos and all("controls" in a for a in videos)
    media = [a for t, a in tags if t in ("video", "img")]
    assert media and not [a for a in media if "width" in a or "height" in a]  # sized by CSS, to the column
    css = re.search(r"<style>(.*?)</style>", page, re.DOTALL).group(1)
    assert re.search(r"video,img\{[^}]*max-width:100%[^}]*height:auto", css)
    assert "figure.strip img{width:100%}" in css
    assert any(t == "figure" and a.get("class") == "strip" for t, a in tags)


def test_metric_lines_read_as_words(tmp_path):
    page, _ = _page(tmp_path)
    assert "PSNR W4A4 vs baseline (dB): 31.2" in page
    assert "trajectory error, W4A4 (px): 2.5" in page
    assert "new score (dB): 1" in page
    assert "psnr_w4a4_vs_baseline_db" not in page.split("</style>")[1]
    assert metric_label("gt_psnr_w4a4_db") == "PSNR vs ground truth, W4A4 (dB)"


def test_error_map_colour_bar_is_in_8_bit_levels():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full((2, 8, 8, 3), 10, np.uint8)
    fig = error_map_figure(a, b)
    bar = fig.axes[-1]
    assert "8-bit levels" in bar.get_ylabel()
    assert fig.axes[0].images[0].get_array().max() == 10  # the map is in those levels


def test_clip_plot_shows_ratios_and_exponent_offsets():
    fig = clip_table_figure(MANIFEST)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["transformer (high): clip ratio", "transformer (high): exponent offset",
                      "transformer_2 (low): clip ratio", "transformer_2 (low): exponent offset"]
    offsets = fig.axes[1].images[0].get_array()
    np.testing.assert_array_equal(offsets, [[1, 0, -1], [0, 1, 0]])
    bars = [ax.get_ylabel() for ax in fig.axes if not ax.get_title()]
    assert any("scale x 2^offset" in b for b in bars) and any("x group absmax" in b for b in bars)
