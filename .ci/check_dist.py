"""Check that the built wheel and sdist hold every file of the package's source tree.

Usage: python .ci/check_dist.py ROOT WHEEL SDIST

The list is derived from the tree (every file under src/sparseformer but __pycache__), so a new
recipe, template or data table that pyproject's package-data does not cover fails here instead
of in a user's `pip install`. The licence files must be in both, too.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

LICENSE_FILES = ("LICENSE", "NOTICE")


def package_files(root: Path) -> list[str]:
    """Paths relative to src/ (``sparseformer/recipes/imagenet1k.json``) of the package's files."""
    src = root / "src"
    return sorted(
        p.relative_to(src).as_posix()
        for p in (src / "sparseformer").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def main(root: str, wheel: str, sdist: str) -> int:
    expected = package_files(Path(root))
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    with tarfile.open(sdist) as tf:
        # members are NAME-VERSION/src/sparseformer/...: drop the top folder
        in_sdist = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    problems = [f"wheel lacks {f}" for f in expected if f not in in_wheel]
    problems += [f"sdist lacks src/{f}" for f in expected if f"src/{f}" not in in_sdist]
    licences = {Path(n).name for n in in_wheel if ".dist-info/licenses/" in n}
    problems += [
        f"wheel lacks {f} in .dist-info/licenses" for f in LICENSE_FILES if f not in licences
    ]
    problems += [f"sdist lacks {f}" for f in LICENSE_FILES if f not in in_sdist]
    problems += [f"sdist holds {n} (MANIFEST.in prunes the tests)" for n in sorted(in_sdist)
                 if n.startswith("tests/")]  # fmt: skip
    data = [f for f in expected if not f.endswith(".py")]
    print(f"{len(expected)} package files expected ({len(data)} not .py: {', '.join(data)})")
    for problem in problems:
        print("error:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
