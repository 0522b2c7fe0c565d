"""RoI pictures: the drawn geometry is the spec's initial grid and equals forward_with_details."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle
from PIL import Image

from sparseformer import create_model
from sparseformer.engine.atomic import TEMPORARY_PATTERN
from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.viz.figures import (
    plot_rois,
    plot_video_rois,
    roi_statistics,
    save_figure,
    save_gif,
    stage_frames,
    top_tokens,
    video_frame_images,
    visualize,
)
from sparseformer.viz.inputs import display_image, load_image, preprocess

from .conftest import DATA

TENCH = DATA / "tench.jpeg"


@pytest.fixture(scope="module")
def tiny():
    """The paper's Tiny layout (49 tokens, 36 points, 5 sampling stages), randomly initialised."""
    torch.manual_seed(0)
    return create_model("sparseformer_v1_tiny").eval()


def _rois_of(ax) -> dict[int, Rectangle]:
    return {
        int(p.get_gid().split(":")[1]): p
        for p in ax.patches
        if isinstance(p, Rectangle) and (p.get_gid() or "").startswith("roi:")
    }


def _points_of(ax) -> np.ndarray:
    (sc,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_gid() == "points"]
    return np.asarray(sc.get_offsets(), dtype=np.float64)


def _spec_grid(num_tokens: int, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The spec's initial RoIs ``(N, 4)`` and points ``(N, P, 2)``, written out independently.

    RoIs: ``r x r`` half-image boxes ``[g/2, g/2 + 1/2]``, ``g = i / (r - 1)``, token
    ``k = i * r + j`` with x from i and y from j. Points: offsets ``(a + 0.5)/s - 0.5`` on an
    ``s x s`` grid (x fastest), standardised per axis to zero mean and 3 unbiased std, times the
    RoI size, around the RoI centre.
    """
    r, s = math.isqrt(num_tokens), math.isqrt(num_points)
    rois = np.zeros((num_tokens, 4))
    for i in range(r):
        for j in range(r):
            gx, gy = i / (r - 1), j / (r - 1)
            rois[i * r + j] = [gx / 2, gy / 2, gx / 2 + 0.5, gy / 2 + 0.5]
    ticks = (np.arange(s) + 0.5) / s - 0.5
    off = np.array([[ticks[p % s], ticks[p // s]] for p in range(num_points)])  # x fastest
    off = (off - off.mean(0)) / (3 * off.std(0, ddof=1))
    centre, size = (rois[:, :2] + rois[:, 2:]) / 2, rois[:, 2:] - rois[:, :2]
    points = centre[:, None, :] + off[None] * size[:, None, :]
    return rois, points


def test_tench_pictures_show_the_spec_grid_and_match_forward_with_details(tiny):
    img = load_image(TENCH)
    shown = display_image(img)
    h, w = shown.shape[:2]
    assert (w, h) == (448, 336)  # the photo is 500 x 375; long side shown at 448
    with torch.inference_mode():
        out = tiny.forward_with_details(preprocess(img, 224))
    fig = plot_rois(shown, out)
    axes = [ax for ax in fig.axes if _rois_of(ax)]
    assert len(axes) == len(out.sampling_points) == 5
    spec_rois, spec_points = _spec_grid(49, 36)
    scale = np.array([w, h, w, h])
    for k, ax in enumerate(axes):
        (im,) = ax.get_images()
        assert tuple(im.get_extent()) == (0, w, h, 0)  # pixel edges: 0 and 1 are image edges
        assert np.array_equal(np.asarray(im.get_array()), shown)
        rects = _rois_of(ax)
        assert sorted(rects) == list(range(49))
        drawn = np.array(
            [
                [
                    *rects[n].get_xy(),
                    rects[n].get_x() + rects[n].get_width(),
                    rects[n].get_y() + rects[n].get_height(),
                ]
                for n in range(49)
            ]
        )
        np.testing.assert_allclose(drawn, spec_rois * scale, atol=1e-4)
        np.testing.assert_allclose(drawn, out.rois[k][0].numpy() * scale, atol=1e-4)
        pts = _points_of(ax)
        assert pts.shape == (49 * 36, 2)
        np.testing.assert_allclose(pts, spec_points.reshape(-1, 2) * [w, h], atol=1e-3)
        np.testing.assert_allclose(
            pts, out.sampling_points[k][0].reshape(-1, 2).numpy() * [w, h], atol=1e-3
        )
    # the convenience entry point draws the same thing from a file path
    fig2 = visualize(tiny, TENCH, stages=[1])
    (ax2,) = [ax for ax in fig2.axes if _rois_of(ax)]
    np.testing.assert_allclose(_points_of(ax2), _points_of(axes[0]), atol=1e-6)


def test_trained_looking_rois_are_drawn_where_the_model_put_them():
    """Move RoIs and points as training does; the drawing follows forward_with_details."""
    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "offset_proj") or type(m).__name__ == "RoiAdjustOp":
                proj = m.offset_proj if hasattr(m, "offset_proj") else m.proj
                proj.weight.normal_(0, 0.5)
        out = model.forward_with_details(torch.randn(2, 3, 48, 48))
    image = np.zeros((30, 60, 3), dtype=np.uint8)  # any aspect: coordinates are normalised
    fig = plot_rois(image, out, index=1, stages=[0, 1, 2, 3, -1], show_stats=False)
    axes = [ax for ax in fig.axes if _rois_of(ax)]
    expected = [out.initial_rois, out.rois[0], out.rois[1], out.rois[2], out.rois[-1]]
    assert not torch.allclose(out.rois[0], out.initial_rois)  # the RoIs did move
    for ax, rois in zip(axes, expected):
        rects = _rois_of(ax)
        r = rois[1].detach().numpy()
        lo, hi = np.minimum(r[:, :2], r[:, 2:]), np.maximum(r[:, :2], r[:, 2:])
        xy = np.array([rects[n].get_xy() for n in range(9)])
        np.testing.assert_allclose(xy, lo * [60, 30], atol=1e-4)
        wh = np.array([[rects[n].get_width(), rects[n].get_height()] for n in range(9)])
        np.testing.assert_allclose(wh, (hi - lo) * [60, 30], atol=1e-4)
    for k in range(3):
        np.testing.assert_allclose(
            _points_of(axes[k + 1]),
            out.sampling_points[k][1].reshape(-1, 2).numpy() * [60, 30],
            atol=1e-4,
        )


def test_a_strip_image_is_drawn_at_a_readable_size_with_its_rois_on_it():
    # before, a 2 x 4000 strip drew a figure 158,000 pixels tall (4.3 GB, 79 s in `viz`)
    out = _synthetic_image_output()
    strip = np.zeros((4000, 2, 3), dtype=np.uint8)
    for fig in (plot_rois(strip, out, show_stats=False), plot_rois(strip.transpose(1, 0, 2), out)):
        w, h = fig.get_size_inches()
        assert max(w, h) / min(w, h) <= 8.5, (w, h)
    frames = stage_frames(strip, out, inches=2.0, dpi=50)
    assert max(frames[0].size) <= 50 * (2.0 * 8 + 0.5)
    ax = plot_rois(strip, out, show_stats=False).axes[0]
    r = out.initial_rois[0].numpy()  # the RoIs stay in the image's own pixel coordinates
    lo = np.minimum(r[:, :2], r[:, 2:]) * [2, 4000]
    np.testing.assert_allclose([_rois_of(ax)[n].get_xy() for n in range(len(r))], lo, atol=1e-3)


def test_highlight_picks_the_largest_norm_tokens():
    out = _synthetic_image_output()
    norms = out.tokens[0].norm(dim=-1)
    best = set(norms.argsort(descending=True)[:2].tolist())
    assert set(top_tokens(out, 2)) == best
    fig = plot_rois(np.zeros((8, 8, 3)), out, highlight=2, show_stats=False)
    rects = _rois_of(fig.axes[0])
    strong = {n for n, p in rects.items() if p.get_alpha() > 0.5}
    assert strong == best


def test_stage_gif_has_one_frame_per_stage(tmp_path):
    out = _synthetic_image_output()
    frames = stage_frames(np.full((20, 40, 3), 128, np.uint8), out, inches=2.0, dpi=50)
    assert len(frames) == len(out.sampling_points) == 2
    assert len({f.size for f in frames}) == 1
    path = save_gif(frames, tmp_path / "a.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 2
    assert not list(tmp_path.glob(TEMPORARY_PATTERN))  # written atomically, nothing left over
    png = save_figure(plot_rois(np.zeros((8, 8, 3)), out), tmp_path / "a.png")
    with Image.open(png) as im:
        assert im.format == "PNG"
    # the formats a suffix names, through the atomic writer (SVG, PDF, EPS and TIFF failed
    # there: matplotlib wants a file it can seek in)
    fig = plot_rois(np.zeros((8, 8, 3)), out)
    heads = {
        "svg": b"<?xml",
        "pdf": b"%PDF",
        "eps": b"%!PS",
        "tiff": b"II*\x00",
        "jpg": b"\xff\xd8",
    }
    for suffix, head in heads.items():
        assert save_figure(fig, tmp_path / f"b.{suffix}").read_bytes().startswith(head), suffix


def test_video_rois_are_drawn_on_the_frames_they_span():
    T, N, P = 4, 3, 4
    rois = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.5, 0.5, 0.3],  # frames 1 only (centre 0.125)
            [0.2, 0.2, 0.2, 0.8, 0.9, 1.0],  # frames 2..4 (centres 0.375, 0.625, 0.875)
            [0.5, 0.1, 0.6, 0.9, 0.4, 0.7],  # frame 3 (0.625) only
        ]
    ).unsqueeze(0)  # (1, N, 6)
    points = torch.rand(1, N, P, 3)
    out = SparseFormerOutput(
        logits=torch.zeros(1, 5),
        tokens=torch.randn(1, N, 8),
        rois=[rois],
        sampling_points=[points],
        initial_rois=rois,
    )
    frames = np.zeros((T, 10, 20, 3), dtype=np.uint8)
    fig = plot_video_rois(frames, out)
    axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(axes) == T
    live = {0: {0}, 1: {1}, 2: {1, 2}, 3: {1}}
    for f, ax in enumerate(axes):
        rects = _rois_of(ax)
        assert set(rects) == live[f]
        for n, rect in rects.items():
            np.testing.assert_allclose(rect.get_xy(), rois[0, n, :2].numpy() * [20, 10], atol=1e-5)
        pts = _points_of(ax)  # (N*P, 2); points of other frames are nan (not drawn)
        in_frame = (np.floor(points[0, :, :, 2].numpy() * T) == f).reshape(-1)
        assert np.isfinite(pts[:, 0]).tolist() == in_frame.tolist()
        np.testing.assert_allclose(
            pts[in_frame],
            points[0, :, :, :2].reshape(-1, 2).numpy()[in_frame] * [20, 10],
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="plot_video_rois"):
        plot_rois(frames[0], out)
    assert roi_statistics(out)["roi/area_final"] > 0


def _synthetic_image_output() -> SparseFormerOutput:
    from sparseformer.layers import grid_rois

    rois = grid_rois(4).unsqueeze(0)  # (1, 4, 4)
    points = ((rois[..., :2] + rois[..., 2:]) / 2).unsqueeze(2).repeat(1, 1, 4, 1)
    points = points + 0.05 * torch.randn(1, 4, 4, 2)
    points = (
        points - points.mean(2, keepdim=True) + ((rois[..., :2] + rois[..., 2:]) / 2)[:, :, None]
    )
    return SparseFormerOutput(
        logits=torch.tensor([[0.0, 2.0, 1.0]]),
        tokens=torch.randn(1, 4, 8),
        rois=[rois, rois],
        sampling_points=[points, points],
        initial_rois=rois,
    )


def test_a_video_model_shows_each_replicate_on_its_frames(tmp_path):
    """Replicate i of a fresh video model covers time [i/R, (i+1)/R]: frames 2i, 2i+1 of 8."""
    model = create_model("video_sparseformer_v1_micro").eval()  # 16 tokens x 4 replicates
    with torch.no_grad():
        out = model.forward_with_details(torch.randn(1, 3, 8, 32, 32))
    frames = torch.randint(0, 255, (8, 24, 40, 3), dtype=torch.uint8)
    fig = plot_video_rois(frames, out, stage=1)
    axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(axes) == 8
    points = out.sampling_points[0][0]  # (64, 16, 3)
    for f, ax in enumerate(axes):
        replicate = f // 2
        assert sorted(_rois_of(ax)) == list(range(16 * replicate, 16 * replicate + 16))
        drawn = np.isfinite(_points_of(ax)[:, 0]).reshape(64, 16)
        in_frame = (points[..., 2] * 8).floor() == f
        assert drawn.tolist() == in_frame.tolist() and drawn.any()
    images = video_frame_images(frames, out)
    assert len(images) == 8
    with pytest.raises(ValueError, match="a video model, .*plot_video_rois"):
        visualize(model, DATA / "tench.jpeg")  # one image cannot feed a video model
    with Image.open(save_gif(images, tmp_path / "v.gif")) as gif:
        assert gif.n_frames == 8


def test_images_to_draw_on_come_in_any_layout():
    from sparseformer.viz.draw import as_image

    hwc = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    as_float = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    np.testing.assert_allclose(as_image(as_float), hwc / 255, atol=1e-6)
    assert np.array_equal(as_image(torch.from_numpy(hwc)), hwc)  # uint8 (H, W, 3) tensor
    assert np.array_equal(as_image(Image.fromarray(hwc)), hwc)
    assert as_image(hwc[..., 0]).shape == (5, 7, 3)  # grayscale array
    assert as_image(as_float[:1]).shape == (5, 7, 3)  # (1, H, W) tensor


def test_a_sample_is_picked_by_index_as_in_python():
    """An index past the batch failed deep in the statistics; -1 picked an empty batch."""
    from sparseformer.viz.draw import select_sample

    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        out = model.forward_with_details(torch.randn(2, 3, 32, 32))
    assert torch.equal(select_sample(out, -1).logits, out.logits[1:])
    with pytest.raises(IndexError, match="sample index 5 is out of range for a batch of 2"):
        plot_rois(torch.rand(3, 32, 32), out, index=5)


def test_the_statistics_fit_the_figure_with_one_stage():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        out = model.forward_with_details(torch.randn(1, 3, 32, 32))
    for stages in ([-1], [1, 2]):
        fig = plot_rois(torch.rand(3, 32, 48), out, stages=stages)
        renderer = FigureCanvasAgg(fig).get_renderer()
        (stats,) = [t for t in fig.texts if "RoIs partly outside" in t.get_text()]
        box = stats.get_window_extent(renderer)  # under the panels, not cut at the edges
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0, (stages, box)


def test_video_frames_come_in_every_usual_layout():
    from sparseformer.viz.video import _as_video

    clip = torch.rand(5, 8, 12, 3)  # (T, H, W, 3)
    for layout in (clip, clip.permute(3, 0, 1, 2), clip.permute(0, 3, 1, 2)):  # (3,T,..), (T,3,..)
        np.testing.assert_array_equal(_as_video(layout), clip.numpy())
    with pytest.raises(ValueError, match=r"expected video frames \(T, H, W, 3\) \(or a tensor"):
        _as_video(torch.rand(5, 4, 8, 12))
    three = torch.rand(3, 8, 12, 3)  # three frames: (3, T, ..) and (T, 3, ..) look alike
    np.testing.assert_array_equal(_as_video(three), three.numpy())
    with pytest.raises(ValueError, match=r"may be \(3, T, H, W\) or \(T, 3, H, W\) with T = 3"):
        _as_video(three.permute(0, 3, 1, 2))  # read as (3, T, H, W), it mixed the frames


def test_class_names_the_fonts_lack_are_said_once_per_picture_set(tmp_path, caplog, recwarn):
    """matplotlib warned once per character and drawing (the figure, each GIF frame) of a CJK
    predicted class in the titles: now one logged line, as eval's per-class picture has."""
    from sparseformer.viz.figures import write_pictures
    from sparseformer.viz.inputs import ModelInfo

    from .test_engine import _fonts_lack, glyph_lines

    model = create_model("sparseformer_v1_nano", num_classes=3).eval()
    info = ModelInfo(input_size=32, class_names=["猫", "犬", "鸟"])
    with caplog.at_level("WARNING", logger="sparseformer"):
        pictures = write_pictures(
            model, Image.new("RGB", (40, 40), "red"), tmp_path, "x", info=info
        )
    assert [p.name for p in pictures.files] == ["x_rois.png", "x_stages.gif", "x_roi_stats.json"]
    said = glyph_lines(recwarn, caplog)
    if _fonts_lack("猫犬鸟"):
        assert len(said) == 1 and "x_rois.png: the installed fonts lack 1 character" in said[0]
    else:  # a CJK font is installed
        assert said == []


def test_a_dollar_in_a_class_name_is_a_dollar_not_mathtext(tmp_path):
    """A class named like TeX ($\\frac{x^$) ended viz and eval --per-class in matplotlib's
    math parser: no picture, a multi-line error."""
    from sparseformer.engine.per_class import per_class_report, write_per_class
    from sparseformer.viz.figures import save_figure

    names = ["$\\frac{x^$", "costs $5"]
    model = create_model("sparseformer_v1_nano", num_classes=2).eval()
    with torch.inference_mode():
        out = model.forward_with_details(torch.rand(1, 3, 32, 32))
        out.logits[0] = torch.tensor([5.0, 0.0])  # the first class
    fig = plot_rois(np.zeros((32, 32, 3), np.uint8), out, class_names=names)
    save_figure(fig, tmp_path / "rois.png")
    assert fig.texts[0].get_text().startswith("prediction: $\\frac{x^$")
    _, png = write_per_class(per_class_report(torch.eye(2), names), tmp_path / "report")
    assert png.stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_model_is_drawn(dtype):
    """visualize moved the image to the model's device but not to its type: a bf16 or fp16
    model refused the float32 image."""
    model = create_model("sparseformer_v1_nano").to(dtype)
    fig = visualize(model, DATA / "tench.jpeg", img_size=32)
    assert fig.axes and fig.axes[0].patches  # the RoIs are drawn
