"""Zero-shot classification with a CLIP-bootstrapped SparseFormer as OpenCLIP's image tower.

Bootstrapping SparseFormers from Vision Foundation Models (Gao et al., CVPR 2024): the
``sparseformer_btsp_openai_clip_*`` models map an image to the CLIP embedding (512-d for base,
768-d for large), so they replace ``model.visual`` of the OpenCLIP model of the same teacher
and ``encode_image`` / ``encode_text`` work as before.

    pip install "sparseformer" open_clip_torch
    python examples/openclip_zero_shot/zero_shot.py photo.jpg cat dog tench
    python examples/openclip_zero_shot/zero_shot.py photo.jpg cat dog \
        --text-weights vit_b16_openai.bin --tower-weights sparseformer_btsp_clip_b.pth  # offline

Weights are downloaded only when asked: by default the authors' tower (``pretrained=True``)
and OpenCLIP's ``openai`` ViT-B-16 for the text tower; local files replace both.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor, nn

from sparseformer import create_model
from sparseformer.weights.registry import MODELS

__all__ = ["sparseformer_clip", "zero_shot"]

TEMPLATE = "a photo of a {}."


def sparseformer_clip(
    clip_model: nn.Module, name: str = "sparseformer_btsp_openai_clip_base", **kwargs
) -> nn.Module:
    """Put a CLIP-bootstrapped SparseFormer in ``clip_model.visual`` (in place) and return
    ``clip_model``. ``kwargs`` go to :func:`sparseformer.create_model` (``pretrained=True``,
    ``checkpoint_path=...``)."""
    width = clip_model.text_projection.shape[-1]  # OpenCLIP's embedding width
    if "checkpoint_path" not in kwargs:  # the named model's width, known before building it
        _check_width(name, MODELS[name].config.num_classes, width)
    visual = create_model(name, **kwargs)
    _check_width(name, visual.num_classes, width)  # a checkpoint's student: its own width
    like = next(clip_model.parameters())
    clip_model.visual = visual.to(device=like.device, dtype=like.dtype).eval()
    return clip_model


def _check_width(name: str, embedding: int, width: int) -> None:
    if embedding != width:
        raise ValueError(f"{name} embeds into {embedding} dimensions, the text {width}")


@torch.no_grad()
def zero_shot(clip_model: nn.Module, tokenizer, images: Tensor, class_names: list[str]) -> Tensor:
    """Class probabilities ``(B, classes)`` of normalised ``images`` ``(B, 3, 224, 224)``."""
    text = tokenizer([TEMPLATE.format(c) for c in class_names])
    text_features = clip_model.encode_text(text, normalize=True)  # (classes, E)
    image_features = clip_model.encode_image(images, normalize=True)  # (B, E)
    logits = clip_model.logit_scale.exp() * image_features @ text_features.T
    return logits.softmax(dim=-1)


def main() -> None:
    try:
        import open_clip
    except ImportError:
        sys.exit("error: this example needs OpenCLIP: pip install 'sparseformer[openclip]'")
    from timm.data import create_transform, resolve_data_config

    from sparseformer.data import open_rgb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("classes", nargs="+")
    parser.add_argument("--text-weights", default="openai",
                        help="OpenCLIP ViT-B-16 weights: a pretrained tag or a file")  # fmt: skip
    parser.add_argument("--tower-weights", help="the tower's file (default: the authors')")
    args = parser.parse_args()
    try:  # offline, a download fails: one line saying which flag takes a local file
        clip_model, _, _ = open_clip.create_model_and_transforms(
            "ViT-B-16", pretrained=args.text_weights
        )
    except RuntimeError as exc:
        parser.exit(1, f"error: the text tower's weights: {str(exc).splitlines()[0]} "
                    "(offline: --text-weights FILE)\n")  # fmt: skip
    tower = {"checkpoint_path": args.tower_weights} if args.tower_weights else {"pretrained": True}
    try:
        sparseformer_clip(clip_model, **tower)
    except (RuntimeError, ValueError) as exc:  # a failed download, a file of another tower
        parser.exit(1, f"error: the image tower: {str(exc).splitlines()[0]} (here: "
                    "--tower-weights FILE)\n")  # fmt: skip
    transform = create_transform(**resolve_data_config({}, model=clip_model.visual))
    image = transform(open_rgb(args.image)).unsqueeze(0)  # as train and predict read images
    probs = zero_shot(clip_model.eval(), open_clip.get_tokenizer("ViT-B-16"), image, args.classes)
    for name, p in sorted(zip(args.classes, probs[0].tolist()), key=lambda t: -t[1]):
        print(f"{p:6.1%}  {name}")


if __name__ == "__main__":
    main()
