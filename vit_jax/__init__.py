"""Vision Transformers in JAX/Flax (Dosovitskiy et al. 2020, arXiv:2010.11929)."""
