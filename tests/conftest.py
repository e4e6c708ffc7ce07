"""Test-wide settings (CPU only, no network access for TFDS) and the finished run that the
fault catalogues copy and damage."""
import os
import shutil

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session')
def finished(tmp_path_factory):
  """A finished tiny run: checkpoints 3 and 6, model.npz, results.json, config.json. Read it;
  damage a copy (run_copy)."""
  from helpers import tiny_config
  from vit_jax import train
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
  """A copy of the finished run and the digest of each of its files."""
  from helpers import snapshot
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  return workdir, snapshot(workdir)
