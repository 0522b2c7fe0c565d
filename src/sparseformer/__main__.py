"""``python -m sparseformer`` (also what ``torchrun -m sparseformer`` runs)."""

from sparseformer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
