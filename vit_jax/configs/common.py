"""What the official repository's config keys mean here, for its config modules beside this one.

  official key            here
  pretrained_dir          pretrained_path = <pretrained_dir>/<model_name>.npz (kept in step)
  pp.train / pp.test      train_split / test_split (the same values: either name sets both)
  dataset=<directory>     an image folder, as dataset=folder:<directory>

Everything else is this codebase's config (configs/*.py), whose keys any override may use too.
"""

import importlib.util
import os
from typing import Optional

import ml_collections

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


def dataset_name(dataset: str) -> str:
  """The official `dataset` (a TFDS name, or a directory of {train,test}/<class>/<image>)."""
  if os.sep in dataset and os.path.isdir(os.path.expanduser(dataset)):
    return f'folder:{dataset}'
  return dataset


def with_official_keys(config: ml_collections.ConfigDict, pretrained_dir: str,
                       pretrained_file: Optional[str]) -> ml_collections.ConfigDict:
  """`config` with the official keys linked to the ones they stand for; pretrained_path then
  follows pretrained_dir (<pretrained_dir>/<pretrained_file>.npz) unless set itself. Without a
  pretrained_file it is left as it is (AugReg's best file is picked when the run starts)."""
  with config.unlocked():
    config.pretrained_dir = ml_collections.FieldReference(pretrained_dir, field_type=str)
    if pretrained_file:
      config.pretrained_path = config.get_ref('pretrained_dir') + f'/{pretrained_file}.npz'
    config.pp.train = config.get_ref('train_split')
    config.pp.test = config.get_ref('test_split')
  return config.lock()
