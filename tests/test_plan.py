"""vit_jax.plan: the run's own steps compiled by the real XLA:TPU compiler (libtpu, compile-only
TPU devices on this CPU host), fits or not, and the auto-fit search."""

import re

import jax
import pytest

from helpers import tiny_config
from vit_jax import plan

pytest.importorskip('libtpu', reason='the TPU compiler comes with the tpu / test extras')

# The tiny test model (one block of width 16, patch 4) at 224 px: 3,137 tokens, whose attention
# logits alone are 78 MB per example, so that a batch decides whether it fits.
LARGE_IMAGES = ['--config.pp.crop=224']


@pytest.mark.slow
def test_a_small_run_fits_a_v5e_and_the_compiler_states_its_hbm():
  devices, name = plan.topology_devices('v5e:2x2')
  assert (len(devices), devices[0].platform) == (4, 'tpu')
  result = plan.compile_plan(tiny_config(*LARGE_IMAGES, '--config.batch=64'), devices, name)
  assert result.fits and result.error == ''
  assert result.hbm_gib == pytest.approx(15.75, abs=0.01)  # libtpu 0.0.42's v5e figure.
  assert 0 < result.total_gib < result.hbm_gib and result.temp_gib > 0.5  # 16 images' logits.
  assert result.argument_gib > 0 and result.eval_total_gib > 0
  assert result.tflop_per_device > 0


def test_an_oversized_batch_does_not_fit_with_the_compilers_figure():
  devices, name = plan.topology_devices('v5e:2x2')
  result = plan.compile_plan(tiny_config(*LARGE_IMAGES, '--config.batch=4096'), devices, name)
  assert result.fits is False
  assert re.search(r'exceeds available HBM|Ran out of memory', result.error), result.error
  assert result.temp_gib > result.hbm_gib


@pytest.mark.slow  # Several TPU compilations: the full tier only.
def test_auto_fit_finds_flags_that_fit_when_applied():
  devices, name = plan.topology_devices('v5e:2x2')
  big = [*LARGE_IMAGES, '--config.batch=2048']
  assert plan.compile_plan(tiny_config(*big), devices, name).fits is False
  found = plan.auto_fit(tiny_config(*big), devices, name, log=lambda line: None)
  assert found.fits and found.overrides
  flags = found.flags().split()
  assert all(f.startswith('--config.') for f in flags)
  applied = tiny_config(*big, *flags)  # As vit_jax.main parses them: the setting found.
  assert applied.to_dict() == plan.with_overrides(tiny_config(*big), found.overrides).to_dict()
  compiled = plan.compile_plan(applied, devices, name, eval_step=False)
  assert compiled.fits and compiled.total_gib == pytest.approx(found.total_gib)


def test_a_tpu_program_has_none_of_the_cpu_only_reshapes():
  config = tiny_config()  # Batch 32, 8 px, patch 4: 5 tokens of width 16.
  flattened = f'tensor<{32 * 5}x16xf32>'  # The global program, before it is split.

  def lowered_text(devices):
    from vit_jax import sharding
    return plan._steps(config, sharding.make_mesh(devices))[0].as_text()  # pylint: disable=protected-access

  tpu, _ = plan.topology_devices('v5e:2x2')
  assert flattened in lowered_text(jax.devices('cpu')[:1])  # (batch x tokens, D) on CPU ...
  assert flattened not in lowered_text(tpu)  # ... and not in the TPU program.


def test_libtpu_missing_or_an_unknown_topology_is_named(monkeypatch):
  with pytest.raises(plan.PlanError, match='not a TPU slice libtpu knows'):
    plan.topology_devices('v9z:3x3')
  with pytest.raises(plan.PlanError, match='expected cpu:N'):
    plan.topology_devices('cpu:x')
  import builtins
  real_import = builtins.__import__
  monkeypatch.setattr(builtins, '__import__', lambda name, *a, **k: (
      (_ for _ in ()).throw(ImportError(name)) if name == 'libtpu' else real_import(name, *a, **k)))
  with pytest.raises(plan.PlanError, match=r"pip install -e '.\[tpu\]'"):
    plan.topology_devices('v5e:2x2')
