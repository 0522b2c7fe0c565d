"""Fashion-MNIST (Xiao et al., 2017): 70,000 real 28x28 grayscale photos of clothes, 10 classes.

The files come, in order of preference, from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, what ``make demo`` installs), from a cache folder
prepared earlier, or from torchvision's download when the machine is online. torchvision's
``FashionMNIST`` reads them in every case; we only put the files where it looks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

from sparseformer.data.folder import DataError

__all__ = ["SYSTEM_DIR", "CLASS_NAMES", "default_data_root", "fashion_mnist"]

logger = logging.getLogger(__name__)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = tuple(FashionMNIST.classes)
_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def default_data_root() -> Path:
    """Where prepared data sets are cached: ``$XDG_CACHE_HOME/sparseformer/datasets``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sparseformer" / "datasets"


def _prepare_from_system(root: Path, system_dir: Path) -> bool:
    """Decompress the system package's files into torchvision's layout under ``root``."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _FILES):
        return True
    if not all((system_dir / f"{name}.gz").is_file() for name in _FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        if not (raw / name).is_file():
            # decompress next to the target, then rename: a killed run leaves no half file
            tmp = raw / f".{name}.partial"
            tmp.mkdir(exist_ok=True)
            out = extract_archive(str(system_dir / f"{name}.gz"), str(tmp))
            os.replace(out, raw / name)
            tmp.rmdir()
    logger.info("prepared Fashion-MNIST from %s in %s", system_dir, raw)
    return True


def fashion_mnist(
    train: bool,
    root: str | Path | None = None,
    system_dir: str | Path = SYSTEM_DIR,
    download: bool = True,
) -> FashionMNIST:
    """torchvision's ``FashionMNIST`` (train: 60,000 images; test: 10,000), files found for it.

    Items are ``(PIL image in mode "L", label)``; transforms are applied by the caller.

    Raises:
        DataError: no files installed and no way to download them, saying what to do.
    """
    root = Path(root) if root is not None else default_data_root()
    if not _prepare_from_system(root, Path(system_dir)) and download:
        logger.info("Fashion-MNIST is not installed; trying torchvision's download into %s", root)
        try:
            FashionMNIST(str(root), train=True, download=True)
        except (RuntimeError, OSError) as exc:
            raise DataError(
                f"Fashion-MNIST is neither installed in {system_dir} nor downloadable "
                f"({str(exc).splitlines()[0]}); install it with `apt-get install "
                f"dataset-fashion-mnist` (Debian/Ubuntu) or put the four *-ubyte(.gz) files in "
                f"{root / 'FashionMNIST' / 'raw'}"
            ) from exc
    try:
        return FashionMNIST(str(root), train=train, download=False)
    except RuntimeError as exc:
        raise DataError(
            f"Fashion-MNIST not found in {system_dir} or {root}; install it with `apt-get "
            "install dataset-fashion-mnist` or run once online so torchvision can download it"
        ) from exc
