"""Let a new virtual environment use the torch stack already unpacked in this one.

Usage: python .ci/share_torch.py NEW_VENV_PYTHON LINK_DIR

Run with the Python of the environment that has torch. For torch, triton and every nvidia-*
distribution, links each top-level file or folder it installed (the package and its
.dist-info) into LINK_DIR, and puts LINK_DIR on the new environment's path with a .pth file.
pip in the new environment then counts those distributions as installed and installs the rest
of a wheel's dependencies itself. Nothing is shared when the two Pythons' extension suffixes
differ (version or ABI: compiled extensions would not load) or when torch is not installed
here. LINK_DIR is emptied first.
"""

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
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
    code = "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX')); " + (
        "print(sysconfig.get_path('purelib'))"
    )
    abi, site = subprocess.run(
        [new_python, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split("\n")[:2]
    here = sysconfig.get_config_var("EXT_SUFFIX")  # version and ABI: .cpython-311-x86_64-...
    if abi != here:
        print(f"not sharing torch: extensions here are {here}, there {abi}")
        return
    link_dir = Path(link_dir)
    shutil.rmtree(link_dir, ignore_errors=True)  # links from an earlier .venv may dangle
    link_dir.mkdir(parents=True)
    shared = []
    for dist in shared_distributions():
        tops = top_level_paths(dist)
        for top in tops:
            link = link_dir / top.name
            if not link.is_symlink():  # nvidia/ is shared by every nvidia-* distribution
                link.symlink_to(top)
        if tops:
            shared.append(f"{dist.metadata['Name']} {dist.version}")
    if not any(name.startswith("torch ") for name in shared):
        print("not sharing: torch is not installed here with a file list")
        return
    Path(site, "_shared_torch.pth").write_text(f"{link_dir.resolve()}\n")
    print(f"sharing {len(shared)} distributions from {sys.prefix}: {', '.join(sorted(shared))}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
