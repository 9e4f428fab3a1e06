"""clip2scene: label-free 3D segmentation by distilling a cached CLIP teacher (CLIP2Scene, CVPR 2023).

Stage one (`clip2scene.precompute`) runs MaskCLIP over camera images once and writes per-point
teacher outputs into a sharded Zarr cache (`clip2scene.storage`); stage two (`clip2scene.train`)
trains a spconv network from that cache alone. See docs/architecture.md.
"""

__version__ = "0.1.0"
