"""``sparseformer models``: list the registered models, with the tags of their released weights
(``NAME.TAG`` picks one, in every command and in ``create_model``; the first is the default)."""

from __future__ import annotations

import argparse
import glob
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models", description=__doc__)
    p.add_argument(
        "pattern",
        nargs="?",
        default="*",
        help="shell-style filter, a part of the name, or a name with its weights' tag "
        "(sparseformer_v1_tiny.in1k) (default: all)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseformer.weights.factory import get_model_spec, list_models, tag_problem
    from sparseformer.weights.registry import MODELS, image_model_of, split_tag

    pattern = args.pattern
    base, tag = split_tag(pattern)
    tagged = tag is not None and glob.has_magic(pattern)  # 'NAME.*', '*.in1k': name.tag
    if base in MODELS and tag is not None and not tagged:  # a name with its weights' tag
        if tag_problem(pattern) is not None:
            print(tag_problem(pattern), file=sys.stderr)
            return 1
        pattern = base
    elif pattern not in MODELS and not glob.has_magic(pattern):
        pattern = f"*{pattern}*"  # a word: the names that hold it ("micro")
    names = list_models(pattern, pretrained=tagged)  # tagged: name.tag, as timm lists them
    if not names:
        released = " with released weights" if tagged else ""
        print(
            f"no registered model{released} matches {args.pattern!r} (try `sparseformer models`)",
            file=sys.stderr,
        )
        return 1
    width = max(len(name) for name in names)
    for name in names:
        spec = get_model_spec(split_tag(name)[0])
        weights = f"weights: {', '.join(spec.tags)}" if spec.weights else "no released weights"
        image = image_model_of(name)
        if not spec.weights and image is not None and MODELS[image].weights:  # inflated
            weights = f"no video release; pretrained=True inflates {image}'s"
        print(f"{name:<{width}}  {spec.description} [{weights}]")
    return 0
