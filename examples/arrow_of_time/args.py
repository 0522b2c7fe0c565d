"""Command-line options for the arrow-of-time clip geometry and split, shared by the scripts.

Every field of :class:`~arrow_of_time.data.ArrowOfTimeSpec` except ``scale``
becomes an option (``num_frames`` -> ``--num-frames``) with the spec's default.
"""

from __future__ import annotations

import argparse
import dataclasses

from arrow_of_time.data import ArrowOfTimeSpec

_HELP = {
    "num_frames": "frames T per clip",
    "stride": "frame step inside a clip",
    "frame_size": "frames are resized to this square once",
    "size": "crop size S",
    "segment": "frames per time segment of the split",
    "test_every": "every K-th segment is held out",
    "test_step": "held-out clips start every this many frames",
    "gap": "held-out clips keep this far from their segment's ends",
    "input": "clips of frames, or of differences of consecutive frames",
    "flip": "mirror training clips at random; average each test clip with its mirror image",
    "random_stride": "training clips take a random frame step from 1 to --stride",
}
_AUGMENTATION = ("flip", "random_stride")  # only a trained model sees these


def add_spec_arguments(parser: argparse.ArgumentParser, *, augmentation: bool = True) -> None:
    """Add ``--num-frames``, ``--segment``, ... with the defaults of ``ArrowOfTimeSpec``;
    ``augmentation=False`` leaves out the options that only change training clips."""
    for field in dataclasses.fields(ArrowOfTimeSpec):
        if field.name not in _HELP or (field.name in _AUGMENTATION and not augmentation):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name == "input":
            choices = ("frames", "differences")
            parser.add_argument(flag, choices=choices, default=field.default, help=_HELP["input"])
        elif field.type in (bool, "bool"):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=_HELP[field.name],
            )
        else:
            parser.add_argument(flag, type=int, default=field.default, help=_HELP[field.name])


def spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ArrowOfTimeSpec:
    """The spec the options describe; an impossible one exits with the parser's usage error."""
    try:
        return ArrowOfTimeSpec(**{name: getattr(args, name) for name in _HELP if name in args})
    except ValueError as exc:
        parser.error(str(exc))
