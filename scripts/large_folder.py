"""What a large image folder costs before training, and in every data-loading worker.

    python scripts/large_folder.py make DIR --files 300000      # a synthetic folder (once)
    python scripts/large_folder.py scan DIR                     # the check, one process
    python -m torch.distributed.run --nproc_per_node=2 scripts/large_folder.py scan DIR
    python scripts/large_folder.py workers DIR --workers 4      # private memory per worker

``make`` writes ``--files`` small JPEGs (16 x 16, one picture per class) into ``--classes``
class folders. ``scan`` builds :class:`~sparseformer.data.folder.CheckedImageFolder` as
``train`` does (every file's header read once; under torchrun the processes share that work)
and prints the seconds it took. ``workers`` runs one shuffled epoch through a DataLoader with
``--workers`` processes, twice: over the folder's compact sample table, then over the same
samples kept as a list of Python tuples, as torchvision's ``ImageFolder`` keeps them; after the
epoch it prints each worker's private memory growth (``Private_Clean + Private_Dirty`` of
``/proc/PID/smaps_rollup``, Linux) over what a worker holds after its first batch.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sparseformer.data.folder import CheckedImageFolder


def make(root: Path, files: int, classes: int) -> None:
    if root.exists():
        raise SystemExit(f"{root} exists; give a new folder")
    rng = np.random.default_rng(0)
    for c in range(classes):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        folder = root / f"class_{c:04d}"
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            (folder / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())
    print(f"wrote {files} JPEGs in {classes} class folders under {root}")


def scan(root: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    start = time.perf_counter()
    data = CheckedImageFolder(root, share_check=world > 1)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        classes = len(data.classes)
        print(f"{len(data)} images, {classes} classes: {seconds:.1f} s, {world} process(es)")
    if world > 1:
        torch.distributed.destroy_process_group()


def small_item(img: Image.Image) -> float:
    """A decoded image reduced to one number: the loading is what is measured."""
    return float(np.asarray(img).mean())


class TupleFolder(CheckedImageFolder):
    """The same folder, its samples held as a list of ``(path, label)`` tuples."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, check_files=False)
        self.rows = [(path, label) for path, label in self.samples]

    def __getitem__(self, index: int):
        path, label = self.rows[index]
        with Image.open(path) as img:
            return small_item(img.convert("RGB")), label


class TableFolder(CheckedImageFolder):
    """The folder as ``train`` reads it, with the same small item as :class:`TupleFolder`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, check_files=False)
        self.transform = small_item


def private_mb(pid: int) -> float:
    fields = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    kb = sum(int(line.split()[1]) for line in fields if line.startswith("Private_"))
    return kb / 1024


def children() -> list[int]:
    tasks = Path(f"/proc/{os.getpid()}/task").iterdir()
    return [int(pid) for task in tasks for pid in (task / "children").read_text().split()]


def worker_growth(data, workers: int) -> list[float]:
    loader = DataLoader(data, batch_size=256, shuffle=True, num_workers=workers)
    batches = iter(loader)
    next(batches)
    pids = children()
    first = {pid: private_mb(pid) for pid in pids}
    for _ in range(len(loader) - 1):
        next(batches)
    growth = [private_mb(pid) - first[pid] for pid in pids]
    del batches
    return growth


def workers(root: Path, count: int) -> None:
    for name, data in (("table", TableFolder(root)), ("tuples", TupleFolder(root))):
        start = time.perf_counter()
        growth = worker_growth(data, count)
        print(
            f"{name}: {len(data)} samples, one epoch in {time.perf_counter() - start:.0f} s; "
            f"private memory growth per worker (MB): {', '.join(f'{g:.0f}' for g in growth)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["make", "scan", "workers"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--files", type=int, default=300_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if args.command == "make":
        make(args.root, args.files, args.classes)
    elif args.command == "scan":
        scan(args.root)
    else:
        workers(args.root, args.workers)


if __name__ == "__main__":
    main()
