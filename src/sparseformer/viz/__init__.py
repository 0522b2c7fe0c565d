"""Pictures of where SparseFormer looks: RoIs and sampling points over images and video
frames (matplotlib, imported only here)."""
