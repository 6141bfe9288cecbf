"""gradinv: what does a shared gradient give away? (GradInversion, Yin et al., CVPR 2021)."""

__version__ = "0.1.0"
