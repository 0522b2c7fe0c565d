"""Video data: real-clip decoding, clip sampling, consistent augmentation, bad videos, views."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparseformer.data.loader import collate
from sparseformer.data.video import (
    ClipSpec,
    VideoDataError,
    VideoFolder,
    VideoReadError,
    VideoShortReadError,
    clip_indices,
    is_video_folder,
    probe_video,
    read_test_clips,
    read_video,
    train_transform,
)
from sparseformer.engine.video import ViewAveraging, evaluate_views, view_scores

from .conftest import DATA

av = pytest.importorskip("av")
REAL_CLIP = DATA / "carphone-16f.mp4"


def write_clip(path, frames: np.ndarray, codec: str = "mpeg4") -> None:
    """Encode ``(T, H, W, 3)`` uint8 frames with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def moving_square(T: int, size: int = 32) -> np.ndarray:
    """A white 8x8 square moving 2 pixels right per frame on black."""
    frames = np.zeros((T, size, size, 3), np.uint8)
    for t in range(T):
        frames[t, 12:20, 2 * t : 2 * t + 8] = 255
    return frames


def test_decodes_a_real_h264_clip():
    assert probe_video(REAL_CLIP) == 16
    frames = read_video(REAL_CLIP)
    assert frames.shape == (16, 144, 176, 3) and frames.dtype == torch.uint8
    # real footage: frames differ, and are not flat
    assert frames.float().std() > 20
    assert (frames[15].float() - frames[0].float()).abs().mean() > 1
    picked = read_video(REAL_CLIP, [6, 2, 2])
    assert torch.equal(picked[0], frames[6]) and torch.equal(picked[1], frames[2])
    with pytest.raises(VideoReadError, match="frame 40"):
        read_video(REAL_CLIP, [0, 40])


def test_a_container_without_a_frame_count_is_probed_by_its_packets(tmp_path, monkeypatch):
    path = tmp_path / "square.mkv"  # Matroska (like WebM) stores no frame count
    write_clip(path, moving_square(11))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    from sparseformer.data import video_decode

    monkeypatch.setattr(video_decode, "_av", lambda: _NoDecoding())  # no decoding allowed
    assert probe_video(path) == 11
    monkeypatch.undo()
    assert len(read_video(path)) == 11


class _NoDecoding:
    """PyAV whose containers refuse to decode (PyAV 17's container type cannot be patched)."""

    def __getattr__(self, name):
        return getattr(av, name)

    @staticmethod
    def open(*args, **kwargs):
        return _Undecodable(av.open(*args, **kwargs))


class _Undecodable:
    def __init__(self, container):
        self._container = container

    def __getattr__(self, name):
        if name == "decode":
            raise AssertionError("the probe decoded frames")
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)


def encode_and_cut(tmp_path, codec, ext, options, cut, frames=40):
    """``frames`` frames encoded with a key frame every 10, then copied from packet ``cut``
    on, as ``ffmpeg -ss ... -c copy`` cuts a file."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV has no {codec} encoder")
    whole, part = tmp_path / f"whole.{ext}", tmp_path / f"cut.{ext}"
    with av.open(str(whole), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = options
        for a in moving_square(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(whole)) as src, av.open(str(part), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for k, packet in enumerate(src.demux(src.streams.video[0])):
            if packet.dts is not None and k >= cut:
                packet.stream = stream
                out.mux(packet)
    return part


GOP10 = {"g": "10", "keyint_min": "10", "sc_threshold": "0"}


@pytest.mark.parametrize(
    "codec, ext, options",
    [("libx264", "mkv", {**GOP10, "bf": "0"}), ("libvpx-vp9", "webm", {"g": "10"})],
)
def test_a_stream_cut_mid_gop_is_counted_and_read_from_its_first_key_frame(
    tmp_path, codec, ext, options
):
    cut = encode_and_cut(tmp_path, codec, ext, options, cut=3)
    decoded = len(read_video(cut))  # libvpx refuses the packets before the first key frame
    assert decoded == 30  # the 7 frames before it are not shown
    assert probe_video(cut) == decoded


def test_clips_come_from_the_frames_that_decode_when_fewer_than_probed(tmp_path):
    # an open GOP cut at a key frame: its first B-frames refer to frames that were cut away
    options = {**GOP10, "bf": "3", "x264-params": "open-gop=1"}
    cut = encode_and_cut(tmp_path, "libx264", "mkv", options, cut=11)
    probed, decoded = probe_video(cut), len(read_video(cut))
    assert decoded < probed  # the packets promise more frames than decode
    spec = ClipSpec(num_frames=4, stride=2, size=16, num_clips=3, crop_pct=1.0)
    assert len(read_test_clips(cut, spec)) == 12  # the last clip ends at the last decoded frame
    with pytest.raises(VideoShortReadError) as short:  # none of the asked frames decode
        read_video(cut, [probed - 1])
    assert short.value.decoded == decoded
    for label in ("a", "b"):
        (tmp_path / "v" / label).mkdir(parents=True)
        (tmp_path / "v" / label / cut.name).write_bytes(cut.read_bytes())
    val = VideoFolder(tmp_path / "v", spec, train=False)
    views, _ = val[0]
    assert views.shape == (3, 3, 4, 16, 16) and val.failed_loads == 0


def test_a_decoding_error_mid_stream_ends_the_video_there(tmp_path, caplog):
    # an MJPEG AVI cut inside a frame: its header promises 30 frames, and FFmpeg raises on
    # the cut packet instead of ending the stream; the frames before are the video's frames
    if "mjpeg" not in av.codecs_available:
        pytest.skip("this PyAV has no mjpeg encoder")
    whole = tmp_path / "whole.avi"
    with av.open(str(whole), "w") as out:
        stream = out.add_stream("mjpeg", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuvj420p"
        noise = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
        for a in noise:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(whole)) as src:
        packets = [(p.pos, p.size) for p in src.demux(video=0) if p.size]
    pos, size = packets[15]
    cut = tmp_path / "a" / "half.avi"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: pos + size // 2])  # frame 15 cut in the middle
    assert probe_video(cut) == 30
    with caplog.at_level("WARNING"):
        decoded = len(read_video(cut))
    assert decoded == 15 and "decoding failed after frame 14" in caplog.text
    with pytest.raises(VideoShortReadError, match="decoding failed after frame") as short:
        read_video(cut, [0, 29])
    assert short.value.decoded == decoded
    spec = ClipSpec(num_frames=4, stride=1, size=16, num_clips=2, crop_pct=1.0)
    caplog.clear()
    said = "15 of the 30 frames its header promises decode"  # was used without a word
    with caplog.at_level("WARNING", logger="sparseformer"):
        assert len(read_test_clips(cut, spec)) == 8  # clips within the frames that decode
    assert said in caplog.text
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "half.avi").write_bytes(cut.read_bytes())
    for train in (True, False):
        folder = VideoFolder(tmp_path, spec, train=train)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sparseformer"):
            for _ in range(2):  # each file said once
                for i in range(len(folder)):
                    clip, _ = folder[i]
                    assert clip is not None
        assert folder.failed_loads == 0
        # each file said once at most; evaluation's clips reach past frame 14, so both are
        # (training's random clips may stay within the frames that decode)
        count = caplog.text.count(said)
        assert count == 2 if not train else count <= 2, caplog.text


def _decode_in_child(queue) -> None:
    queue.put(tuple(read_video(REAL_CLIP, [3]).shape))


def test_a_worker_forked_after_the_main_process_decoded_still_decodes():
    """PyAV 19 keeps one RGB converter per thread, with its own scaling threads: one made in the
    main process, inherited by a forked data-loading worker, left the worker waiting forever."""
    import multiprocessing

    read_video(REAL_CLIP, [0])  # the main process converts a frame first, as eval's probe may
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("decoding in a forked process hung")
    assert child.exitcode == 0 and queue.get(timeout=5) == (1, 144, 176, 3)


def _collect_and_decode_in_child(queue) -> None:
    import gc

    gc.collect()  # what a worker's allocations set off at any moment
    _decode_in_child(queue)


def test_a_decoder_the_main_process_left_unreachable_does_not_hang_a_forked_worker():
    """A decoder in a reference cycle (an exception's traceback holds one), inherited by a
    forked data-loading worker and freed by its garbage collector, waited for decoding threads
    that only the main process has: the worker hung before its first line."""
    import gc
    import multiprocessing

    was_enabled = gc.isenabled()
    gc.disable()  # the cycle stays uncollected until the fork, as it may between collections
    try:
        container = av.open(str(REAL_CLIP))
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "AUTO", 4
        frames = [f for _, f in zip(range(5), container.decode(stream))]
        cycle = [container, stream, frames]
        cycle.append(cycle)
        del container, stream, frames, cycle
        read_video(REAL_CLIP, [0])  # PyAV in use in the main process
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_collect_and_decode_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
    finally:
        if was_enabled:
            gc.enable()
    if child.is_alive():
        child.kill()
        pytest.fail("a forked worker hung freeing the main process's decoder")
    assert child.exitcode == 0 and queue.get(timeout=5) == (1, 144, 176, 3)


def test_forks_from_several_threads_at_once_leave_the_collector_on(monkeypatch):
    """The collector is held across each fork; two threads forking at once made the second
    note it off, and neither turned it back on (and two registrations did the same)."""
    import gc

    from sparseformer.data import video_decode

    hooks = []
    monkeypatch.setattr(video_decode.os, "register_at_fork", lambda **kw: hooks.append(kw))
    collector = video_decode._CollectorAcrossFork()
    collector.register()
    collector.register()
    assert len(hooks) == 1  # once, however often PyAV is first used
    assert gc.isenabled()
    try:
        hooks[0]["before"]()  # two threads fork at once
        hooks[0]["before"]()
        hooks[0]["after_in_parent"]()
        assert not gc.isenabled()  # the other fork is still under way
        hooks[0]["after_in_parent"]()
        assert gc.isenabled()
    finally:
        gc.enable()


def test_a_system_without_fork_hooks_decodes_all_the_same(monkeypatch):
    """Windows has no os.register_at_fork (and no fork): nothing to hold across one."""
    from sparseformer.data import video_decode

    monkeypatch.delattr(video_decode.os, "register_at_fork")
    collector = video_decode._CollectorAcrossFork()
    collector.register()  # was an AttributeError on every video path
    assert not collector._registered


def test_decoding_threads_are_shared_out_in_loader_workers(monkeypatch):
    from sparseformer.data import video_decode as video

    assert video._decoder_threads() == 0  # the main process: FFmpeg's own choice
    worker = type("WorkerInfo", (), {"num_workers": 4})()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    monkeypatch.setattr(video.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert video._decoder_threads() == 2  # 16 cores / (2 processes x 4 workers)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert video._decoder_threads() == 1


def test_a_video_limit_is_applied_before_the_probe(tmp_path, monkeypatch, caplog):
    from sparseformer.data import video

    make_folder(tmp_path)  # train/left: 0, 1, empty, notes, short, truncated; right: 0, 1
    probed = []
    monkeypatch.setattr(video, "probe_video", lambda p: probed.append(p) or probe_video(p))
    spec = ClipSpec(num_frames=4, stride=2, size=16)
    train = VideoFolder(tmp_path / "train", spec, train=True, limit=4)
    assert len(probed) == 4  # 0, empty, short and right/0 of the 8
    assert [label for _, label, _ in train.samples] == [0, 1] and len(train.skipped) == 2
    # a limit that leaves a class without chosen videos is no error, but is said (it was
    # silent, where the image folder named the classes)
    with caplog.at_level("WARNING", logger="sparseformer"):
        assert len(VideoFolder(tmp_path / "train", spec, train=True, limit=1)) == 1
    assert "the limit of 1 file leaves 1 class without any (right)" in caplog.text
    (tmp_path / "train" / "jump").mkdir()  # a class without a single video file still is
    with pytest.raises(VideoDataError, match=r"jump'\] have no usable video"):
        VideoFolder(tmp_path / "train", spec, train=True, limit=4)


def test_decoded_frames_follow_the_motion(tmp_path):
    path = tmp_path / "square.mp4"
    write_clip(path, moving_square(8))
    frames = read_video(path).float().mean(-1)  # (T, H, W)
    column_mass = frames[:, 12:20].mean(1)  # (T, W)
    centre = (column_mass * torch.arange(32)).sum(-1) / column_mass.sum(-1)
    torch.testing.assert_close(centre, 3.5 + 2 * torch.arange(8.0), atol=0.5, rtol=0)


def test_a_thumbnail_stream_before_the_footage_is_passed_over(tmp_path):
    """A one-frame picture stored as the first video stream (cover art, a thumbnail): the
    frames and their count are the footage's."""
    path = tmp_path / "with-thumbnail.mkv"
    with av.open(str(path), "w") as out:
        thumb = out.add_stream("mjpeg", rate=1)
        thumb.width, thumb.height, thumb.pix_fmt = 64, 48, "yuvj420p"
        video = out.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        cover = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")
        for packet in [*thumb.encode(cover.reformat(format="yuvj420p")), *thumb.encode()]:
            out.mux(packet)
        for a in moving_square(12):
            for packet in video.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        out.mux(list(video.encode()))
    assert probe_video(path) == 12
    frames = read_video(path)
    assert frames.shape == (12, 32, 32, 3)
    assert frames[0, :8].float().mean() < 40  # the black background, not the grey cover


@pytest.mark.parametrize("sampling", ["dense", "uniform"])
def test_clip_indices(sampling):
    spec = ClipSpec(num_frames=4, sampling=sampling, stride=3, num_clips=3)
    rng = random.Random(0)
    for _ in range(20):
        idx = clip_indices(30, spec, train=True, rng=rng)
        assert len(idx) == 4 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < 30
        if sampling == "dense":
            assert np.diff(idx).tolist() == [3, 3, 3]
    tests = [clip_indices(30, spec, train=False, clip=c, rng=rng) for c in range(3)]
    assert tests[0][0] < tests[1][0] < tests[2][0]  # evenly spread test clips
    assert tests == [clip_indices(30, spec, train=False, clip=c, rng=rng) for c in range(3)]
    with pytest.raises(VideoDataError, match="shorter"):
        clip_indices(spec.min_frames - 1, spec, train=True, rng=rng)


def test_train_augmentation_is_the_same_for_every_frame():
    frame = torch.randint(0, 255, (1, 40, 56, 3), dtype=torch.uint8)
    clip = train_transform(frame.expand(6, -1, -1, -1), ClipSpec(size=24), random.Random(3))
    assert clip.shape == (3, 6, 24, 24)
    for t in range(1, 6):
        torch.testing.assert_close(clip[:, t], clip[:, 0])
    # and it is random across clips
    other = train_transform(frame.expand(6, -1, -1, -1), ClipSpec(size=24), random.Random(4))
    assert not torch.allclose(other, clip)


def make_folder(root, bad: bool = True):
    for split in ("train", "val"):
        for label, shift in (("left", -1), ("right", 1)):
            d = root / split / label
            d.mkdir(parents=True)
            for k in range(2):
                frames = moving_square(10)
                write_clip(d / f"{k}.mp4", frames if shift > 0 else frames[::-1].copy())
    if bad:
        d = root / "train" / "left"
        (d / "empty.mp4").write_bytes(b"")
        (d / "notes.mp4").write_text("not a video at all\n")
        good = (d / "0.mp4").read_bytes()
        (d / "truncated.mp4").write_bytes(good[: len(good) // 3])
        write_clip(d / "short.mp4", moving_square(3))
        (d / "readme.txt").write_text("ignored: not a video extension")


def test_video_folder_is_recognised_by_its_first_media_file(tmp_path):
    make_folder(tmp_path / "v", bad=False)
    (tmp_path / "v" / "train" / "left" / "0_labels.csv").write_text("stray file sorting first")
    assert is_video_folder(tmp_path / "v")
    nested = tmp_path / "n" / "train" / "jump" / "day1"
    nested.mkdir(parents=True)
    write_clip(nested / "a.mp4", moving_square(4))
    assert is_video_folder(tmp_path / "n")
    images = tmp_path / "i" / "train" / "cat"
    images.mkdir(parents=True)
    (images / "0.txt").write_text("notes")
    (images / "0000.MOV").write_bytes(b"xx")  # a stray clip sorting first: still images
    for k in range(1, 4):
        Image.new("RGB", (8, 8)).save(images / f"{k}.png")
    assert not is_video_folder(tmp_path / "i")


def test_class_folders_follow_symlinked_sub_folders_and_leave_out_hidden_files(tmp_path):
    from sparseformer.data.media import expand_media_paths as _expand

    make_folder(tmp_path / "v", bad=False)
    store = tmp_path / "store"
    store.mkdir()
    for k in range(2):
        write_clip(store / f"more{k}.mp4", moving_square(10))
    left = tmp_path / "v" / "train" / "left"
    (left / "linked").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(left, target_is_directory=True)  # a link back up: no loop
    (left / "._0.mp4").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    (left / ".cache").mkdir()
    write_clip(left / ".cache" / "hidden.mp4", moving_square(10))
    folder = VideoFolder(
        tmp_path / "v" / "train", ClipSpec(num_frames=4, stride=2, size=16), train=True
    )
    names = sorted(Path(p).name for p, label, _ in folder.samples if label == 0)
    assert names == ["0.mp4", "1.mp4", "more0.mp4", "more1.mp4"] and not folder.skipped
    assert sorted(p.name for p in _expand([left], video=True)) == names


def test_val_videos_may_hold_some_of_the_training_classes(tmp_path, caplog):
    make_folder(tmp_path, bad=False)
    spec = ClipSpec(num_frames=4, stride=2, size=16)
    for p in (tmp_path / "val" / "left").iterdir():
        p.unlink()  # an empty class folder in val: that class is not scored
    with caplog.at_level("WARNING"):
        val = VideoFolder(tmp_path / "val", spec, train=False, classes=["left", "right"])
    assert val.classes == ["left", "right"] and {y for _, y, _ in val.samples} == {1}
    assert "class folder(s) left have no usable video" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # evaluation alone, the folder's classes: the same
        val = VideoFolder(tmp_path / "val", spec, train=False)
    assert val.classes == ["left", "right"] and {y for _, y, _ in val.samples} == {1}
    assert "class folder(s) left have no usable video" in caplog.text
    (tmp_path / "val" / "left").rmdir()
    assert len(VideoFolder(tmp_path / "val", spec, train=False, classes=["left", "right"])) == 2
    with pytest.raises(VideoDataError, match=r"include 'right', which are not among"):
        VideoFolder(tmp_path / "val", spec, train=False, classes=["left", "up"])


def test_a_class_without_usable_videos_is_a_clear_error(tmp_path):
    make_folder(tmp_path, bad=False)
    (tmp_path / "train" / "jump").mkdir()
    write_clip(tmp_path / "train" / "jump" / "short.mp4", moving_square(2))
    spec = ClipSpec(num_frames=4, stride=2, size=16)
    with pytest.raises(VideoDataError, match=r"class folder\(s\) .*jump.* have no usable video"):
        VideoFolder(tmp_path / "train", spec, train=True)


def test_video_folder_skips_and_counts_bad_videos(tmp_path, caplog):
    make_folder(tmp_path)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "train" / "left" / "still.mp4", "PNG")
    spec = ClipSpec(num_frames=4, stride=2, size=16, crop_pct=1.0)
    with caplog.at_level("WARNING"):
        train = VideoFolder(tmp_path / "train", spec, train=True)
    assert train.classes == ["left", "right"] and len(train) == 4
    skipped = {p.rsplit("/", 1)[-1]: reason for p, reason in train.skipped}
    assert set(skipped) == {"empty.mp4", "notes.mp4", "truncated.mp4", "short.mp4", "still.mp4"}
    assert skipped["still.mp4"] == "a still PNG image under a video's name, not a video"
    assert "too short: 3 frame(s), a clip needs 7" in skipped["short.mp4"]
    assert skipped["empty.mp4"] == "an empty file (0 bytes)"
    assert skipped["notes.mp4"].startswith("not readable as video (Invalid data")
    assert not any("Errno" in r or "notes.mp4" in r for r in skipped.values())
    clip, label = train[0]
    assert clip.shape == (3, 4, 16, 16) and label == 0 and torch.isfinite(clip).all()


def test_a_video_that_breaks_after_the_scan_is_replaced_and_counted(tmp_path):
    make_folder(tmp_path, bad=False)
    train = VideoFolder(tmp_path / "train", ClipSpec(num_frames=4, stride=2, size=16), train=True)
    train.samples[0][0].write_bytes(b"gone")
    clip, label = train[0]
    assert train.failed_loads == 1 and clip.shape == (3, 4, 16, 16)
    assert label == train.samples[1][1]


def test_a_val_class_none_of_whose_videos_decode_is_said(tmp_path, caplog):
    make_folder(tmp_path, bad=False)
    val = VideoFolder(tmp_path / "val", ClipSpec(num_frames=4, stride=2, size=16), train=False)
    first = val.samples[0][1]
    broken = [p for p, label, _ in val.samples if label == first]
    for path in broken:
        path.write_bytes(b"gone")
    with caplog.at_level(logging.ERROR):
        for i in range(len(val)):
            val[i]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 1 and f"of class {val.classes[first]!r}" in said[0]
    assert "it is not scored" in said[0]


def test_a_val_video_that_breaks_after_the_scan_is_left_out_not_replaced(tmp_path):
    # evaluation must not score the next video (of another class) in a broken one's place
    make_folder(tmp_path, bad=False)
    val = VideoFolder(tmp_path / "val", ClipSpec(num_frames=4, stride=2, size=16), train=False)
    val.samples[0][0].write_bytes(b"gone")
    clip, label = val[0]
    assert clip is None and label == val.samples[0][1] and val.failed_loads == 1
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=collate)
    clips, labels = next(iter(loader))
    assert clips.shape == (3, 3, 4, 16, 16)
    assert labels.tolist() == [label for _, label, _ in val.samples[1:]]


def test_a_header_that_claims_more_frames_than_decode_is_named(tmp_path):
    path = tmp_path / "faststart.mp4"  # header first: it survives a cut that loses frames
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
        for a in noise:  # frames that do not compress away: the data is mostly frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    frames_start = data.index(b"mdat")
    path.write_bytes(data[: frames_start + (len(data) - frames_start) // 2])
    assert probe_video(path) == 12
    with pytest.raises(VideoReadError, match=r"only \d+ frame\(s\) decode, frame 11 requested"):
        read_video(path, [0, 11])


def test_video_folder_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(VideoDataError, match="does not exist"):
        VideoFolder(tmp_path / "nope", ClipSpec(), train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDataError, match="no class folders"):
        VideoFolder(tmp_path / "empty", ClipSpec(), train=True)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.mp4").write_text("junk")
    with pytest.raises(VideoDataError, match="no usable videos .*1 skipped, first: .*x.mp4: "):
        VideoFolder(tmp_path / "bad", ClipSpec(), train=True)
    write_clip(tmp_path / "bad" / "a" / "y.mp4", moving_square(10))  # usable, after x.mp4
    with pytest.raises(VideoDataError, match="the limit chose these before they were checked"):
        VideoFolder(tmp_path / "bad", ClipSpec(), train=True, limit=1)  # x.mp4 alone
    (tmp_path / "bad" / "a" / "y.mp4").unlink()
    write_clip(tmp_path / "bad" / "a" / "short.mp4", moving_square(3))
    with pytest.raises(VideoDataError, match="lower --frames or --frame-stride"):
        VideoFolder(tmp_path / "bad", ClipSpec(num_frames=4, stride=2), train=True)
    with pytest.raises(VideoDataError, match=r"clips of 4 frames: lower --frames\)"):
        VideoFolder(tmp_path / "bad", ClipSpec(num_frames=4, sampling="uniform"), train=True)


def test_multi_view_testing_averages_scores(tmp_path):
    make_folder(tmp_path, bad=False)
    spec = ClipSpec(num_frames=4, stride=2, size=16, num_clips=2, num_crops=3)
    val = VideoFolder(tmp_path / "val", spec, train=False, classes=["left", "right"])
    views, label = val[0]
    assert views.shape == (6, 3, 4, 16, 16)

    class Direction(torch.nn.Module):
        """Scores 'right' by where the bright mass moves from the first to the last frame."""

        def forward(self, x):
            mass = x.mean(dim=(1, 3))  # (B, 3, T, H, W) -> (B, T, W)
            pos = (mass.softmax(-1) * torch.arange(x.shape[-1])).sum(-1)  # (B, T)
            shift = pos[:, -1] - pos[:, 0]
            return torch.stack([-shift, shift], dim=-1)

    probs = view_scores(Direction(), views.unsqueeze(0))
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    assert evaluate_views(Direction(), loader)["acc1"] == 100.0
    # the wrapper the CLI uses: log of the averaged scores, so softmax gives them back
    wrapped = ViewAveraging(Direction())(views.unsqueeze(0))
    torch.testing.assert_close(wrapped.softmax(-1), probs)
    # one view per video: plain clips, as the training loop's validation expects
    single = VideoFolder(tmp_path / "val", ClipSpec(num_frames=4, stride=2, size=16), train=False)
    assert single[0][0].shape == (3, 4, 16, 16)
