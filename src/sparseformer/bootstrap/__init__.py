"""Bootstrapping SparseFormers from pretrained ViTs (Gao et al., CVPR 2024, arXiv 2312.01987):
derive the student from a timm ViT (:mod:`~sparseformer.bootstrap.derive`), and train its new
focusing part to match the teacher (:mod:`~sparseformer.bootstrap.objective`,
:mod:`~sparseformer.bootstrap.run`)."""
