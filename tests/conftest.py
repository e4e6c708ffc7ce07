"""Test-wide settings (CPU only, no network access for TFDS), the two tiers (`slow`: what trains
a model or starts a subprocess; `make test-fast` runs the rest) and the finished run that the
fault catalogues copy and damage."""
import inspect
import os
import shutil
import subprocess

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Subprocesses start without re-executing themselves for huge pages (a second JAX import each;
# test_cpu_tuning checks the restart itself).
os.environ.setdefault('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
# One XLA compilation cache for the session's workers and their subprocesses: the tiny models
# of many tests compile the same programs. (Tests about the cache name their own directory.)
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or str(os.getpid())
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', f'/tmp/vit_jax-test-xla-cache-{_RUN}')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # test_plan's TPU compiler, per worker.
# The XLA:CPU setting the command lines apply (cpu_tuning), in-process too: the same numerics.
# (JAX reads the settings above when it is imported: vit_jax only after them.)
from vit_jax import cpu_tuning  # pylint: disable=wrong-import-position
cpu_tuning.set_xla_flags()


@pytest.fixture(scope='session')
def finished(tmp_path_factory):
  """A finished tiny run: checkpoints 3 and 6, model.npz, results.json, config.json. Read it;
  damage a copy (run_copy)."""
  from helpers import built_once, tiny_config
  from vit_jax import train
  return built_once(tmp_path_factory, 'finished',
                    lambda path: train.train_and_evaluate(tiny_config(), str(path)))


@pytest.fixture
def run_copy(finished, tmp_path):
  """A copy of the finished run and the digest of each of its files."""
  from helpers import snapshot
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  return workdir, snapshot(workdir)


# A test is slow when it uses a fixture that trains, or its own code trains or starts a
# subprocess. The fast tier enforces it: there, training or a subprocess fails the test, so a
# test that does either through a helper is found and marked @pytest.mark.slow by hand.
TRAINING_FIXTURES = {'finished', 'run_copy', 'trained', 'reference', 'detection_run',
                     'scanned_run'}
SLOW_CALLS = ('run_main(', 'main_command(', 'subprocess.', 'train_and_evaluate(',
              'train.evaluate(', 'vtab.sweep(', 'multiprocessing')


def pytest_collection_modifyitems(config, items):
  for item in items:
    try:
      source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
      source = ''
    if TRAINING_FIXTURES & set(item.fixturenames) or any(c in source for c in SLOW_CALLS):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_trains_nothing(request, monkeypatch):
  if 'slow' in request.node.keywords or 'not slow' not in (request.config.option.markexpr or ''):
    yield
    return

  def refuse(*args, **kwargs):
    raise AssertionError(f'{request.node.nodeid} trains or starts a subprocess: mark it '
                         '@pytest.mark.slow (make test-fast runs neither).')

  from vit_jax import train
  monkeypatch.setattr(subprocess.Popen, '__init__', refuse)
  monkeypatch.setattr(train, 'train_and_evaluate', refuse)
  monkeypatch.setattr(train, 'evaluate', refuse)
  yield
