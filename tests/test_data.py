"""Data: image modes made RGB, checked ImageFolder errors, unreadable files, Fashion-MNIST."""

from __future__ import annotations

import logging
import re
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sparseformer.data import (
    Augmentation,
    CheckedImageFolder,
    DataError,
    DataSource,
    Preprocessing,
    build_datasets,
    build_transform,
    to_rgb,
)
from sparseformer.data.images import check_image_header, open_rgb


def test_every_image_mode_becomes_8bit_rgb():
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8))
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    # 16-bit: rescaled by the bit depth, not clipped at 255
    wide = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert wide.mode.startswith("I;16")
    assert to_rgb(wide).getpixel((0, 0)) == (128, 128, 128)
    # alpha composited onto white: a fully transparent pixel is white
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (10, 20, 30)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 3)
    assert to_rgb(palette).mode == "RGB"
    la = Image.new("LA", (8, 8), (50, 255))
    assert to_rgb(la).getpixel((0, 0)) == (50, 50, 50)


def test_a_decoders_runtime_error_is_a_read_error(tmp_path, monkeypatch):
    """PIL's AVIF decoder raises RuntimeError on corrupt files, which escaped every reader."""
    _write(tmp_path / "a.png")

    def fails(self):
        raise RuntimeError("Failed to decode frame 0: Decoding of color planes failed")

    from PIL import ImageFile, PngImagePlugin

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", fails)
    assert "RuntimeError: Failed to decode" in check_image_header(tmp_path / "a.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", fails)
    with pytest.raises(OSError, match="a.png: Failed to decode frame 0"):
        open_rgb(tmp_path / "a.png")


def _write(path, mode="RGB", size=(20, 16), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        ramp = (np.arange(size[0] * size[1]) * 100).astype(np.uint16)
        img = Image.fromarray(ramp.reshape(size[1], size[0]))  # 16-bit grayscale
    else:
        img = Image.new(mode, size, {"L": 90, "CMYK": (10, 20, 30, 0)}.get(mode, (40, 80, 120)))
        if mode == "RGBA":
            img = Image.new("RGBA", size, (40, 80, 120, 128))
    img.save(path, format=fmt)
    return path


def make_folder(root, classes=("cat", "dog"), per_class=3, splits=("train", "val")):
    """An ImageFolder tree of small images in assorted modes."""
    modes = [("RGB", ".jpg", "JPEG"), ("L", ".png", "PNG"), ("RGBA", ".png", "PNG"),
             ("CMYK", ".jpg", "JPEG"), ("I;16", ".png", "PNG")]  # fmt: skip
    for split in splits:
        for c in classes:
            for i in range(per_class):
                mode, ext, fmt = modes[i % len(modes)]
                _write(root / split / c / f"{i}{ext}", mode, fmt=fmt)
    return root


def test_mixed_modes_load_as_uint8_rgb_batches(tmp_path):
    root = make_folder(tmp_path / "d", per_class=5)
    pre = Preprocessing(img_size=24)
    bundle = build_datasets(DataSource(data_dir=root), pre, Augmentation())
    assert bundle.class_names == ["cat", "dog"]
    for ds in (bundle.train, bundle.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert tuple(x.shape) == (3, 24, 24) and str(x.dtype) == "torch.uint8"


def test_limits_on_a_folder_keep_every_class(tmp_path):
    # a folder lists its images class by class: the first 3 would all be cats
    root = make_folder(tmp_path / "d", classes=("cat", "dog", "emu"), per_class=4)
    source = DataSource(data_dir=root, limit_train=3, limit_val=6)
    bundle = build_datasets(source, Preprocessing(img_size=16), None)
    assert sorted(bundle.train[i][1] for i in range(3)) == [0, 1, 2]
    assert sorted(bundle.val[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]


def test_a_limit_is_applied_before_the_check(tmp_path, monkeypatch):
    import sparseformer.data.folder as folder

    # a quick run on a huge folder must not pay for checking every file of it
    root = make_folder(tmp_path / "d", classes=("cat", "dog", "emu"), per_class=20)
    (root / "train" / "emu" / "zz_broken.jpg").write_text("not chosen by a limit of 3")
    checked = []
    monkeypatch.setattr(
        folder, "check_image_header", lambda p: checked.append(p) or check_image_header(p)
    )
    ds = CheckedImageFolder(root / "train", limit=3)
    assert len(checked) == 3 and len(ds) == 3 and ds.targets == [0, 1, 2]
    assert ds.skipped == []
    # a limit that takes a broken file: one fewer, and a class left without files is no error
    ds = CheckedImageFolder(root / "train", limit=61)
    assert len(ds) == 60 and len(ds.skipped) == 1
    assert CheckedImageFolder(root / "train", limit=2).targets == [0, 1]


def test_a_large_folder_is_held_without_a_python_object_per_image(tmp_path):
    import pickle

    # what a DataLoader worker copies as it touches the list (PyTorch issue #13246)
    root = tmp_path / "train"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(500):
            (root / f"c{c}" / f"{k:04d}.png").write_bytes(b"")
    ds = CheckedImageFolder(root, check_files=False)
    assert len(ds) == 2000 and ds.samples[501] == (str(root / "c1" / "0001.png"), 1)
    assert ds.targets[1999] == 3
    containers = [o for o in vars(ds).values() if isinstance(o, (list, tuple, dict, set))]
    assert max(map(len, containers), default=0) < 10  # paths and labels live in NumPy buffers
    copy = pickle.loads(pickle.dumps(ds))  # as a spawned worker receives it
    assert copy.samples == ds.samples
    before = ds.samples
    ds.samples = ds.samples[498:503]  # a subset, the torchvision way
    ds.targets = [1, 1, 0, 0, 0]
    assert len(ds) == 5 and ds.targets == [1, 1, 0, 0, 0] and ds.samples[-1][0].endswith("0002.png")
    assert len(before) == 2000 and before[1999][1] == 3  # a view keeps reading its own table
    assert pickle.loads(pickle.dumps(ds.samples)) == list(ds.samples)  # pickles as a list
    with pytest.raises(ValueError, match="2 targets for 5 samples"):
        ds.targets = [0, 1]


def test_val_may_hold_some_of_the_training_classes(tmp_path, caplog):
    root = make_folder(tmp_path / "d", classes=("ant", "bee", "cat"), splits=("train",))
    make_folder(root, classes=("bee",), splits=("val",))
    (root / "val" / "cat").mkdir(parents=True)  # an empty class folder: not scored either
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataSource(data_dir=root), Preprocessing(img_size=16), None)
    assert bundle.class_names == ["ant", "bee", "cat"] and bundle.num_classes == 3
    assert {label for _, label in bundle.val.samples} == {1}  # bee keeps its training label
    assert "no folder for 1 training class(es) (ant)" in caplog.text
    assert "class folder(s) cat hold no images" in caplog.text
    make_folder(root, classes=("ant",), splits=("val",))
    for p in (root / "val" / "ant").iterdir():
        p.write_bytes(b"not an image")  # every file unreadable: not scored either
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataSource(data_dir=root), Preprocessing(img_size=16), None)
    assert {label for _, label in bundle.val.samples} == {1}
    assert "class folder(s) ant have no readable images; those classes are not scored" in (
        caplog.text
    )
    # evaluation alone (no training folder to follow) keeps them too, where it refused them:
    # the folder's classes, empty ones included, are the labels a checkpoint's outputs match
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(
            DataSource(data_dir=root), Preprocessing(img_size=16), None, need_train=False
        )
    assert bundle.class_names == ["ant", "bee", "cat"] and bundle.train is None
    assert {label for _, label in bundle.val.samples} == {1}
    assert "class folder(s) cat hold no images" in caplog.text
    assert "class folder(s) ant have no readable images" in caplog.text
    with pytest.raises(DataError, match=r"cat' have no images .*add images or remove"):
        CheckedImageFolder(root / "val")  # a training folder: a class it could not learn


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("empty", "is empty; it needs train/CLASS"),
        ("no_val", "has no val/ folder; .* move a share of each class's"),
        (
            "validation",
            r"has no val/ folder; .* to validate on validation/, link it as val/: "
            r"ln -s validation .*data/val",
        ),
        (
            "validation_in_eval",  # eval's train/ is a split too, not a class folder
            r"has no val/ folder; expected DIR/train/CLASS/\*.jpg .* to validate on validation/",
        ),
        ("only_validation_in_eval", r"has no val/ folder; .* link it as val/: ln -s validation"),
        ("flat", r"has no train/ or val/ .*its folders \('cat', 'dog'\) go under train/ and val/"),
        ("flat_in_eval", r"has no val/ .*its folders \('cat', 'dog'\) go under train/ and val/"),
        ("split_folder", "is a split folder; give the folder that holds train/ and val/"),
        ("no_classes", "has no class folders"),
        ("empty_class", "have no images"),
        ("class_mismatch", r"include 'emu', which are not among the training classes"),
        (
            "case_only",
            r"include 'Cat', 'dog '.*\('Cat' for 'cat', 'dog ' for 'dog': names are "
            r"matched exactly, letter case and spaces included",
        ),
        ("is_file", "is a file, not a directory"),
    ],
)
def test_bad_data_dirs_say_what_to_do(tmp_path, case, expected):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "no_val":
        make_folder(root, splits=("train",))
    elif case in ("validation", "validation_in_eval"):  # the held-out split under another name
        make_folder(root, splits=("train", "validation"))
    elif case == "only_validation_in_eval":
        make_folder(root, splits=("validation",))
    elif case in ("flat", "flat_in_eval"):  # class folders with no split above them
        make_folder(root, splits=("train",))
        for name in ("cat", "dog"):
            (root / "train" / name).rename(root / name)
        (root / "train").rmdir()
    elif case == "split_folder":
        make_folder(root.parent / "whole")
        root = root.parent / "whole" / "train"
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif case == "empty_class":
        make_folder(root)
        (root / "train" / "bird").mkdir()
        (root / "train" / "bird" / "notes.txt").write_text("no images here")
    elif case == "class_mismatch":
        make_folder(root)
        make_folder(root, classes=("emu",), splits=("val",))
    elif case == "case_only":  # two spellings a reader takes for one
        make_folder(root, splits=("train",))
        make_folder(root, classes=("Cat", "dog "), splits=("val",))
    elif case == "is_file":
        root.write_text("x")
    need_train = not case.endswith("_in_eval")
    with pytest.raises(DataError, match=expected) as info:
        build_datasets(DataSource(data_dir=root), Preprocessing(img_size=16), None, need_train)
    assert "\n" not in str(info.value)
    if case == "empty_class":
        assert "bird" in str(info.value)


def test_image_folders_list_files_as_torchvision_does_without_hidden_or_looped_ones(tmp_path):
    from torchvision.datasets.folder import make_dataset

    root = make_folder(tmp_path / "d", per_class=3, splits=("train",))
    cat = root / "train" / "cat"
    for sub in ("b", "b-x", "b/c", "a"):  # name orders where "/" and "-" compete
        _write(cat / sub / "1.jpg", "RGB", fmt="JPEG")
    before = CheckedImageFolder(root / "train", None)
    expected = make_dataset(str(root / "train"), before.class_to_idx, extensions=(".jpg", ".png"))
    assert [tuple(s) for s in before.samples] == [tuple(s) for s in expected]
    _write(cat / ".thumbnails" / "t.png", "RGB", fmt="PNG")  # a hidden folder: not a class image
    # a zip made on macOS: a __MACOSX folder of resource forks, beside the classes and in them
    _write(root / "train" / "__MACOSX" / "cat" / "._1.jpg", "RGB", fmt="JPEG")
    _write(cat / "__MACOSX" / "x.jpg", "RGB", fmt="JPEG")
    (cat / "up").symlink_to(root / "train", target_is_directory=True)  # a link back up
    (root / "train" / "dog" / "more").symlink_to(cat / "a", target_is_directory=True)
    after = CheckedImageFolder(root / "train", None)
    paths = [p for p, _ in after.samples]
    assert len(paths) == len(expected) + 1 and paths[-1].endswith("dog/more/1.jpg")
    assert not any(".thumbnails" in p or "/up/" in p or "__MACOSX" in p for p in paths)
    assert after.classes == before.classes == ["cat", "dog"]


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    (root / "train" / "cat" / "junk.jpg").write_text("this is not a picture")
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    good = (root / "train" / "dog" / "0.jpg").read_bytes()
    (root / "train" / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "train" / "dog" / "big.jpg", quality=95)
    data = (root / "train" / "dog" / "big.jpg").read_bytes()
    (root / "train" / "dog" / "tail_cut.jpg").write_bytes(data[: int(len(data) * 0.8)])
    with caplog.at_level(logging.WARNING):
        ds = CheckedImageFolder(root / "train", build_transform(Preprocessing(img_size=16), None))
        # a whole pass never crashes: files the header check let through but that fail to
        # decode are replaced by the next image, and counted
        for i in range(len(ds)):
            x, label = ds[i]
            assert tuple(x.shape) == (3, 16, 16)
    assert {p.rsplit("/", 1)[1] for p, _ in ds.skipped} >= {"junk.jpg", "empty.png"}
    assert len(ds.skipped) + ds.failed_loads == 4  # junk, empty, cut, tail_cut
    assert f"skipped {len(ds.skipped)} unreadable file(s)" in caplog.text
    if ds.failed_loads:
        assert "could not decode" in caplog.text


def _mark(once, key, out):
    out.put(once.first(key))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_file_that_fails_to_decode_is_named_once_over_epochs_and_workers(
    tmp_path, caplog, method
):
    import multiprocessing

    from sparseformer.data.loader import SharedOnce

    root = make_folder(tmp_path / "d")
    good = (root / "train" / "dog" / "0.jpg").read_bytes()
    (root / "train" / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])
    pre = build_transform(Preprocessing(img_size=16), None)
    ds = CheckedImageFolder(root / "train", pre, check_files=False)  # found when loaded
    cut = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("cut.jpg")]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two epochs: counted twice, named once
            for i in cut:
                ds[i]
    assert len(cut) == 1 and ds.failed_loads == 2 and caplog.text.count("could not decode") == 1
    once, out = SharedOnce(), multiprocessing.get_context(method).Queue()
    worker = multiprocessing.get_context(method).Process(target=_mark, args=(once, "a", out))
    worker.start()
    worker.join()
    assert out.get() is True and once.first("a") is False  # a worker's mark is seen here
    assert once.first("b") is True and once.first("b") is False


def test_fashion_mnist_missing_and_offline_says_how_to_install(tmp_path, monkeypatch):
    import sparseformer.data.fashion_mnist as fm

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(fm, "FashionMNIST", Offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fm.fashion_mnist(True, root=tmp_path / "cache", system_dir=tmp_path / "none")


def test_unknown_dataset_and_both_sources_are_refused(tmp_path):
    with pytest.raises(DataError, match="built-in: fashion-mnist"):
        DataSource(dataset="cifar-7")
    with pytest.raises(DataError, match="exactly one of --data-dir"):
        DataSource(data_dir=tmp_path, dataset="fashion-mnist")


def test_randaugment_strongest_posterize_does_not_stop_training():
    # rand-m9-mstd0.5-inc1 (the ImageNet recipe) reaches magnitude 10 in about 2% of draws:
    # PosterizeIncreasing then keeps 0 bits, which Pillow 13 refuses with a ValueError
    import timm.data.auto_augment as aa

    from sparseformer.data.transforms import build_transform

    build_transform(Preprocessing(img_size=16), Augmentation(auto_augment="rand-m9-mstd0.5-inc1"))
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    for name in ("PosterizeIncreasing", "Posterize"):
        strongest = aa.AugmentOp(name, prob=1.0, magnitude=10 if "Inc" in name else 0)
        assert strongest(image).getpixel((0, 0)) == (0, 0, 0)  # every bit dropped
    assert aa.AugmentOp("PosterizeOriginal", prob=1.0, magnitude=10)(image) is image


def test_the_data_order_follows_the_seed_with_repeated_augmentation_too():
    from sparseformer.data.loader import build_train_loader

    data = list(range(64))

    def order(seed: int, rank: int, epoch: int, repeats: int) -> list[int]:
        loader = build_train_loader(data, 4, 0, seed, rank, 2, repeated_aug=repeats)
        loader.sampler.set_epoch(epoch)
        return [index for index, _ in loader.sampler]  # (index, augmentation seed) pairs

    for repeats in (0, 3):  # DistributedSampler, and timm's RepeatAugSampler (8+ GPU recipe)
        assert order(0, 0, 1, repeats) == order(0, 0, 1, repeats)  # resumable
        assert order(0, 0, 1, repeats) != order(1, 0, 1, repeats)  # --seed matters
        assert order(0, 0, 1, repeats) != order(0, 0, 2, repeats)  # a new order each epoch


class _RandomDraws(torch.utils.data.Dataset):
    """Each sample: its index and one draw of Python's, NumPy's and torch's generators."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        import random

        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()])


def test_samples_are_seeded_per_sample_and_leave_every_other_generator_alone():
    import random

    from sparseformer.data.loader import build_train_loader, start_epoch

    def batches(batch_size: int) -> torch.Tensor:
        loader = build_train_loader(_RandomDraws(), batch_size, 0, 3, pin_memory=False)
        start_epoch(loader, 1)
        return torch.cat([x for x in loader])

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(()), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with mock.patch.object(torch.cuda, "manual_seed_all") as seed_cuda:
        by_8, by_4 = batches(8), batches(4)
    # the caller's generators continue as if no sample had been loaded
    assert (torch.rand(()), random.random(), np.random.rand()) == expected
    # a sample's draws depend on its seed, not on the batch it came in
    assert torch.equal(by_8, by_4) and len(set(by_8[:, 1].tolist())) == 64
    # the CPU generator only: seeding accelerators (torch.manual_seed) costs ~1 ms a sample
    seed_cuda.assert_not_called()


def test_a_run_saved_before_the_seeded_sampler_resumes_in_its_own_order():
    from timm.data.distributed_sampler import RepeatAugSampler

    from sparseformer.data.loader import build_train_loader
    from sparseformer.engine.trainer import DATA_ORDER, keep_saved_data_order

    data = list(range(64))
    old = RepeatAugSampler(data, num_replicas=2, rank=1, num_repeats=3)
    for state, follows_seed in (({}, False), ({"data_order": DATA_ORDER}, True)):
        loader = build_train_loader(data, 4, 0, 7, 1, 2, repeated_aug=3)
        keep_saved_data_order(loader.sampler, state)
        loader.sampler.set_epoch(2)
        old.set_epoch(2)
        assert ([i for i, _ in loader.sampler] != list(old)) == follows_seed


def test_files_of_other_extensions_are_said_not_silently_dropped(tmp_path, caplog):
    root = make_folder(tmp_path / "d", per_class=2)
    _write(root / "train" / "cat" / "saved_by_a_browser.jfif", fmt="JPEG")  # read: a JPEG
    _write(root / "train" / "dog" / "photo.tga", fmt="TGA")  # Pillow reads it, not listed
    (root / "train" / "dog" / "labels.txt").write_text("dog\n")
    for system_file in ("Thumbs.db", "desktop.ini"):  # Windows's own, in every folder: not said
        (root / "train" / "cat" / system_file).write_bytes(b"\0")
    pre = Preprocessing(img_size=24)
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataSource(data_dir=root), pre, Augmentation())
    assert any(path.endswith(".jfif") for path, _ in bundle.train.samples)
    assert len(bundle.train.samples) == 5
    assert "2 file(s) left out as not image files" in caplog.text
    assert ".tga 1" in caplog.text and ".txt 1" in caplog.text


@pytest.mark.parametrize("shape", [(7, 2001), (3000, 31), (1, 4000)])
def test_a_thin_strip_is_cropped_before_the_eval_resize(shape):
    """A strip thousands of pixels long is resized to at most 8 x 256 along it, not
    thousands x 256, and the centre crop is what timm's transform gives (but for rounding)."""
    from timm.data import create_transform

    from sparseformer.data.transforms import LimitAspect

    h, w = shape
    x = np.linspace(0, 4 * np.pi, w)[None, :, None] + np.linspace(0, 2, h)[:, None, None]
    img = Image.fromarray((127 + 120 * np.sin(x) * np.ones((1, 1, 3))).astype(np.uint8))
    assert max(LimitAspect()(img).size) <= 8 * min(shape) + 1
    assert any(
        isinstance(t, LimitAspect) for t in build_transform(Preprocessing(), None).transforms
    )
    pre = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")
    timm_eval = create_transform(224, is_training=False, crop_pct=0.875,
                                 interpolation="bicubic", use_prefetcher=True)  # fmt: skip
    ours = torch.as_tensor(np.asarray(build_transform(pre, None)(img))).int()
    theirs = torch.as_tensor(np.asarray(timm_eval(img))).int()
    assert ours.shape == (3, 224, 224) and (ours - theirs).abs().max() <= 3


def test_a_quoted_pattern_expands_and_double_star_reaches_any_depth(tmp_path):
    from sparseformer.data.media import expand_patterns

    for name in ("a.png", "x/b.png", "x/y/c.png", "x/y/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_patterns([tmp_path / "**" / "*.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "x/b.png", "x/y/c.png"]
    assert expand_patterns([tmp_path / "x" / "*.png"]) == [tmp_path / "x" / "b.png"]
    with pytest.raises(DataError, match="matches no file"):
        expand_patterns([tmp_path / "*.jpg"])


def test_a_dangling_class_folder_link_is_said_not_lost_unsaid(tmp_path, caplog):
    """A class on a drive not mounted was left out without a word; a dangling link to a file
    (notes.txt) is no class, and neither stops the run."""
    root = make_folder(tmp_path / "data")
    (root / "train" / "emu").symlink_to("/gone/emu", target_is_directory=True)
    (root / "train" / "notes.txt").symlink_to("/gone/notes.txt")
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataSource(data_dir=root), Preprocessing(img_size=16), None)
    assert "emu" not in bundle.class_names
    assert re.search(r"'emu', 'notes.txt' in .*train are a symbolic link to nothing", caplog.text)


def test_a_quoted_pattern_of_files_and_folders_takes_both_as_a_shell_does(tmp_path):
    """``'train/*'`` over a loose file and class folders (no shell expands it on Windows): the
    file and every folder's images, where the folders were dropped."""
    from sparseformer.data.media import expand_media_paths

    for name in ("train/loose.png", "train/cat/a.png", "train/dog/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_media_paths([tmp_path / "train" / "*"], video=False)
    assert [p.relative_to(tmp_path / "train").as_posix() for p in found] == [
        "cat/a.png", "dog/b.png", "loose.png"]  # fmt: skip
    with pytest.raises(DataError, match="matches no file or folder"):
        expand_media_paths([tmp_path / "*.jpg"], video=False)
    (tmp_path / "train" / "empty").mkdir()  # a matched folder without images: passed over
    assert expand_media_paths([tmp_path / "train" / "*"], video=False) == found
    for name in ("runs/a/val/cat/c.png", "runs/b/val/dog/d.png"):  # ** then more parts
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    deep = expand_media_paths([tmp_path / "runs" / "**" / "val" / "*"], video=False)
    assert [p.name for p in deep] == ["c.png", "d.png"]
    everything = expand_media_paths([tmp_path / "runs" / "**" / ""], video=False)
    assert [p.name for p in everything] == ["c.png", "d.png"]  # each file once


def test_an_image_over_pils_pixel_limit_is_skipped_with_what_to_do(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from sparseformer.data.images import check_image_header

    PILImage.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels: over twice the limit
    why = check_image_header(tmp_path / "big.png")
    assert why.startswith("larger than PIL's limit") and "MAX_IMAGE_PIXELS" in why


def test_corrupt_exif_data_is_not_printed_by_pil_and_other_warnings_show_once(tmp_path):
    import subprocess
    import sys

    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription
    path = tmp_path / "cut_exif.jpg"
    Image.new("RGB", (20, 10), "red").save(path, exif=exif.tobytes()[:-3])  # its text cut off
    code = (
        "import warnings\n"
        "from sparseformer.data.images import check_image_header, open_rgb\n"
        f"assert check_image_header({str(path)!r}) is None\n"
        "for _ in range(3):\n"
        f"    assert open_rgb({str(path)!r}).size == (20, 10)\n"  # the pixels are fine
        "    warnings.warn('a warning of the caller', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "TiffImagePlugin" not in done.stderr  # PIL's line, which names no file
    # shown once, as Python shows it (3.13 also prints the source line of code given by -c)
    assert done.stderr.count("UserWarning: a warning of the caller") == 1


def test_files_left_above_the_class_folders_are_said(tmp_path, caplog):
    # before, images directly in train/ or val/ were dropped without a word
    root = make_folder(tmp_path / "data")
    for name in ("loose_0.jpg", "loose_1.jpg"):
        _write(root / "train" / name, "RGB", fmt="JPEG")
    _write(root / "val" / "stray.png", "RGB", fmt="PNG")
    (root / "train" / "labels.csv").write_text("file,label\n")  # not an image: not counted
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(DataSource(data_dir=root), Preprocessing(img_size=16), None)
    assert len(bundle.train) == 6 and len(bundle.val) == 6  # left out, as before
    assert f"2 files directly in {root / 'train'} are in no class folder and left out" in (
        caplog.text
    )
    assert f"1 file directly in {root / 'val'} is in no class folder" in caplog.text


def test_a_limit_below_one_file_per_class_names_the_classes_it_leaves_out(tmp_path, caplog):
    root = make_folder(tmp_path / "data", classes=("ant", "bee", "cat"))
    with caplog.at_level(logging.WARNING):
        build_datasets(DataSource(data_dir=root, limit_train=2), Preprocessing(img_size=16), None)
    assert "the limit of 2 files leaves 1 class without any (cat)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one each: nothing to say
        build_datasets(DataSource(data_dir=root, limit_train=3), Preprocessing(img_size=16), None)
    assert "the limit of" not in caplog.text


def test_images_over_pils_bomb_guard_are_said_in_our_words(tmp_path, monkeypatch, caplog):
    # before: PIL's raw DecompressionBombWarning on stderr per file, and a skip with no advice
    import subprocess
    import sys
    import warnings

    from sparseformer.data import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(images, "_large_said", [])
    _write(tmp_path / "large.png", "RGB", fmt="PNG", size=(40, 40))  # over 1000, under 2000
    _write(tmp_path / "huge.png", "RGB", fmt="PNG", size=(50, 50))  # over twice: refused
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # pytest shows all
        assert check_image_header(tmp_path / "large.png") is None
        assert open_rgb(tmp_path / "large.png").size == (40, 40)
        open_rgb(tmp_path / "large.png")
    code = (  # as a user's process shows warnings (pytest shows every one)
        "from PIL import Image\n"
        "from sparseformer.data.images import open_rgb\n"
        "Image.MAX_IMAGE_PIXELS = 1000\n"
        f"open_rgb({str(tmp_path / 'large.png')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "DecompressionBombWarning" not in done.stderr, done.stderr
    assert "over PIL's 1000-pixel guard" in done.stderr  # the logged line instead
    strict = "import warnings\nfrom PIL import Image\n" + (  # the process's own rule first
        "warnings.simplefilter('error', Image.DecompressionBombWarning)\n" + code
    )
    done = subprocess.run([sys.executable, "-c", strict], capture_output=True, text=True)
    assert done.returncode == 1 and "DecompressionBombWarning" in done.stderr
    assert caplog.text.count("over PIL's 1000-pixel guard against decompression bombs") == 1
    said = check_image_header(tmp_path / "huge.png")  # the limit PIL refuses at: 2 x 1000
    assert "(2,000 pixels, twice PIL.Image.MAX_IMAGE_PIXELS)" in said
    assert "downsize it, or raise PIL.Image.MAX_IMAGE_PIXELS" in said
    with pytest.raises(Image.DecompressionBombError, match="downsize it, or raise PIL.Image"):
        open_rgb(tmp_path / "huge.png")


def test_a_class_none_of_whose_files_decode_is_said(tmp_path, caplog):
    # before, each file's failure was a warning and the class trained on its neighbours'
    # images in silence (helper: every file cut after the header)
    root = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=2, splits=("train",))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for path in (root / "train" / "dog").iterdir():
        path.unlink()
    for i in range(2):
        Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
        data = (tmp_path / "whole.jpg").read_bytes()
        (root / "train" / "dog" / f"{i}.jpg").write_bytes(data[: int(len(data) * 0.7)])
    pre = build_transform(Preprocessing(img_size=16), None)
    ds = CheckedImageFolder(root / "train", pre)
    assert len(ds) == 4  # the header check passes them
    with caplog.at_level(logging.ERROR):
        for _ in range(2):  # two epochs: said once
            for i in range(len(ds)):
                ds[i]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 1 and "none of the 2 files of class 'dog'" in said[0]
    assert "its training samples are other classes' files" in said[0]


def test_class_folders_spelled_alike_are_named(tmp_path, caplog):
    """'café' copied from macOS (NFD) beside 'café' typed elsewhere (NFC), or 'Cat' beside
    'cat', trained as two classes in silence."""
    import unicodedata

    from sparseformer.data.scan import class_folders

    for name in ("caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9"), "Cat", "cat", "dog"):
        (tmp_path / name).mkdir()
    with caplog.at_level("WARNING", logger="sparseformer"):
        assert len(class_folders(tmp_path, "images")) == 5
    said = [r.getMessage() for r in caplog.records if "differ only" in r.getMessage()]
    assert len(said) == 1 and "'cafe\\u0301'" in said[0] and "'Cat'" in said[0]
    assert "'dog'" not in said[0]


class _WorkerState(torch.utils.data.Dataset):
    """Each sample: the loading process's id, whether it ignores SIGINT and SIGTERM, and
    whether either is still held back (blocked)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import os
        import signal

        ignored = all(
            signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)
        )
        held = {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor([os.getpid(), int(ignored), len(held)])


def test_workers_start_with_stop_signals_held_then_ignore_them_and_outlive_an_epoch(
    monkeypatch,
):
    """A spawned worker imports torch for seconds before its first line: a Ctrl-C to the
    process group then killed it (the run ended as if a worker had run out of memory). Its
    start now holds the two signals back, its init ignores them, and the workers live
    through the run (spawn started them again every epoch and every validation)."""
    import signal

    from torch.utils.data import DataLoader

    from sparseformer.data.loader import build_eval_loader, build_train_loader, start_epoch

    masks = []
    real_iter = DataLoader.__iter__

    def noting(self):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real_iter(self)

    monkeypatch.setattr(DataLoader, "__iter__", noting)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    train = build_train_loader(_WorkerState(), 2, 1, seed=0, pin_memory=False)
    pids = []
    for epoch in range(2):
        start_epoch(train, epoch)
        rows = torch.cat(list(train))
        pids.append(set(rows[:, 0].tolist()))
        assert rows[:, 1].all() and not rows[:, 2].any()  # ignored, and no longer held
    assert pids[0] == pids[1]  # the same worker both epochs
    rows = torch.cat(list(build_eval_loader(_WorkerState(), 2, 1, pin_memory=False)))
    assert rows[:, 1].all() and not rows[:, 2].any()
    assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in masks)  # while starting
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # and given back


@pytest.mark.parametrize("workers", [0, 1])
def test_validation_leaves_the_processs_generator_alone(workers):
    """Training draws stochastic depth from the process's generator. A validation loader that
    drew its workers' seed from it too moved training by one draw per iterator: per pass with
    no workers, once a process with persistent ones, so that a resumed run (a new process)
    left the trajectory of the run it continued, and the number of workers changed it."""
    from sparseformer.data.loader import build_eval_loader

    loader = build_eval_loader(_WorkerState(), 2, workers, pin_memory=False)
    state = torch.get_rng_state()
    for _ in range(2):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_spawned_worker_logs_as_the_main_process(monkeypatch):
    """Spawned workers (macOS, Windows) do not inherit the CLI's logging set-up: their
    warnings came out bare, without time, level or logger."""
    import logging

    from sparseformer.data.loader import _WorkerStart

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler()])
    root.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s", "%H"))
    start = _WorkerStart()  # made in the main process, called in the worker
    monkeypatch.setattr(root, "handlers", [])  # a spawned worker: nothing set up
    monkeypatch.setattr("signal.signal", lambda *a: None)  # not this test process's handlers
    start(0)
    assert root.handlers and root.handlers[0].formatter._fmt.startswith("%(levelname)s")
    assert root.handlers[0].formatter.datefmt == "%H"


def test_an_empty_image_file_is_said_to_be_empty(tmp_path):
    """A 0-byte file read as PIL's 'cannot identify image file'; video files already said
    'an empty file (0 bytes)'."""
    from PIL import UnidentifiedImageError

    from sparseformer.data.images import check_image_header, open_rgb

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image")
    assert check_image_header(tmp_path / "empty.png") == "an empty file (0 bytes)"
    said = f"{tmp_path / 'empty.png'}: an empty file (0 bytes)"  # the file named, as PIL's
    with pytest.raises(UnidentifiedImageError, match=f"^{re.escape(said)}$"):
        open_rgb(tmp_path / "empty.png")
    assert check_image_header(tmp_path / "text.png").startswith("UnidentifiedImageError: ")


def test_standard_input_and_dangling_links_are_named_as_such(tmp_path):
    """'-' and a link that loops read as "does not exist", as a typo would."""
    from pathlib import Path

    from sparseformer.data.media import expand_media_paths

    with pytest.raises(DataError, match="not from standard input"):
        expand_media_paths([Path("-")], video=False)
    (tmp_path / "self").symlink_to(tmp_path / "self")
    with pytest.raises(DataError, match=r"a symbolic link to nothing \(broken, or a loop\)"):
        expand_media_paths([tmp_path / "self"], video=False)
    with pytest.raises(DataError, match="does not exist"):
        expand_media_paths([tmp_path / "typo.png"], video=False)
