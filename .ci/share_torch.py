"""Let a new virtual environment use the torch stack already unpacked in this one.

Usage: python .ci/share_torch.py NEW_VENV_PYTHON LINK_DIR

Run with the Python of the environment that has torch. For torch, triton and every nvidia-*
distribution, links each top-level file or folder it installed (the package and its
.dist-info) into LINK_DIR, and puts LINK_DIR on the new environment's path with a .pth file.
pip in the new environment then counts those distributions as installed and installs the rest
of a wheel's dependencies itself. Nothing is shared when the two Pythons differ in version
(compiled extensions would not load) or when torch is not installed here.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def shared_distributions():
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ("torch", "triton") or name.startswith("nvidia-"):
            yield dist


def top_level_paths(dist):
    """Every top-level entry the distribution installed into site-packages."""
    site = Path(dist.locate_file("")).resolve()
    tops = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if parts and parts[0] not in ("..", "/") and not parts[0].startswith("__pycache__"):
            tops.add(site / parts[0])
    return {top for top in tops if top.exists() and top.parent == site}


def main(new_python, link_dir):
    here = "{}.{}".format(*sys.version_info[:2])
    code = (
        "import sys, sysconfig; print('{}.{}'.format(*sys.version_info[:2])); "
        "print(sysconfig.get_path('purelib'))"
    )
    there, site = subprocess.run(
        [new_python, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split("\n")[:2]
    dists = list(shared_distributions())
    if there != here or not any(d.metadata["Name"].lower() == "torch" for d in dists):
        print(f"not sharing torch (Python {here} here, {there} there, {len(dists)} distributions)")
        return
    link_dir = Path(link_dir)
    link_dir.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        for top in top_level_paths(dist):
            link = link_dir / top.name
            if not link.exists():
                link.symlink_to(top)
    Path(site, "_shared_torch.pth").write_text(f"{link_dir.resolve()}\n")
    names = sorted(f"{d.metadata['Name']} {d.version}" for d in dists)
    print(f"sharing {len(names)} distributions from {sys.prefix}: {', '.join(names)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
