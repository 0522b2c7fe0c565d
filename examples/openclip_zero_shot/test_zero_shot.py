"""The OpenCLIP zero-shot example and docs/bootstrapped.md's, offline: OpenCLIP architectures built
without weights (``open_clip_torch`` comes with the ``openclip`` and ``dev`` extras)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from openclip_zero_shot.zero_shot import sparseformer_clip, zero_shot  # noqa: E402
from sparseformer import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TENCH = ROOT / "tests" / "data" / "tench.jpeg"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may download: the Hugging Face hub refuses to."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


DOC = ROOT / "docs" / "bootstrapped.md"


def docs_zero_shot() -> str:
    """docs/bootstrapped.md's zero-shot example, as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (code,) = [b for b in blocks if "encode_image" in b]
    return code


def test_the_docs_zero_shot_example_runs_as_written(capsys):
    code = docs_zero_shot()
    # only what reads weights or a photo of one's own changes: weightless towers, a real photo
    for old, new in (
        ('pretrained="openai"', "pretrained=None"),
        ("pretrained=True", "pretrained=False"),
        ('"photo.jpg"', repr(str(TENCH))),
    ):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    probs = scope["probs"]
    assert probs.shape == (1, 3) and scope["image_features"].shape == (1, 512)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    assert "tench" in capsys.readouterr().out


def test_sparseformer_is_openclips_image_tower():
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    sparseformer_clip(clip_model)
    images = torch.randn(2, 3, 224, 224)
    assert clip_model.encode_image(images).shape == (2, 512)  # CLIP-B's embedding width
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    probs = zero_shot(clip_model, tokenizer, images, ["tench", "cat", "dog"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_embedding_widths_must_agree():
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    with pytest.raises(ValueError, match="768 dimensions, the text 512"):
        sparseformer_clip(clip_model, "sparseformer_btsp_openai_clip_large")


def test_a_checkpoints_student_is_checked_by_its_own_width(tmp_path):
    """A bootstrapped student records its own embedding width, not the template's 512."""
    student = create_model("sparseformer_btsp_openai_clip_base", num_classes=16)
    path = tmp_path / "student.pt"
    torch.save({"model": student.state_dict()}, path)
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    with pytest.raises(ValueError, match="16 dimensions, the text 512"):
        sparseformer_clip(clip_model, checkpoint_path=path)


def test_the_script_runs_from_local_files_and_says_what_to_do_offline(
    tmp_path, monkeypatch, capsys
):
    import sys

    from openclip_zero_shot import zero_shot as script

    asked, create = [], open_clip.create_model_and_transforms

    def tower(clip_model, **kwargs):  # loading a tower's file: tested above; a small one here
        asked.append(kwargs)
        clip_model.visual = create_model("sparseformer_btsp_nano", num_classes=512).eval()
        return clip_model

    monkeypatch.setattr(script, "sparseformer_clip", tower)

    def text_tower(name, pretrained):  # OpenCLIP's own loading and downloads, left out here
        asked.append(pretrained)
        if pretrained == "openai":  # as OpenCLIP fails offline, without waiting for a network
            raise RuntimeError("Failed to download weights for tag 'openai': no network")
        return create(name, pretrained=None)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", text_tower)
    argv = ["zero_shot.py", str(TENCH), "tench", "cat", "--tower-weights", "tower.pt"]
    monkeypatch.setattr(sys, "argv", [*argv, "--text-weights", "text.pt"])
    script.main()
    assert "tench" in capsys.readouterr().out
    assert asked == ["text.pt", {"checkpoint_path": "tower.pt"}]
    monkeypatch.setattr(sys, "argv", argv)  # the openai tag: a download, refused offline
    with pytest.raises(SystemExit) as stop:
        script.main()
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "(offline: --text-weights FILE)" in err
    assert "Traceback" not in err
    monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed: was a traceback
    with pytest.raises(SystemExit, match=r"needs OpenCLIP: pip install 'sparseformer\[openclip\]'"):
        script.main()
