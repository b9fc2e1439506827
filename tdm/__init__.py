"""tdm: distil text-to-image diffusion teachers into few-step students with Trajectory Distribution
Matching (Luo et al., ICCV 2025, arXiv 2503.06674)."""

__version__ = "0.1.0"
