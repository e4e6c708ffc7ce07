"""Vision Transformers in JAX/Flax (Dosovitskiy et al. 2020, arXiv:2010.11929)."""

from vit_jax import cpu_tuning

cpu_tuning.set_xla_flags()  # Before JAX creates its CPU backend; see cpu_tuning.py.
