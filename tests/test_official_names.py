"""The official repository's names (vit_jax/configs/*.py, its config keys, its model names) as
aliases of this codebase's: the same configs and runs as our spelling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import parse_config, run_main
from vit_jax import checkpoint, models
from vit_jax.models_vit import VisionTransformer

OFFICIAL_KEYS = ('pretrained_dir', 'pp.train', 'pp.test')


def flat(config):
  import flax
  return flax.traverse_util.flatten_dict(config.to_dict(), sep='.')


def test_the_official_vit_config_is_our_finetune_recipe_with_its_keys_linked():
  official = parse_config('--config=vit_jax/configs/vit.py:b16,cifar10',
                          '--config.pretrained_dir=/models/imagenet21k',
                          '--config.pp.train=train[:90%]')
  ours = parse_config('--config=configs/finetune.py:B_16,cifar10',
                      '--config.pretrained_path=/models/imagenet21k/ViT-B_16.npz',
                      '--config.train_split=train[:90%]')
  assert {k: v for k, v in flat(official).items() if k not in OFFICIAL_KEYS} == flat(ours)
  assert (official.pp.train, official.pp.test) == (ours.train_split, ours.test_split)
  default = parse_config('--config=vit_jax/configs/vit.py:b16,cifar10')
  assert default.pretrained_path == 'gs://vit_models/imagenet21k/ViT-B_16.npz'
  # A misspelt model is not taken for a checkpoint path: the closest names are given.
  with pytest.raises(Exception, match=r"Unknown model 'b61'. Did you mean 'b16'\?"):
    parse_config('--config=vit_jax/configs/vit.py:b61,cifar10')


def test_the_official_models_module_is_a_view_of_the_registry():
  from vit_jax.configs import models as official
  assert official.MODEL_CONFIGS is models.MODEL_CONFIGS
  assert official.get_b16_config() == models.MODEL_CONFIGS['ViT-B_16']
  assert official.get_r50_b16_config() == models.MODEL_CONFIGS['R50+ViT-B_16']
  assert official.get_s16_gap_norep_config() == models.MODEL_CONFIGS['ViT-S_16-gap-norep']
  assert official.AUGREG_CONFIGS['R_Ti_16'] is models.MODEL_CONFIGS['R+ViT-Ti_16']
  assert 'L_32' not in official.AUGREG_CONFIGS  # Not among AugReg's releases.


def test_the_official_command_line_fine_tunes_from_pretrained_dir(tmp_path):
  """`python -m vit_jax.main --config=vit_jax/configs/vit.py:MODEL,DATASET
  --config.pretrained_dir=DIR`, with a dataset directory of {train,test}/<class>/<image>."""
  from helpers import write_class_folders
  for split in ('train', 'test'):
    write_class_folders(tmp_path / 'pets' / split, classes=('cat', 'dog'), per_class=6, size=20,
                        seed=len(split))
  model = VisionTransformer(num_classes=3, **models.get_config('testing'))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  (tmp_path / 'pretrained').mkdir()
  checkpoint.save(params, str(tmp_path / 'pretrained' / 'testing.npz'))
  result = run_main('--workdir', str(tmp_path / 'run'),
                    f'--config=vit_jax/configs/vit.py:testing,{tmp_path / "pets"}',
                    f'--config.pretrained_dir={tmp_path / "pretrained"}',
                    '--config.pp.train=train[:50%]', '--config.pp.crop=16',
                    '--config.batch=4', '--config.batch_eval=4', '--config.total_steps=2',
                    '--config.warmup_steps=1', '--config.eval_every=2',
                    '--config.checkpoint_every=2', '--config.shuffle_buffer=8',
                    '--config.compilation_cache_dir=', '--config.folder_index_dir=')
  assert result.returncode == 0, result.stderr[-3000:]
  tuned = checkpoint.load_model(str(tmp_path / 'run' / 'model.npz'))
  assert tuned.num_classes == 2 and tuned.class_names == ['cat', 'dog']
  # Started from the file in pretrained_dir (two small steps away), with a new head that learned.
  np.testing.assert_allclose(tuned.params['embedding']['kernel'], params['embedding']['kernel'],
                             atol=1e-3)
  assert np.abs(tuned.params['head']['kernel']).max() > 0
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')


def test_the_model_takes_the_official_keyword_for_its_images():
  model = models.get_model('testing', num_classes=3)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  np.testing.assert_array_equal(model.apply(variables, inputs=images, train=False),
                                model.apply(variables, images, train=False))


def test_the_official_inference_time_config_times_the_model_it_names(tmp_path):
  import json
  from vit_jax import inference_time
  config = parse_config('--config=vit_jax/configs/inference_time.py',
                        '--config.model_name=testing', '--config.batch=4',
                        '--config.image_size=32', '--config.steps=2', '--config.initial_steps=1')
  assert (config.batch_eval, config.pp.crop) == (4, 32)  # The official keys set ours.
  results = inference_time.inference_time(config, str(tmp_path))
  assert results['inference_img_sec_core'] > 0
  recorded = json.loads((tmp_path / 'inference_time.json').read_text())[-1]
  assert (recorded['model'], recorded['batch'], recorded['image_size']) == ('testing', 4, [32, 32])


def test_the_official_test_utils_write_a_checkpoint_load_pretrained_reads(tmp_path):
  from vit_jax import test_utils
  from vit_jax.configs import models as official
  test_utils.create_checkpoint(official.get_testing_config(), str(tmp_path / 'testing.npz'))
  model = VisionTransformer(num_classes=2, **official.get_testing_config())
  init = model.init(jax.random.PRNGKey(0), inputs=jnp.ones((1, 32, 32, 3)), train=False)
  params = checkpoint.load_pretrained(pretrained_path=str(tmp_path / 'testing.npz'),
                                      init_params=init['params'],
                                      model_config=official.get_testing_config())
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 5, 10)


def test_the_official_augreg_config_picks_the_best_imagenet21k_checkpoint(tmp_path):
  from vit_jax import config_lib
  (tmp_path / 'index.csv').write_text(
      'name,ds,final_val,filename\n'
      'Ti/16,i21k,0.40,Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0\n'
      'Ti/16,i21k,0.45,Ti_16-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0\n'
      'Ti/16,i1k,0.90,Ti_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0\n'
      'S/16,i21k,0.99,S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0\n')
  config = parse_config('--config=vit_jax/configs/augreg.py:Ti_16',
                        f'--config.pretrained_dir={tmp_path}', '--config.dataset=digits',
                        '--config.pp.train=train[:90%]')
  assert config.model.model_name == 'ViT-Ti_16' and config.model.transformer.dropout_rate == 0
  assert config.train_split == 'train[:90%]' and config.pretrained_path is None
  resolved = config_lib.with_augreg_file(config)
  assert resolved.pretrained_path == (
      f'{tmp_path}/Ti_16-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0.npz')
  named = parse_config('--config=vit_jax/configs/augreg.py:Ti_16-i1k-300ep-lr_0.001-aug_medium2-'
                       'wd_0.1-do_0.0-sd_0.0', f'--config.pretrained_dir={tmp_path}')
  assert named.pretrained_path == (
      f'{tmp_path}/Ti_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz')
  with pytest.raises(ValueError, match=r'dataset is empty: set --config.dataset='):
    config_lib.check(parse_config('--config=vit_jax/configs/augreg.py:Ti_16'), device_count=1)
  with pytest.raises(ValueError, match=r'lists no ImageNet-21k checkpoint of B_32'):
    config_lib.with_augreg_file(parse_config('--config=vit_jax/configs/augreg.py:B_32',
                                             f'--config.pretrained_dir={tmp_path}'))
  with pytest.raises(ValueError, match=r'cannot read the AugReg index .*name the checkpoint'):
    config_lib.with_augreg_file(parse_config('--config=vit_jax/configs/augreg.py:B_32',
                                             f'--config.pretrained_dir={tmp_path / "none"}'))


def test_the_official_common_config_with_a_dataset_is_the_finetune_recipe(tmp_path):
  from vit_jax.configs import common
  base = common.get_config()
  assert base.dataset == ''  # As the official's: chosen by with_dataset.
  config = common.with_dataset(base, 'cifar100')
  ours = parse_config('--config=configs/finetune.py:B_16,cifar100',
                      '--config.pretrained_path=./ViT-B_16.npz')
  assert {k: v for k, v in flat(config).items() if k not in OFFICIAL_KEYS} == flat(ours)
  assert base.dataset == ''  # A copy: the config passed in is left as it was.
  config.pp.train = 'train[:10]'  # The official keys stay linked in the copy.
  assert config.train_split == 'train[:10]' and base.train_split == 'train[:98%]'
  (tmp_path / 'train' / 'cat').mkdir(parents=True)
  assert common.with_dataset(base, str(tmp_path)).dataset == f'folder:{tmp_path}'


@pytest.mark.parametrize('decay_type', ['linear', 'cosine'])
def test_the_official_learning_rate_schedule(decay_type):
  from vit_jax import utils
  total, base, warmup, end = 1000, 0.03, 100, 1e-5
  schedule = utils.create_learning_rate_schedule(total, base, decay_type, warmup)
  for step in (0, 1, 50, 100, 101, 325, 550, 999, 1000):
    # The official formula: the decay's value at max(0, progress), times the warm-up ramp.
    progress = np.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    if decay_type == 'linear':
      expected = end + (base - end) * (1 - progress)
    else:
      expected = base * 0.5 * (1 + np.cos(np.pi * progress))
    expected *= min(1.0, step / warmup)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step
  with pytest.raises(ValueError, match="decay_type 'step'; expected 'linear' or 'cosine'"):
    utils.create_learning_rate_schedule(total, base, 'step', warmup)


def test_the_official_dataset_info(tmp_path):
  from helpers import write_class_folders
  from vit_jax import config_lib, input_pipeline
  digits = input_pipeline.get_dataset_info('digits', 'test')
  assert (digits['num_examples'], digits['num_classes'], digits['int2str'](7)) == (359, 10, '7')
  write_class_folders(tmp_path / 'test', classes=('cat', 'dog'), per_class=3, size=8, seed=0)
  folder = input_pipeline.get_dataset_info(str(tmp_path), 'test')  # The official directory form.
  assert (folder['num_examples'], folder['num_classes'], folder['int2str'](1)) == (6, 2, 'dog')
  # The AugReg notebook sets a directory as dataset after the config is made, and accum_steps=0.
  config = parse_config('--config=vit_jax/configs/augreg.py:Ti_16')
  config.dataset, config.accum_steps = str(tmp_path), 0
  assert input_pipeline.get_source(config, 'test').class_names == ('cat', 'dog')
  config_lib.check(config, device_count=1)
  with pytest.raises(ValueError, match="mode='eval'; expected 'train' or 'test'"):
    input_pipeline.get_data_from_tfds(config=parse_config('--config=configs/digits.py'),
                                      mode='eval')
