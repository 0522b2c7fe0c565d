"""Run the README's "Quick start: Python" block as the installed package's metadata carries it.

Usage: python readme_quickstart.py   (in an empty folder; writes sparseformer_t_imagenet1k.pth)

Offline, so the statements that download (``pretrained=True``) are left out, and the file the
block names, ``sparseformer_t_imagenet1k.pth``, is made first: random weights of the tiny model,
which loads the same way as the authors' file.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import torch

import sparseformer

HEADING = "## Quick start: Python"
CHECKPOINT = "sparseformer_t_imagenet1k.pth"


def quickstart_block(readme: str) -> str:
    section = readme.split(HEADING, 1)
    if len(section) != 2:
        sys.exit(f"the README in the package metadata has no {HEADING!r} section")
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    if block is None:
        sys.exit(f"no ```python block under {HEADING!r}")
    return block.group(1)


def main() -> None:
    readme = importlib.metadata.metadata("sparseformer").get_payload()
    source = quickstart_block(readme)
    tree = ast.parse(source)
    kept, dropped = [], []
    for node in tree.body:
        text = ast.get_source_segment(source, node) or ""
        (dropped if "pretrained=True" in text else kept).append(node)
    torch.manual_seed(0)
    torch.save(sparseformer.create_model("sparseformer_v1_tiny").state_dict(), CHECKPOINT)
    for node in dropped:
        print("left out (downloads):", ast.get_source_segment(source, node).splitlines()[0])
    print(f"running {len(kept)} statements of the README's quick start")
    code = compile(ast.Module(body=kept, type_ignores=[]), "README.md quick start", "exec")
    exec(code, {"__name__": "__main__"})


if __name__ == "__main__":
    main()
