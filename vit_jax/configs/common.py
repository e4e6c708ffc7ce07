"""What the official repository's config keys mean here, for its config modules beside this one.

  official key            here
  pretrained_dir          pretrained_path = <pretrained_dir>/<model_name>.npz (kept in step)
  pp.train / pp.test      train_split / test_split (the same values: either name sets both)
  dataset=<directory>     an image folder, as dataset=folder:<directory>

Everything else is this codebase's config (configs/*.py), whose keys any override may use too.
The official notebook's `get_config()` and `with_dataset(config, dataset)` are at the end.
"""

import copy
import importlib.util
import os
from typing import Optional

import ml_collections

from vit_jax import config_lib

# The repository checkout this package runs from: the recipes live in <root>/configs/.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe(name: str, arg: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg)."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: the official config names need the recipes of '
                            'a vit_jax checkout (git clone), not only the installed package.')
  spec = importlib.util.spec_from_file_location(f'vit_jax_recipe_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def with_official_keys(config: ml_collections.ConfigDict, pretrained_dir: str,
                       pretrained_file: Optional[str]) -> ml_collections.ConfigDict:
  """`config` with the official keys linked to the ones they stand for; pretrained_path then
  follows pretrained_dir (<pretrained_dir>/<pretrained_file>.npz) unless set itself. Without a
  pretrained_file it is left as it is (AugReg's best file is picked when the run starts)."""
  with config.unlocked():
    config.pretrained_dir = ml_collections.FieldReference(pretrained_dir, field_type=str)
    if pretrained_file:
      # '' is the current directory (not the root: '' + '/NAME.npz'), a trailing '/' no '//'.
      directory = config.get_ref('pretrained_dir')
      config.pretrained_path = directory._apply_op(  # pylint: disable=protected-access
          _in_directory, f'{pretrained_file}.npz')
    config.pp.train = config.get_ref('train_split')
    config.pp.test = config.get_ref('test_split')
  return config.lock()


def _in_directory(directory: str, name: str) -> str:
  """<directory>/<name>: in the current directory where `directory` is '' (or None)."""
  return os.path.join(directory, name) if directory else name


def get_config() -> ml_collections.ConfigDict:
  """The official get_config: the fine-tuning recipe (configs/finetune.py) before a dataset is
  chosen. Its model is the recipe's ViT-B_16 (the official leaves it None until set)."""
  config = with_official_keys(recipe('finetune', 'B_16,cifar10'), '.', 'ViT-B_16')
  with config.unlocked():
    config.dataset = ''
  return config


def with_dataset(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """The official with_dataset: a copy of `config` set up for fine-tuning on `dataset` (a TFDS
  name or a directory): its splits, steps and schedule as configs/finetune.py sets them."""
  config = copy.deepcopy(config)  # The copy keeps the official keys linked to ours.
  with config.unlocked():
    config_lib.finetune_dataset(config, config_lib.official_dataset(dataset))
  return config
