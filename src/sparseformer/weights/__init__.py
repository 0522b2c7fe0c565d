"""Weights: the model registry, ``create_model``, reading and converting checkpoints,
inflating image weights for video models, downloads, and the registration with timm."""
