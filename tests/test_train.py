"""The training system end to end on a tiny ViT and the embedded digits: results, export,
resume, accumulation, and the same run on 1 and on 8 (simulated) devices."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (COUNTED, TINY, assert_same_params, built_once, load_npz, run_main, scalars,
                     tiny_config, write_class_folders)
from vit_jax import evaluators, input_pipeline, objectives, optim, sharding, steps, train

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = built_once(tmp_path_factory, 'trained', lambda path: train.train_and_evaluate(
      tiny_config('--config.profile_steps=2'), str(path)))
  return str(workdir), json.loads((workdir / 'results.json').read_text())


def test_run_writes_results_checkpoints_events_and_export(trained):
  workdir, results = trained
  with open(os.path.join(workdir, 'results.json')) as f:
    written = json.load(f)
  assert written['test'] == results['test']
  assert set(written) == {'test', 'step', 'train_loss', 'wall_time_sec', 'segments'}
  test = written['test']
  assert set(test) == {'accuracy_test', 'accuracy_test_top5', 'loss_test', 'ece_test',
                       'reliability_test'}
  assert written['step'] == 6 and 0 <= test['accuracy_test'] <= test['accuracy_test_top5']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in load_npz(
      os.path.join(workdir, 'model.npz'))


def test_profile_steps_write_a_trace_for_tensorboard(trained):
  workdir, _ = trained
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_exported_model_loads_and_evaluates_the_same(trained, tmp_path):
  workdir, results = trained
  config = tiny_config('--config.trainer=evaluate',
                       f'--config.pretrained_path={workdir}/model.npz')
  with config.unlocked():  # Every listed evaluator, side by side (as validation, ReaL, v2).
    config.evals.train = evaluators.classification('train', every=1)
  evaluated = train.evaluate(config, str(tmp_path))
  assert evaluated.keys() == {'test', 'train'}
  assert scalars(evaluated['test']) == pytest.approx(scalars(results['test']), abs=1e-6)
  assert evaluated['train'] != evaluated['test']
  with open(tmp_path / 'eval_results.json') as f:
    entries = json.load(f)
  assert len(entries) == 1 and scalars(entries[0]['test']) == pytest.approx(
      scalars(results['test']), abs=1e-6)
  assert entries[0]['evaluated'] == f'{workdir}/model.npz'


def test_evaluate_without_anything_to_evaluate_says_so(tmp_path):
  with pytest.raises(ValueError, match='Nothing to evaluate'):
    train.evaluate(tiny_config('--config.trainer=evaluate'), str(tmp_path))


def test_resume_continues_at_the_checkpoint_and_ends_identical(trained, tmp_path, monkeypatch):
  workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  for name in ('model.npz', 'results.json'):
    os.remove(os.path.join(resumed, name))
  starts = []
  original = input_pipeline.train_batches

  def recording(*args, start_step, **kwargs):
    starts.append(start_step)
    return original(*args, start_step=start_step, **kwargs)

  monkeypatch.setattr(input_pipeline, 'train_batches', recording)
  train.train_and_evaluate(tiny_config(), resumed)
  assert starts == [3]
  assert_same_params(load_npz(f'{resumed}/model.npz'), load_npz(f'{workdir}/model.npz'))


def test_finetune_from_export_at_higher_resolution(trained, tmp_path):
  workdir, _ = trained
  config = tiny_config('--config.pp.crop=12', f'--config.pretrained_path={workdir}/model.npz',
                       '--config.total_steps=2',
                       '--config.warmup_steps=1', '--config.reinit_head=True')
  config.model.representation_size = None
  results = train.train_and_evaluate(config, str(tmp_path))
  params = load_npz(tmp_path / 'model.npz')
  assert params['Transformer/posembed_input/pos_embedding'].shape == (1, 10, 16)
  assert 'pre_logits/kernel' not in params and results['step'] == 2


def test_accumulation_equals_full_batch():
  config = tiny_config('--config.accum_steps=4')
  mesh = sharding.make_mesh()
  objective = objectives.from_config(config, 10)
  model = steps.create_model(config, objective.num_outputs)
  tx, schedule = optim.make_optimizer(config), optim.make_schedule(config)
  state, shardings = steps.init_state(config, model, tx, mesh, (8, 8), objective)
  source = input_pipeline.get_source(config, 'train')
  batch = sharding.to_global(next(input_pipeline.train_batches(config, source, batch_size=32)),
                             mesh)
  copy = jax.tree.map(jnp.copy, state)
  step_fn = lambda: steps.make_train_step(config, model, tx, schedule, shardings, mesh, objective)
  accumulated, m4 = step_fn()(state, batch)
  config.accum_steps = 1
  full, m1 = step_fn()(copy, batch)
  assert float(m4['train_loss']) == pytest.approx(float(m1['train_loss']), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               accumulated['params'], full['params'])
  assert int(accumulated['step']) == 1


@pytest.mark.parametrize('strategy', ['replicate', 'fsdp'])
def test_eight_devices_give_the_same_run_as_one(trained, tmp_path, strategy):
  workdir, results = trained
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  run = run_main(*TINY, f'--config.sharding={strategy}', f'--workdir={tmp_path}', env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Mesh: 8 devices' in run.stderr
  assert re.search(r'img/s/core, [0-9.]+ [GT]FLOP/s/device \(MFU [0-9.]+%\)', run.stderr)
  with open(tmp_path / 'results.json') as f:
    eight = json.load(f)
  assert eight['train_loss'] == pytest.approx(results['train_loss'], rel=1e-5)
  assert [eight['test'][k] for k in COUNTED] == [results['test'][k] for k in COUNTED]
  assert scalars(eight['test']) == pytest.approx(scalars(results['test']), abs=1e-6)
  assert_same_params(load_npz(tmp_path / 'model.npz'), load_npz(f'{workdir}/model.npz'), atol=5e-6)


def test_class_folders_with_sliced_splits_train_and_evaluate(tmp_path):
  """An ImageNet-21k-like folder (<root>/<class>/*.jpg, no split folders): trained on
  train[:80%], evaluated on the held-out train[80%:]."""
  write_class_folders(tmp_path / 'data')
  config = tiny_config(f'--config.dataset=folder:{tmp_path / "data"}',
                       '--config.train_split=train[:80%]', '--config.test_split=train[80%:]')
  results = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert results['step'] == 6 and 0 <= results['test']['accuracy_test'] <= 1
  assert load_npz(tmp_path / 'workdir' / 'model.npz')['head/kernel'].shape == (16, 3)


def test_report_prints_each_evaluator(trained, tmp_path, capsys):
  from vit_jax import report
  workdir, results = trained
  earlier = tmp_path / 'earlier'  # results.json as runs before evaluators wrote it.
  earlier.mkdir()
  (earlier / 'results.json').write_text(json.dumps(dict(results['test'], step=3,
                                                        wall_time_sec=1.0)))
  report.main([workdir, str(earlier)])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3 and lines[1].split()[1:3] == [
      '6', f'{results["test"]["accuracy_test"]:.2%}']
  assert lines[2].split()[1:3] == ['3', f'{results["test"]["accuracy_test"]:.2%}']


def test_progress_reports_flops_per_second_and_mfu():
  class Writer:
    def write_scalars(self, step, scalars):
      self.scalars = scalars

  writer = Writer()
  progress = train.Progress(100, 8, writer, train_flops_per_image=3e9, peak_flops=1e11)
  progress.start(0)
  progress.last_time -= 2.0  # 10 steps of 8 images in 2 s: 40 img/s on each of the devices.
  progress.report(10, [{'train_loss': 1.0, 'lr': 0.1}])
  img_sec_core = writer.scalars['img_sec_core_train']
  assert img_sec_core == pytest.approx(40 / jax.device_count(), rel=1e-2)
  assert writer.scalars['tflops_per_device_train'] == pytest.approx(img_sec_core * 3e9 / 1e12)
  assert writer.scalars['mfu_train'] == pytest.approx(img_sec_core * 3e9 / 1e11)
  from vit_jax import mfu, models
  from vit_jax.models_vit import VisionTransformer
  model = VisionTransformer(num_classes=1000, **models.get_config('ViT-B_16'))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False)['params'])
  # The paper's 17.6 G multiply-adds for ViT-B/16 at 224 px, counted by XLA.
  assert mfu.forward_flops_per_image(model, params, (224, 224)) / 1e9 == pytest.approx(35.2,
                                                                                      rel=0.01)
