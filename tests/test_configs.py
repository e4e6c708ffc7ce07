"""Recipes, command-line parsing, and the rejection of impossible configs before compiling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags

from helpers import ROOT, main_command, parse_config, run_main
from vit_jax import config_lib, optim


def parse(recipe, *overrides):
  return parse_config(f'--config=configs/{recipe}', *overrides)


def test_pretrain_recipe_follows_table_3():
  c = parse('pretrain.py:B_16,imagenet21k')
  assert (c.optimizer, c.b1, c.b2, c.batch, c.grad_norm_clip) == ('adam', 0.9, 0.999, 4096, 1.0)
  assert (c.warmup_steps, c.decay_type, c.base_lr, c.weight_decay) == (10_000, 'linear', 1e-3, 0.03)
  assert c.model.representation_size == 768 and c.model.transformer.dropout_rate == 0.1
  assert c.loss == 'sigmoid_xent' and c.model.head_bias_init == -10.0
  assert c.total_steps == 289_051  # 90 epochs of ImageNet-21k at batch 4096.
  # The release unpacked into class folders, 1% held out (docs/imagenet.md: ImageNet-21k).
  assert (c.dataset, c.train_split, c.test_split) == ('folder:~/imagenet21k', 'train[:99%]',
                                                      'train[99%:]')
  h = parse('pretrain.py:H_14,jft')
  assert (h.base_lr, h.weight_decay, h.loss, h.model.representation_size) == (
      3e-4, 0.1, 'softmax_xent', 1280)
  hybrid = parse('pretrain.py:R50+ViT-B_16,jft')
  assert tuple(hybrid.model.resnet.num_layers) == (3, 4, 9) and hybrid.base_lr == 8e-4
  i1k = parse('pretrain.py:B_16,imagenet2012')
  assert (i1k.base_lr, i1k.weight_decay, i1k.decay_type) == (3e-3, 0.3, 'cosine')
  assert i1k.total_steps == 93_836  # 300 epochs.
  classification = {name: (e.dataset, e.split, e.label_key) for name, e in i1k.evals.items()
                    if e.type == 'classification'}
  assert classification == {'test': ('', 'validation', ''),
                            'real': ('imagenet2012_real', 'validation', 'real_label'),
                            'v2': ('imagenet_v2', 'test', '')}
  assert set(c.evals.fewshot.datasets) == {'cifar100', 'pets', 'flowers'}


def test_finetune_recipe_follows_table_4():
  c = parse('finetune.py:B_16,cifar10')
  assert (c.optimizer, c.momentum, c.weight_decay, c.batch, c.decay_type) == (
      'sgd', 0.9, 0.0, 512, 'cosine')
  assert (c.pp.crop, c.total_steps, c.reinit_head, c.model.representation_size) == (
      384, 10_000, True, None)
  assert c.pretrained_path == 'gs://vit_models/imagenet21k/ViT-B_16.npz'
  assert parse('finetune.py:L_16,oxford_iiit_pet').total_steps == 500
  assert parse('finetune.py:B_16,imagenet2012').total_steps == 20_000


def test_overrides_are_typed():
  c = parse('digits.py:pretrain', '--config.batch=64', '--config.model.transformer.num_layers=2')
  assert (c.batch, c.model.transformer.num_layers) == (64, 2)
  with pytest.raises(flags.IllegalFlagValueError, match='config.batch=abc'):
    parse('digits.py:pretrain', '--config.batch=abc')


def test_cli_rejects_unknown_key_and_wrong_type(tmp_path):
  result = run_main('--config=configs/digits.py:pretrain', f'--workdir={tmp_path}',
                    '--config.pp.crop_size=32')
  assert result.returncode != 0
  assert "--config.pp.crop_size: the config has no key 'crop_size'." in result.stderr
  # ml_collections' suggestion, once, in plain text (it came nested and escaped twice).
  result = run_main('--config=configs/digits.py:pretrain', f'--workdir={tmp_path}',
                    '--config.pretrained_dir=gs://vit_models/imagenet21k')
  assert result.stderr.strip().splitlines()[-1] == (
      "FATAL Flags parsing error: --config.pretrained_dir: the config has no key "
      "'pretrained_dir'. Did you mean --config.pretrained_path?")
  result = run_main('--config=configs/digits.py:pretrain', f'--workdir={tmp_path}',
                    '--config.base_lr=fast')
  assert result.returncode != 0 and '--config.base_lr=fast' in result.stderr
  assert not os.listdir(tmp_path)


def test_every_module_run_as_a_command_says_how_to_use_it():
  """--help lists a command's flags; the modules that are not commands (the official
  repository's `python -m vit_jax.train`) say which command runs them instead of exiting 0
  in silence."""
  import subprocess
  expected = {'vit_jax.main': '--workdir', 'vit_jax.predict': '--checkpoint',
              'vit_jax.analysis': '--outdir', 'vit_jax.fewshot': '--shots',
              'vit_jax.convert': '--format', 'vit_jax.report': 'python -m vit_jax.report DIR',
              'vit_jax.train': 'vit_jax.train is not a command: run python -m vit_jax.main',
              'vit_jax.inference_time': '--config.trainer=inference_time',
              'vit_jax.vtab': '--lrs'}
  running = {m: subprocess.Popen(main_command('--help', module=m), cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for m in expected}
  for module, process in running.items():
    output, _ = process.communicate(timeout=300)
    assert expected[module] in output, (module, output[-2000:])


@pytest.mark.parametrize('overrides, message', [
    (dict(batch=100), r'batch=100 is not divisible by device_count x accum_steps = 1 x 8 = 8'),
    (dict(batch_eval=9), None),
    (dict(crop=2), r'pp.crop=2 must be a multiple of the patch size \(4, 4\)'),
    (dict(crop=18), r'pp.crop=18 must be a multiple of the patch size'),
    (dict(crop=(16, 10)), r'pp.crop=\(16, 10\) must be a multiple of the patch size'),
    (dict(crop='big'), r"pp.crop='big' must be an int or a pair"),
    (dict(pretrained_path='/nonexistent/model.npz'),
     r"pretrained_path='/nonexistent/model.npz' does not exist"),
    (dict(warmup_steps=2000), r'warmup_steps=2000 must lie in \[0, total_steps=1500\)'),
    (dict(optimizer='lamb'), r"optimizer='lamb'; expected one of \('adam', 'sgd'\)"),
    (dict(trainer='fit'), r"trainer='fit'; expected one of"),
    (dict(accum_steps=-1), r'accum_steps=-1 must be >= 0 \(0 and 1: no accumulation\)'),
])
def test_impossible_values_are_rejected(overrides, message):
  c = parse('digits.py:pretrain')
  c.accum_steps = 8
  if 'crop' in overrides:
    c.pp.crop = overrides.pop('crop')
  c.update(overrides)
  if message is None:  # batch_eval=9 is fine on 1 device, not on 8.
    config_lib.check(c, device_count=1)
    with pytest.raises(ValueError, match='batch_eval=9 is not divisible by device_count=8'):
      config_lib.check(c, device_count=8)
    return
  with pytest.raises(ValueError, match=message):
    config_lib.check(c, device_count=1)


def test_every_recipe_passes_the_checks(tmp_path):
  pretrained = tmp_path / 'model.npz'
  pretrained.write_bytes(b'')
  for recipe in ['digits.py:pretrain', 'digits.py:finetune', 'pretrain.py:B_16,imagenet21k',
                 'pretrain.py:Ti_16,imagenet2012', 'finetune.py:B_16,cifar10',
                 'segmentation.py:shapes', 'segmentation.py:B_16,scene_parse150',
                 'detection.py:shapes', 'detection.py:B_16,coco/2017',
                 'detection.py:B_16,det:~/coco']:
    config = parse(recipe)
    config.pretrained_path = str(pretrained) if config.pretrained_path else None
    config_lib.check(config, device_count=8)


def test_robustness_recipe_evaluates_an_imagenet_classifier_on_every_shift(tmp_path):
  from vit_jax import models, test_utils
  test_utils.create_checkpoint(models.get_config('testing'), str(tmp_path / 'in1k.npz'),
                               num_classes=1000, image_size=32)
  config = parse(f'robustness.py:{tmp_path / "in1k.npz"}')
  config_lib.check(config, device_count=8)
  assert config.trainer == 'evaluate' and config.pp.crop == (32, 32)
  assert {k: (v.type, v.get('dataset'), v.get('classes')) for k, v in config.evals.items()} == {
      'test': ('classification', '', 'all'),
      'real': ('classification', 'imagenet2012_real', 'all'),
      'v2': ('classification', 'imagenet_v2', 'all'),
      'sketch': ('classification', 'imagenet_sketch', 'all'),
      'imagenet_a': ('classification', 'imagenet_a', 'present'),
      'imagenet_r': ('classification', 'imagenet_r', 'present'),
      'imagenet_c': ('corruption', 'imagenet2012_corrupted', None)}
  assert len(config.evals.imagenet_c.corruptions) * len(config.evals.imagenet_c.severities) == 75
  test_utils.create_checkpoint(models.get_config('testing'), str(tmp_path / 'ten.npz'),
                               num_classes=10, image_size=32)
  with pytest.raises(Exception, match=r'ten.npz has a head of 10 classes: the robustness suite'):
    parse(f'robustness.py:{tmp_path / "ten.npz"}')
  config.evals.imagenet_c.corruptions = ('fogg',)
  with pytest.raises(ValueError, match=r"evals.imagenet_c.corruptions=\('fogg',\): expected"):
    config_lib.check(config, device_count=8)


@pytest.mark.parametrize('decay_type, expected', [
    ('linear', {0: 0.0, 50: 0.5, 100: 1.0, 550: 0.5, 1000: 0.0}),
    ('cosine', {0: 0.0, 50: 0.5, 100: 1.0, 550: 0.5, 1000: 0.0}),
])
def test_schedules(decay_type, expected):
  c = config_lib.base_config()
  c.update(decay_type=decay_type, base_lr=1.0, warmup_steps=100, total_steps=1000)
  schedule = optim.make_schedule(c)
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step
  if decay_type == 'cosine':  # A quarter into the decay: (1 + cos(pi / 4)) / 2.
    assert float(schedule(325)) == pytest.approx((1 + np.cos(np.pi / 4)) / 2, abs=1e-6)
  else:
    assert float(schedule(325)) == pytest.approx(0.75, abs=1e-6)


def test_weight_decay_touches_kernels_only():
  c = config_lib.base_config()
  c.update(optimizer='adam', weight_decay=0.1, base_lr=1.0, warmup_steps=0, total_steps=10)
  params = {'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'LayerNorm_0': {'scale': jnp.ones(2)}, 'cls': jnp.ones((1, 1, 2))}
  tx = optim.make_optimizer(c)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['Dense_0']['kernel'], 1 - 0.1, rtol=1e-6)  # lr x wd x param.
  for unchanged in (new['Dense_0']['bias'], new['LayerNorm_0']['scale'], new['cls']):
    np.testing.assert_array_equal(unchanged, 1.0)


@pytest.mark.parametrize('scan', [False, True])
def test_layer_decay_scales_each_depth_of_the_update(scan):
  """decay ** (layers + 1 - depth): embeddings at depth 0, block i at i + 1, the rest last."""
  c = config_lib.base_config()
  c.update(optimizer='sgd', momentum=0.0, base_lr=1.0, warmup_steps=0, total_steps=10,
           layer_decay=0.5)
  c.model.transformer.num_layers = 3
  blocks = ({'Transformer': {'encoderblock': {'w': jnp.ones((3, 2))}}} if scan else
            {'Transformer': {f'encoderblock_{i}': {'w': jnp.ones(2)} for i in range(3)}})
  params = {'embedding': {'kernel': jnp.ones(2)}, 'decoder': {'w': jnp.ones(2)}, **blocks}
  params['Transformer']['posembed_input'] = {'pos_embedding': jnp.ones(2)}
  tx = optim.make_optimizer(c)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  # Gradient norm 1 after clipping: every gradient entry is 1 / sqrt(count).
  entry = -1 / np.sqrt(sum(x.size for x in jax.tree.leaves(params)))
  np.testing.assert_allclose(updates['embedding']['kernel'], entry * 0.5 ** 4, rtol=1e-6)
  np.testing.assert_allclose(updates['Transformer']['posembed_input']['pos_embedding'],
                             entry * 0.5 ** 4, rtol=1e-6)
  np.testing.assert_allclose(updates['decoder']['w'], entry, rtol=1e-6)
  got = (updates['Transformer']['encoderblock']['w'][:, 0] if scan else
         [updates['Transformer'][f'encoderblock_{i}']['w'][0] for i in range(3)])
  np.testing.assert_allclose(got, entry * 0.5 ** np.array([3, 2, 1]), rtol=1e-6)


@pytest.mark.parametrize('optimizer, moments', [('adam', ('mu',)), ('sgd', ('trace',))])
def test_optim_dtype_sets_the_first_moment_only(optimizer, moments):
  params = {'kernel': jnp.ones((4, 4))}
  dtypes = {}
  for optim_dtype in ('float32', 'bfloat16'):
    c = config_lib.base_config()
    c.update(optimizer=optimizer, optim_dtype=optim_dtype)
    state = optim.make_optimizer(c).init(params)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    dtypes[optim_dtype] = {jax.tree_util.keystr(p): x.dtype for p, x in leaves if x.ndim == 2}
  for path, dtype in dtypes['bfloat16'].items():
    expected = jnp.bfloat16 if any(f'.{m}' in path for m in moments) else jnp.float32
    assert dtype == expected, path
  assert set(dtypes['float32'].values()) == {jnp.dtype(jnp.float32)}
  assert any(dtype == jnp.bfloat16 for dtype in dtypes['bfloat16'].values())
