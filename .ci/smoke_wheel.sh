#!/usr/bin/env bash
# Build the sdist and the wheel, install the wheel (not editable) into a new virtual environment,
# and use it as a user would, from a folder outside the source tree: a file left out of the wheel
# (a recipe, py.typed) or a dependency it does not declare fails here, not at a user's
# `pip install`.
#
# The new environment installs every dependency the wheel declares, except that it takes torch,
# triton and the NVIDIA libraries already unpacked in .venv (5.3 GB of a CUDA build of torch that
# a second copy would need on disk; CI on a nearly full disk failed on it), through a folder of
# links on its path, when the two Pythons are the same version. pip sees them as installed and
# still resolves the rest, torchvision and timm among them, from the wheel's own metadata.
#
# Usage: .ci/smoke_wheel.sh [WORKDIR]   (default: a temporary folder, removed at the end)
# Env:   BUILD_PYTHON  python with the `build` package (default .venv/bin/python, from `make setup`)
#        PYTHON        interpreter for the new environment (default python3)
#        SMOKE_SHARE_TORCH=0  install torch into the new environment too (a full copy)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_PYTHON="${BUILD_PYTHON:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
if [[ $# -ge 1 ]]; then
    WORK="$1"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
WORK="$(cd "$WORK" && pwd)"
say() { printf '\n== smoke: %s (%ss)\n' "$*" "$SECONDS"; }

say "build sdist and wheel"
rm -rf "$WORK/dist"
# the wheel is built from the sdist (build's default), so a file missing from either fails below
"$BUILD_PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
shopt -s nullglob
wheels=("$WORK"/dist/*.whl)
sdists=("$WORK"/dist/*.tar.gz)
[[ ${#wheels[@]} -eq 1 && ${#sdists[@]} -eq 1 ]] || { echo "expected one wheel and one sdist"; exit 1; }

say "every package file is in the wheel and the sdist"
"$BUILD_PYTHON" "$ROOT/.ci/check_dist.py" "$ROOT" "${wheels[0]}" "${sdists[0]}"

say "install the wheel into a new environment"
rm -rf "$WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
if [[ "${SMOKE_SHARE_TORCH:-1}" != 0 ]]; then
    "$BUILD_PYTHON" "$ROOT/.ci/share_torch.py" "$WORK/venv/bin/python" "$WORK/shared"
fi
"$WORK/venv/bin/python" -m pip install "${wheels[0]}" >"$WORK/install.log" 2>&1 ||
    { tail -n 40 "$WORK/install.log"; exit 1; }
grep -E '^Successfully installed' "$WORK/install.log" || true
BIN="$WORK/venv/bin"

# from here on, nothing may come from the source tree: run in an empty folder, and drop any
# PYTHONPATH that could point back at src/
unset PYTHONPATH
rm -rf "$WORK/user"  # a reused WORKDIR starts with an empty folder too
mkdir -p "$WORK/user"
cd "$WORK/user"

say "import from the new environment's site-packages; __version__"
"$BIN/python" - "$WORK/venv" <<'PY'
import importlib.metadata
import sys
from pathlib import Path

import sparseformer

where = Path(sparseformer.__file__).resolve()
assert Path(sys.argv[1]).resolve() in where.parents, f"imported from {where}, not the new venv"
assert sparseformer.__version__ == importlib.metadata.version("sparseformer"), sparseformer.__version__
print("sparseformer", sparseformer.__version__, "from", where.parent)
PY

say "the README's Python quick start (create_model, timm, forward, FLOPs, video), offline"
"$BIN/python" "$ROOT/.ci/readme_quickstart.py"  # writes sparseformer_t_imagenet1k.pth here

say "CLI: --help, --version"
"$BIN/sparseformer" --help >/dev/null
version="$("$BIN/sparseformer" --version)"
echo "$version"
expected="$("$BIN/python" -c 'import importlib.metadata as m; print(m.version("sparseformer"))')"
[[ "$version" == "sparseformer $expected" ]] || { echo "--version said '$version'"; exit 1; }

say "the README's command-line quick start, offline: models, info, predict"
"$BIN/sparseformer" models >/dev/null
"$BIN/sparseformer" info sparseformer_v1_tiny
"$BIN/python" -c 'from PIL import Image; Image.new("RGB", (320, 240), (90, 140, 60)).save("photo.jpg")'
"$BIN/sparseformer" predict --model sparseformer_v1_tiny \
    --checkpoint sparseformer_t_imagenet1k.pth photo.jpg --topk 5

say "train one step with a shipped recipe on a tiny generated folder"
"$BIN/python" - <<'PY'
from pathlib import Path

from PIL import Image

# 2 classes x 2 images in train/ and val/: 4 training images, one batch of 4
for split in ("train", "val"):
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        folder = Path("images") / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (24 + 8 * i, 24), colour).save(folder / f"{i}.png")
PY
"$BIN/sparseformer" train --model sparseformer_v1_nano --data-dir images --output run \
    --recipe fashion-mnist-cpu --epochs 1 --batch-size 4 --img-size 32 --workers 0 \
    --device cpu --threads 1 --quiet
test -f run/last.pt && test -f run/summary.json

say "predict with the trained checkpoint"
"$BIN/sparseformer" predict --model sparseformer_v1_nano --checkpoint run/last.pt \
    --device cpu --threads 1 --topk 2 images/val/red/0.png images/val/blue/1.png

say "done"
