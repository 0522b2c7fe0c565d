"""``sparseformer convert IN OUT``: an official checkpoint to this library's safetensors format.

A ``sparseformer train`` checkpoint converts too; what it says about itself (model name,
class names, preprocessing, clip settings) travels in the safetensors metadata, and
:func:`sparseformer.weights.checkpoint.read_checkpoint` reads it back. An existing OUT is
replaced only with ``--overwrite``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a SparseFormer checkpoint (official or a run's) to safetensors",
        description=__doc__ + " Accepts the ImageNet release and the authors' library v2 "
        "formats, bare or wrapped in model/state_dict/model_ema. With --model the result is "
        "also checked by loading it strictly into that model.",
    )
    p.add_argument("input", help="a SparseFormer checkpoint: official, or a run's .pt")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", default=None, help="verify by loading into this model")
    p.add_argument("--ema", action="store_true", help="take model_ema when present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from sparseformer.cli import CliError, check_output
    from sparseformer.engine.atomic import WriteError, is_stream, staged
    from sparseformer.weights.build import naming_their_model
    from sparseformer.weights.checkpoint import check_model, read_checkpoint
    from sparseformer.weights.factory import create_model
    from sparseformer.weights.loading import (
        load_checkpoint,
        require_sparseformer_layout,
        warn_about_weights,
    )

    given = Path(args.output)
    out = _output(given, Path(args.input), args.overwrite)
    check_output(out, "OUT")  # a parent that is a file, a folder we may not write in
    ckpt = read_checkpoint(args.input, prefer_ema=args.ema)
    report = require_sparseformer_layout(ckpt)  # nothing of the authors' weights left behind
    tensors = {k: v.contiguous() for k, v in ckpt.state_dict.items()}
    if args.model:
        check_model(ckpt, args.model)  # a video model takes its image model's, inflated
        model = create_model(args.model, **{**ckpt.architecture, "num_classes": ckpt.num_classes})
        with naming_their_model(ckpt, args.model):  # another size's weights: whose they are
            load_checkpoint(model, ckpt, allow_classifier_mismatch=False)
        # (which warns when the EMA weights scored best and these are the model's)
        tensors = _as_loaded(model, tensors)
    else:
        warn_about_weights(ckpt)
    metadata = {
        "source_format": report.source_format,
        "renamed": json.dumps(report.renamed),
        **_run_metadata(ckpt, args.model),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # installed when written: a device (a link to /dev/null) is written into, not replaced
        with staged(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            _default_permissions(tmp, out)
    except WriteError:  # said with the file and the cause already
        raise
    except (OSError, SafetensorError) as exc:
        raise CliError(f"cannot write {str(given)!r}: {exc}") from exc
    say = sys.stderr if is_stream(out) else sys.stdout  # OUT may be /dev/stdout itself
    renamed = [(old, new) for old, new in report.renamed.items() if old != new]
    listed = getattr(args, "verbose", False)  # 154 lines for SparseFormer-T: asked for with -v
    hint = " (sparseformer -v convert ... lists them)" if renamed and not listed else ""
    print(f"wrote {given}: {report.summary()}{hint}", file=say)
    for old, new in renamed if listed else ():
        print(f"  {old} -> {new}", file=say)
    for key in report.dropped:
        print(f"  dropped {key}", file=say)
    return 0


def _as_loaded(model, given: dict) -> dict:
    """The weights ``model`` holds after loading ``given``, each in the dtype ``given`` had
    it: what a strict load of the file written must give ``--model``. They are ``given``'s,
    but for the stage embeddings a bootstrapped release lacks (filled with zeros) and image
    weights taken by a video model (inflated), which the file would otherwise not hold."""
    first = next(iter(given.values())).dtype
    return {
        key: value.detach().to(given[key].dtype if key in given else first).contiguous()
        for key, value in model.state_dict().items()
    }


def _default_permissions(path, replaces) -> None:
    """Give ``path`` the permissions of the file it ``replaces``, else those a new file gets
    (0666 less the umask): safetensors creates its files readable by their owner only
    (0600), which hides a converted model from the group that shares it."""
    import os

    if replaces.exists():  # a regular file's own mode (a device's says nothing of files)
        if replaces.is_file():
            os.chmod(path, replaces.stat().st_mode & 0o777)
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _run_metadata(checkpoint, model: str | None) -> dict[str, str]:
    """The ``RUN_INFO_KEY`` metadata entry of a ``sparseformer train`` checkpoint (JSON of
    its model name, classes, preprocessing and clips), and the ``--model`` an official
    checkpoint was checked against (so that predict, eval and info need no --model for the
    converted file); empty for an official checkpoint converted without one."""
    import json

    from sparseformer.weights.checkpoint import RUN_FIELDS
    from sparseformer.weights.reading import RUN_INFO_KEY

    info = {k: v for k, v in checkpoint.run_info().items() if k in RUN_FIELDS}
    if model is not None and info.get("model_name") is None:
        info["model_name"] = model  # checked above: the weights fit it
    if checkpoint.ema:  # --ema took them: read back as EMA weights (predict --ema)
        info["ema"] = True
    if set(info) <= {"num_classes"}:  # records nothing: the weights say it all
        return {}
    return {RUN_INFO_KEY: json.dumps(info)}


def _output(given: Path, source: Path, overwrite: bool) -> Path:
    """The file OUT (``given``) names, a link's target (written through), refused where it is
    the input, a folder, a name or a link that is not safetensors, or a file not to replace.

    Raises:
        CliError: what to give instead.
    """
    from sparseformer.cli import CliError, check_output
    from sparseformer.engine.atomic import output_target

    out = output_target(given)  # a symlink is written through: the link stays
    if out.exists() and out.resolve() == source.resolve():
        raise CliError(f"OUT {str(given)!r} is the input file; give another path")
    if out.is_dir():
        raise CliError(
            f"OUT {str(given)!r} is a folder; give a file path, e.g. {out / 'model.safetensors'}"
        )
    if given.suffix != ".safetensors":  # torch.load and timm would take a .pth for a pickle
        raise CliError(
            f"OUT {str(given)!r}: convert writes safetensors; give a name ending in "
            f".safetensors, e.g. {given.with_suffix('.safetensors')}"
        )
    check_output(given, "OUT", kinds=(".safetensors",))  # not a link to a checkpoint .pth
    if out.exists() and not overwrite:
        raise CliError(
            f"OUT {str(given)!r} already exists; replace it with --overwrite, or give another path"
        )
    return out
