"""Shared by the tests: the tiny training run, config parsing as main.py does it, file helpers."""

import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 1-layer ViT of width 16 on 8x8 digits: a few seconds to compile and run on a CPU.
TINY = ['--config=configs/digits.py:pretrain',
        '--config.model.hidden_size=16', '--config.model.representation_size=16',
        '--config.model.transformer.mlp_dim=32', '--config.model.transformer.num_heads=2',
        '--config.model.transformer.num_layers=1', '--config.pp.crop=8',
        '--config.batch=32', '--config.batch_eval=64', '--config.total_steps=6',
        '--config.warmup_steps=2', '--config.eval_every=3', '--config.checkpoint_every=3',
        '--config.progress_every=2', '--config.keep_checkpoints=3',
        '--config.compilation_cache_dir=',  # The session's shared cache (conftest), not ~/.cache.
        '--config.folder_index_dir=']


def built_once(tmp_path_factory, name: str, build) -> str:
  """<shared tmp>/<name>, made by `build(path)` once per test session however many xdist workers
  ask for it: the first builds it under a file lock, the others wait and reuse it (fixtures that
  train a model are built once, not once per worker)."""
  import filelock
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # Shared by the workers of this session.
  path, done = root / 'built_once' / name, root / 'built_once' / f'{name}.done'
  path.parent.mkdir(exist_ok=True)
  with filelock.FileLock(str(root / 'built_once' / f'{name}.lock')):
    if not done.exists():
      build(path)
      done.touch()
  return path


def parse_config(*args):
  """The config main.py builds from `--config=... --config.key=value ...`."""
  argv = ['main'] + [a.replace('=configs/', f'={ROOT}/configs/') for a in args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def tiny_config(*overrides):
  return parse_config(*TINY, *overrides)


def write_class_folders(root, classes=('cat', 'dog', 'owl'), per_class=10, size=12,
                        suffix='jpg', seed=1):
  """<root>/<class>/<class>_<i>.<suffix> of random pixels, without split folders (as the
  ImageNet-21k release unpacks)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for name in classes:
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
          root / name / f'{name}_{i}.{suffix}')
  return root


def load_npz(path):
  with np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def assert_same_params(actual, expected, atol=0.0):
  """Equal parameters, up to `atol`; the attention key bias excepted: softmax ignores a shift of
  every logit, so its gradient is zero and Adam turns the rounding noise of that zero into steps
  of either sign. It must stay ~0 in both."""
  assert actual.keys() == expected.keys()
  for key in expected:
    if key.endswith('key/bias') and atol:
      assert np.abs(actual[key]).max() < 1e-5 and np.abs(expected[key]).max() < 1e-5
    else:
      np.testing.assert_allclose(actual[key], expected[key], atol=atol, rtol=atol and 1e-5,
                                 err_msg=key)


def main_command(*args, module='vit_jax.main'):
  return [sys.executable, '-m', module, *args]


def run_main(*args, env=None, timeout=600, module='vit_jax.main'):
  """Runs `python -m <module> args` from the repository root; returns the CompletedProcess."""
  return subprocess.run(main_command(*args, module=module), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def assert_unchanged(before: dict, directory, except_for=()):
  after = snapshot(directory)
  changed = sorted(p for p in before if p not in except_for and after.get(p) != before[p])
  assert not changed, f'changed or lost: {changed}'


# Classification metrics that are ratios of counts: equal however the sums were split.
COUNTED = ('accuracy_test', 'accuracy_test_top5')


def scalars(metrics: dict) -> dict:
  """An evaluator's scalar metrics (without its reliability-diagram bins), for approx()."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
