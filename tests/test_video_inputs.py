"""Videos as users bring them: phone rotation, a resolution change midway, other containers,
clips too long for the footage, models built with other token replicates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.data.video import VIDEO_EXTENSIONS, VideoDataError, VideoFolder, read_video

from .test_video_data import make_folder, moving_square, write_clip

av = pytest.importorskip("av")
MODEL = "video_sparseformer_v1_micro"


def test_a_rotated_phone_video_is_read_upright(tmp_path):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix")
    stored = np.zeros((6, 48, 64, 3), np.uint8)
    stored[:, :, :16] = 255  # landscape as stored, white band on the left
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(-90)  # a phone held upright: shown turned clockwise
        for a in stored:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames = read_video(path)
    assert frames.shape == (6, 64, 48, 3)  # portrait, as a player shows it
    rows = frames[0, :, :, 0].float().mean(dim=1)  # the band turned clockwise: now on top
    assert rows[:12].min() > 200 and rows[20:].max() < 50


def test_a_video_that_changes_resolution_midway_is_read_at_its_first_size(tmp_path):
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    write_clip(first, moving_square(6, size=32), codec="mpeg2video")
    write_clip(second, np.full((6, 48, 48, 3), 255, np.uint8), codec="mpeg2video")
    joined = tmp_path / "joined.ts"  # MPEG-TS files join by concatenation, as recorders do
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    frames = read_video(joined)
    assert frames.shape[1:] == (32, 32, 3) and len(frames) >= 10  # a frame may go at the join
    assert frames[-1].float().mean() > 200  # the second part, scaled, not dropped


def test_common_camera_and_broadcast_containers_are_scanned(tmp_path):
    assert {".ts", ".mts", ".3gp", ".flv", ".wmv", ".ogv"} <= set(VIDEO_EXTENSIONS)
    make_folder(tmp_path / "v", bad=False)
    extra = tmp_path / "v" / "val" / "left" / "camera.ts"
    write_clip(extra, moving_square(10)[::-1].copy(), codec="mpeg2video")
    folder = VideoFolder(tmp_path / "v" / "val", _spec(4, 2), train=False)
    assert extra in [p for p, _, _ in folder.samples]


def _spec(frames, stride):
    from sparseformer.data.video import ClipSpec

    return ClipSpec(num_frames=frames, stride=stride, size=16)


def test_too_short_footage_says_which_flags_to_lower(tmp_path):
    make_folder(tmp_path / "v", bad=False)  # 10-frame videos
    with pytest.raises(VideoDataError, match="lower --frames or --frame-stride"):
        VideoFolder(tmp_path / "v" / "train", _spec(8, 4), train=True)


def test_predict_takes_clip_flags_and_refuses_them_for_image_models(tmp_path, capsys):
    make_folder(tmp_path / "v", bad=False)
    video = tmp_path / "v" / "val" / "left" / "0.mp4"  # 10 frames
    torch.save(create_model(MODEL, num_classes=2).state_dict(), tmp_path / "m.pth")
    argv = ["predict", "--model", MODEL, "--checkpoint", str(tmp_path / "m.pth"), str(video),
            "--json"]  # fmt: skip
    assert main(argv) == 1  # the model's 8 frames, 4 apart, need 29 frames: nothing to score
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert "a clip needs at least 29" in error and "lower --frames" in error
    assert main([*argv, "--frames", "4", "--frame-stride", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "predictions" in result, result
    image_argv = ["predict", "--model", "sparseformer_v1_nano", "--checkpoint",
                  str(tmp_path / "m.pth"), str(video), "--frames", "4"]  # fmt: skip
    assert main(image_argv) == 1
    assert "--frames applies to videos only; sparseformer_v1_nano takes images" in (
        capsys.readouterr().err
    )


def test_a_model_built_with_other_replicates_loads_by_name(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=2, replicates=2).eval()
    torch.save(model.state_dict(), tmp_path / "r2.pth")
    again = create_model(MODEL, checkpoint_path=tmp_path / "r2.pth").eval()
    assert again.config.replicates == 2
    clip = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(model(clip), again(clip))
    make_folder(tmp_path / "v", bad=False)
    code = main(["eval", "--model", MODEL, "--checkpoint", str(tmp_path / "r2.pth"),
                 "--data-dir", str(tmp_path / "v"), "--frames", "4", "--frame-stride", "2",
                 "--img-size", "32", "--json", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4
    video = tmp_path / "v" / "val" / "left" / "0.mp4"
    code = main(["viz", "--model", MODEL, "--checkpoint", str(tmp_path / "r2.pth"),
                 "--out", str(tmp_path / "pictures"), "--img-size", "32", "--no-gif",
                 "--frames", "4", "--frame-stride", "2", str(video)])  # fmt: skip
    assert code == 0, capsys.readouterr().err


class _Frame:
    """What read_video uses of a PyAV frame: size and display rotation."""

    def __init__(self, width, height, rotation):
        self.width, self.height, self.rotation = width, height, rotation


class _Reformatter:
    """What read_video uses of PyAV's VideoReformatter: RGB at a size, here with a band on the
    stored frame's left."""

    def reformat(self, frame, width, height, format):  # noqa: A002 - PyAV's name
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[:, : width // 4] = 255
        return SimpleNamespace(to_ndarray=lambda: rgb)


def test_rotation_or_size_changing_midway_keeps_every_frame_at_the_first_shown_size(monkeypatch):
    from sparseformer.data import video_decode
    from sparseformer.data.video_decode import _quarter_turns, _upright_rgb

    monkeypatch.setattr(video_decode, "_reformatter", _Reformatter)

    first = _Frame(64, 48, -90)  # a phone's portrait frame: shown 48 wide, 64 tall
    turns = _quarter_turns(first)
    shown = (first.height, first.width) if turns % 2 else (first.width, first.height)
    for frame in (first, _Frame(48, 64, 0), _Frame(96, 72, -90), _Frame(30, 20, 180)):
        assert _upright_rgb(frame, shown).shape == (64, 48, 3)
    upright = _upright_rgb(first, shown)
    assert upright[:16, :, 0].min() == 255 and upright[20:, :, 0].max() == 0  # band on top


def test_too_few_frames_for_the_token_replicates_warn(caplog):
    from sparseformer.weights.build import build_model

    with caplog.at_level("WARNING"):
        model = build_model(MODEL, 2, num_frames=2)  # 4 replicates: 2 time slices read padding
    assert model.config.num_frames == 2 and "2 frames for 4 token replicates" in caplog.text
    assert "(--frames on the command line)" in caplog.text  # not replicates, which it lacks
