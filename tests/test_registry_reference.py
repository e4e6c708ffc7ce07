"""Every registry model, hybrids included, computes the official forward pass (logits against
tests/official_reference.py). One block and two tokens per side keep it cheap: the widths, heads,
patch, stem stages and classifier are the registry's. benchmarks/reference_check.py runs the
same comparison at full depth and 224 px."""

import jax
import pytest

import official_reference
from vit_jax import models

REGISTRY = [name for name in models.MODEL_CONFIGS if not name.startswith('testing')]


@pytest.mark.slow  # Seconds each, many of them: the full tier.
@pytest.mark.parametrize('name', REGISTRY)
def test_registry_model_gives_the_official_logits(tmp_path, name):
  size = tuple(2 * side for side in models.token_stride(models.get_config(name)))
  # In double precision the two sides differ by rounding alone (~1e-15); a formula that differs
  # (eps added to the variance rather than the standard deviation: ~4e-3 here) does not hide in
  # float32's ~1e-6 of summation order.
  with jax.enable_x64(True):
    difference, largest = official_reference.compare_registry_model(
        name, str(tmp_path / 'model.npz'), num_layers=1, image_size=size, dtype='float64')
  assert largest > 0.1  # Logits that carry signal.
  assert difference <= 1e-9, (name, difference)
