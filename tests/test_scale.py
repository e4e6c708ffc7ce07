"""What large runs use: a scanned encoder with rematerialisation policies, fused attention, FSDP
over scanned parameters, the scanned <-> per-layer checkpoint boundary, a TensorFlow-free train
step, and benchmarks/plan.py's contract."""

import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, assert_same_params, load_npz, tiny_config
from vit_jax import checkpoint, config_lib, models, sharding
from vit_jax.models_vit import VisionTransformer

IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 8, 3))


def small_config(**transformer):
  config = models.get_config('testing')
  config.hidden_size = 16
  config.patches.size = (4, 4)
  config.transformer.update(num_layers=3, num_heads=2, mlp_dim=24, dropout_rate=0.0)
  config.transformer.update(**transformer)
  return config


def random_params(model):
  """Parameters with no zeros or ones (the head's zero init would hide the encoder)."""
  params = jax.jit(model.init, static_argnames='train')(jax.random.PRNGKey(0), IMAGES,
                                                         train=False)['params']
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)


def stacked(params):
  return flax.traverse_util.unflatten_dict(
      checkpoint.stack_layers(flax.traverse_util.flatten_dict(params)))


def per_layer(params):
  return flax.traverse_util.unflatten_dict(
      checkpoint.unstack_layers(flax.traverse_util.flatten_dict(params)))


def loss_and_grads(model, params, dtype=jnp.float32):
  model = model.clone(dtype=dtype)
  loss = lambda p: jnp.sum(model.apply({'params': p}, IMAGES, train=False).astype(jnp.float32)**2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('remat, posemb, dtype', [
    ('none', 'learn', 'float32'),
    ('full', 'relative', 'float32'),
    ('dots_no_batch', 'learn', 'bfloat16'),
])
def test_scanned_encoder_computes_what_the_unrolled_one_computes(remat, posemb, dtype):
  """Same loss and gradients (per layer) with the blocks under nn.scan and a remat policy;
  bfloat16 activations included."""
  unrolled = VisionTransformer(num_classes=3, **small_config(posemb=posemb))
  scanned = VisionTransformer(num_classes=3, **small_config(posemb=posemb, scan=True,
                                                             remat=remat))
  params = random_params(unrolled)
  scanned_init = jax.eval_shape(
      lambda: scanned.init(jax.random.PRNGKey(0), IMAGES, train=False))['params']
  assert jax.tree.structure(stacked(params)) == jax.tree.structure(scanned_init)
  assert scanned_init['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'].shape == (
      3, 16, 24)

  loss, grads = loss_and_grads(unrolled, params, jnp.dtype(dtype))
  scanned_loss, scanned_grads = loss_and_grads(scanned, stacked(params), jnp.dtype(dtype))
  # bfloat16: XLA rounds at the loop boundary under scan where it fuses across blocks unrolled.
  tolerance = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(scanned_loss, loss, rtol=tolerance)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance),
               per_layer(scanned_grads), grads)


@pytest.mark.parametrize('posemb', ['learn', 'relative'])
def test_dot_product_attention_gives_the_einsum_logits(posemb):
  einsum = VisionTransformer(num_classes=3, **small_config(posemb=posemb))
  fused = VisionTransformer(num_classes=3, **small_config(posemb=posemb,
                                                           attention='dot_product'))
  params = random_params(einsum)
  logits = lambda model: jax.jit(model.apply, static_argnames='train')(
      {'params': params}, IMAGES, train=False)
  np.testing.assert_allclose(logits(fused), logits(einsum), atol=1e-6)


def test_attention_analysis_needs_the_einsum_path():
  from vit_jax import analysis
  fused = VisionTransformer(num_classes=3, **small_config(attention='dot_product'))
  with pytest.raises(ValueError, match="attention='einsum'"):
    analysis.attention_weights(fused, random_params(fused), IMAGES)


def test_stochastic_depth_works_under_scan():
  """(The rate per traced layer index: test_model_variants.)"""
  scanned = VisionTransformer(num_classes=3, **small_config(scan=True, stochastic_depth=0.5))
  params = random_params(scanned)
  apply = jax.jit(lambda rng: scanned.apply({'params': params}, IMAGES, train=True,
                                            rngs={'dropout': rng}))
  outputs = [apply(jax.random.PRNGKey(s)) for s in range(3)]
  assert not all(np.allclose(outputs[0], o) for o in outputs[1:])


def test_fsdp_never_splits_a_scanned_layer_axis():
  mesh = jax.sharding.AbstractMesh((8,), (sharding.DATA_AXIS,))
  leaf = jax.ShapeDtypeStruct((8, 4, 2), jnp.float32)
  spec = lambda tree: jax.tree.leaves(sharding.state_shardings(mesh, tree, 'fsdp'))[0].spec
  P = jax.sharding.PartitionSpec
  assert spec({'Transformer': {'encoderblock': {'kernel': leaf}}}) == P()
  assert spec({'Transformer': {'encoderblock_0': {'kernel': leaf}}}) == P('data', None, None)
  wide = jax.ShapeDtypeStruct((8, 16, 2), jnp.float32)
  assert spec({'Transformer': {'encoderblock': {'kernel': wide}}}) == P(None, 'data', None)


def test_per_layer_file_loads_into_a_scanned_model_and_exports_per_layer(tmp_path):
  unrolled = VisionTransformer(num_classes=3, **small_config(posemb='relative'))
  scanned = VisionTransformer(num_classes=3, **small_config(posemb='relative', scan=True))
  params = random_params(unrolled)
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path)
  loaded = checkpoint.load_pretrained(
      pretrained_path=path, init_params=jax.jit(scanned.init, static_argnames='train')(
          jax.random.PRNGKey(0), IMAGES, train=False)['params'],
      model_config=small_config(), reinit_head=False)
  np.testing.assert_allclose(scanned.apply({'params': loaded}, IMAGES, train=False),
                             unrolled.apply({'params': params}, IMAGES, train=False), atol=1e-6)
  again = str(tmp_path / 'again.npz')
  config = small_config(posemb='relative', scan=True, remat='full')
  checkpoint.save(loaded, again, model_config=config, image_size=(12, 8))
  assert load_npz(again).keys() == load_npz(path).keys() | {checkpoint.DESCRIPTION_KEY}
  described = checkpoint.load_model(again).config
  assert not described.transformer.scan and described.transformer.remat == 'none'


def test_config_check_names_bad_remat_and_attention_choices():
  for overrides, message in [({'remat': 'all'}, "model.transformer.remat='all'; expected one of"),
                             ({'attention': 'flash'}, "model.transformer.attention='flash'"),
                             ({'attention': 'dot_product', 'attention_dropout_rate': 0.1},
                              'attention_dropout_rate=0.1 needs the attention probabilities')]:
    config = config_lib.base_config()
    config.model.transformer.update(**overrides)
    with pytest.raises(ValueError, match=message):
      config_lib.check(config, device_count=1)


# ------------------------------------------------------------------------ runs and benchmarks

# Two layers, no dropout (whose masks differ under scan: the layers' random streams are split).
SCANNED = ['--config.model.transformer.num_layers=2', '--config.model.transformer.dropout_rate=0.0']


@pytest.fixture(scope='module')
def scanned_run(tmp_path_factory):
  from helpers import built_once
  from vit_jax import train
  config = tiny_config(*SCANNED, '--config.model.transformer.scan=True',
                       '--config.model.transformer.remat=full')
  workdir = built_once(tmp_path_factory, 'scanned_run',
                       lambda path: train.train_and_evaluate(config, str(path)))
  return str(workdir), json.loads((workdir / 'results.json').read_text())


def test_scanned_run_trains_like_the_unrolled_one_and_exports_per_layer(scanned_run, tmp_path):
  """From the same (per-layer) start, the same steps; the export is per-layer either way. (From
  scratch the two differ: a scanned encoder draws each layer's initialisation from its own
  split of the random stream.)"""
  from vit_jax import train
  workdir, _ = scanned_run
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in load_npz(f'{workdir}/model.npz')
  start = ['--config.total_steps=3', '--config.reinit_head=False',
           f'--config.pretrained_path={workdir}/model.npz']
  results = {}
  for scan in (True, False):
    config = tiny_config(*SCANNED, *start, f'--config.model.transformer.scan={scan}')
    results[scan] = train.train_and_evaluate(config, str(tmp_path / str(scan)))
  assert results[True]['train_loss'] == pytest.approx(results[False]['train_loss'], rel=1e-5)
  assert_same_params(load_npz(tmp_path / 'True' / 'model.npz'),
                     load_npz(tmp_path / 'False' / 'model.npz'), atol=1e-5)


def test_scanned_run_resumes_identically(scanned_run, tmp_path):
  from vit_jax import train
  workdir, _ = scanned_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  os.remove(os.path.join(resumed, 'model.npz'))
  # Another remat policy computes the same state: the run may resume with it.
  config = tiny_config(*SCANNED, '--config.model.transformer.scan=True',
                       '--config.model.transformer.remat=dots')
  train.train_and_evaluate(config, resumed)
  assert_same_params(load_npz(f'{resumed}/model.npz'), load_npz(f'{workdir}/model.npz'))


def test_train_step_runs_without_tensorflow():
  """benchmarks/throughput.py's path on an install without TensorFlow (nor clu), as on a GPU
  machine, in the GPU benchmark's settings (bfloat16 activations, fused attention's call)."""
  script = '''
import sys
sys.modules['tensorflow'] = None  # Any import of it now fails.
sys.modules['clu'] = None
sys.path.insert(0, 'benchmarks')
sys.argv = ['throughput.py', '--model', 'testing', '--res', '16', '--batch', '2',
            '--infer_batch', '2', '--repeats', '1', '--dtype', 'bfloat16',
            '--attention', 'dot_product', '--json']
import throughput
throughput.mfu.matmul_peak_flops = lambda: 1e9
throughput.main()
assert 'tensorflow' not in sys.modules or sys.modules['tensorflow'] is None
'''
  run = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.splitlines()[-1])
  assert results['train_img_s'] > 0 and results['infer_img_s'] > 0
  assert (results['dtype'], results['attention']) == ('bfloat16', 'dot_product')
  assert results['peak_gflops'] == 1.0 and results['train_mfu'] > 0
  assert results['device'].startswith('cpu') and results['peak_device_memory_mb'] is None


def test_plan_reports_memory_flops_and_compile_time_as_json():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, 'benchmarks/plan.py', '--model', 'testing', '--res', '32', '--batch', '8',
       '--devices', '2', '--fsdp', '--scan', '--remat', 'full', '--optim_dtype', 'bfloat16',
       '--attention', 'dot_product', '--json'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  plan = json.loads(run.stdout.splitlines()[-1])
  assert plan['devices'] == 2 and plan['scan'] and plan['remat'] == 'full'
  assert plan['total_gib'] == pytest.approx(plan['argument_gib'] + plan['temp_gib'])
  assert plan['tflop_per_device'] > 0 and plan['compile_s'] > 0 and plan['temp_gib'] > 0
