"""Multimodal components: image tiling, vision and audio encoders, projectors.

Vision: ``tiling`` (Phi-4 / InternVL dynamic high-resolution tiles and token counts),
``pixel_shuffle`` (InternVL pixel shuffle, Phi-4 2x2 pooling), ``projectors`` (the PROJECTORS
registry), ``vision`` (VisionTower over transformers SigLIP/CLIP/ViT), ``synthetic_images``
(built-in shapes/OCR image data). Import the submodules directly; this package imports nothing
(the `multimodal` recipe section, config.py, builds on :mod:`mmtune.schema` only).
"""
