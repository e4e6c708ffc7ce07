"""The fault catalogue, second hunt: a deleted lock, restarts, non-finite numbers, folders that
changed, resumes that change their source, files that lie about themselves, bad flags.

As in test_data_safety.py, each test does the wrong thing to a copy of a finished run (or to a
file) and checks that what existed before is byte-for-byte what it was.
"""

import json
import os
import pickle
import shutil

import jax
import numpy as np
import optax
import pytest

from helpers import (TINY, assert_unchanged, load_npz, parse_config, scalars, snapshot,
                     tiny_config, write_class_folders)
from vit_jax import checkpoint, fewshot, predict, report, resume, sharding, steps, train
from vit_jax.workdir import (CLASSES_FILE, HISTORY_FILE, LOCK_FILE, WorkdirLockLost,
                             WorkdirMismatchError)

HISTORY = HISTORY_FILE


# ------------------------------------------------------------------ 1. the lock deleted

@pytest.mark.parametrize('how', ['deleted', 'replaced'])
def test_a_run_whose_lock_is_deleted_stops_and_writes_nothing_more(tmp_path, monkeypatch, how):
  workdir = tmp_path / 'run'
  lock = workdir / LOCK_FILE
  reached = resume.Preemption.reached

  def at_step_4_someone_deletes_the_lock(self, step):
    if step == 4:
      lock.unlink()
      if how == 'replaced':  # A second run locked a new file and uses the workdir.
        lock.write_text('pid 1 on another-host\n')
    return reached(self, step)

  monkeypatch.setattr(resume.Preemption, 'reached', at_step_4_someone_deletes_the_lock)
  with pytest.raises(WorkdirLockLost, match=r'lock (was deleted|was replaced by another '
                                                   r'file).* \(at step 4\)'):
    train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  assert not (workdir / 'model.npz').exists() and not (workdir / 'results.json').exists()
  if how == 'replaced':
    assert lock.read_text() == 'pid 1 on another-host\n'


# --------------------------------------------------------- 2. results accumulate over starts

def test_restarting_a_finished_run_or_resuming_keeps_its_results(run_copy):
  workdir, before = run_copy
  first = json.loads((workdir / 'results.json').read_text())
  assert len(first['segments']) == 1 and first['train_loss'] is not None
  train.train_and_evaluate(tiny_config(), str(workdir))  # Finished: nothing to train.
  again = json.loads((workdir / 'results.json').read_text())
  assert again['train_loss'] == first['train_loss']
  assert scalars(again['test']) == pytest.approx(scalars(first['test']), abs=1e-6)
  assert [(s['start_step'], s['end_step']) for s in again['segments']] == [(0, 6), (6, 6)]
  assert again['wall_time_sec'] == pytest.approx(sum(s['wall_time_sec'] for s in
                                                     again['segments']), abs=1e-3)
  assert again['wall_time_sec'] > first['wall_time_sec']
  train.train_and_evaluate(tiny_config('--config.total_steps=8'), str(workdir))
  resumed = json.loads((workdir / 'results.json').read_text())
  assert resumed['step'] == 8 and resumed['train_loss'] != first['train_loss']
  assert len(resumed['segments']) == 3 and resumed['wall_time_sec'] > again['wall_time_sec']
  assert_unchanged(before, workdir, except_for=[HISTORY, 'model.npz', 'results.json'])


# ------------------------------------------------------------ 3. non-finite numbers

@pytest.mark.parametrize('override, message', [
    ('--config.base_lr=nan', r'base_lr=nan is not a finite number'),
    ('--config.base_lr=inf', r'base_lr=inf is not a finite number'),
    ('--config.b1=nan', r'b1=nan is not a finite number'),
    ('--config.b2=1.5', r'b2=1.5 must lie in \[0, 1\)'),
    ('--config.evals.fewshot.l2_reg=-1', r'evals.fewshot.l2_reg=-1.0 must be positive'),
    ('--config.evals.fewshot.l2_reg=nan', r'evals.fewshot.l2_reg=nan is not a finite number'),
])
def test_non_finite_hyper_parameters_are_refused_before_any_work(run_copy, override, message):
  workdir, before = run_copy
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(override, '--config.total_steps=9',
                                         '--config.evals.fewshot.every=3'), str(workdir))
  assert_unchanged(before, workdir)


def test_a_non_finite_update_is_neither_applied_nor_saved(tmp_path, monkeypatch):
  make_optimizer = train.optim.make_optimizer  # Finite loss and gradients, a NaN update.
  monkeypatch.setattr(train.optim, 'make_optimizer', lambda config: optax.chain(
      make_optimizer(config), optax.scale(float('nan'))))
  with pytest.raises(FloatingPointError, match=r'Non-finite training at step 1: .*update_norm '
                                               r'nan.*not applied'):
    train.train_and_evaluate(tiny_config('--config.checkpoint_every=1'), str(tmp_path))
  assert not os.listdir(tmp_path / 'checkpoints')
  assert not (tmp_path / 'model.npz').exists()


def test_non_finite_parameters_are_refused_by_every_reader(finished, tmp_path):
  params = load_npz(finished / 'model.npz')
  params['Transformer/encoder_norm/scale'][3] = np.nan
  path = tmp_path / 'diverged.npz'
  np.savez(path, **params)
  message = rf'{path} holds parameters that are not finite .*Transformer/encoder_norm/scale'
  for read in (checkpoint.load_model, predict.load_classifier,
               lambda p: fewshot.evaluate_checkpoint(p, dataset='digits')):
    with pytest.raises(checkpoint.NonFiniteParametersError, match=message):
      read(str(path))
  for trainer in ('evaluate', 'train'):
    workdir = tmp_path / trainer
    config = tiny_config(f'--config.trainer={trainer}', f'--config.pretrained_path={path}')
    with pytest.raises(checkpoint.NonFiniteParametersError, match=message):
      (train.evaluate if trainer == 'evaluate' else train.train_and_evaluate)(config, str(workdir))
    assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')


def test_a_checkpoint_saved_with_non_finite_parameters_is_refused_naming_its_step(run_copy):
  workdir, _ = run_copy
  config = tiny_config()
  model = steps.create_model(config, 10)
  tx = train.optim.make_optimizer(config)
  objective = train.objectives.from_config(config, 10)
  abstract, _ = steps.abstract_state(config, model, tx, sharding.make_mesh(), (8, 8),
                                     objective)
  checkpoints = resume.Checkpoints(str(workdir), keep=3)
  state = checkpoints.restore_latest(abstract)
  state['params'] = jax.tree.map(lambda p: p * np.nan, state['params'])
  checkpoints.save(9, state)  # As versions that applied a NaN update saved it.
  checkpoints.wait()
  before = snapshot(workdir)
  for trainer in ('train', 'evaluate'):
    with pytest.raises(checkpoint.NonFiniteParametersError,
                       match=r'checkpoint of step 9 .* not finite .*mv .*checkpoints/9 '):
      (train.evaluate if trainer == 'evaluate' else train.train_and_evaluate)(
          tiny_config(f'--config.trainer={trainer}', '--config.total_steps=12'), str(workdir))
    assert_unchanged(before, workdir)


# ---------------------------------------------------- 5. folders are what they say they are

def folder_args(root):
  return [f'--config.dataset=folder:{root}', '--config.train_split=train[:50%]',
          '--config.test_split=train[50%:]', '--config.batch=8', '--config.batch_eval=8']


def test_a_renamed_class_folder_is_refused_on_resume_and_evaluate(tmp_path):
  images, workdir = write_class_folders(tmp_path / 'images', per_class=4), tmp_path / 'run'
  train.train_and_evaluate(tiny_config(*folder_args(images)), str(workdir))
  assert json.loads((workdir / CLASSES_FILE).read_text()) == ['cat', 'dog', 'owl']
  os.rename(images / 'dog', images / 'emu')  # Same count: every label after 'cat' shifts.
  before = snapshot(workdir)
  message = (r"trained on other classes .*added \['emu'\], removed \['dog'\]; label 1: 'dog' "
             r"then, 'emu' now")
  for trainer in ('train', 'evaluate'):
    with pytest.raises(WorkdirMismatchError, match=message):
      (train.evaluate if trainer == 'evaluate' else train.train_and_evaluate)(
          tiny_config(*folder_args(images), f'--config.trainer={trainer}',
                      '--config.total_steps=9'), str(workdir))
    assert_unchanged(before, workdir)


def test_hidden_entries_are_no_classes_and_one_class_is_refused(tmp_path):
  images = write_class_folders(tmp_path / 'images', classes=('cat', 'dog'), per_class=4)
  write_class_folders(images / '.ipynb_checkpoints', classes=('x',), per_class=1)
  shutil.copy(images / 'cat' / 'cat_0.jpg', images / 'dog' / '._dog_0.jpg')  # macOS litter.
  (images / '__MACOSX').mkdir()
  from vit_jax import input_pipeline
  source = input_pipeline.get_source(tiny_config(*folder_args(images)), 'train')
  assert source.class_names == ('cat', 'dog') and source.num_examples == 8
  one = write_class_folders(tmp_path / 'one', classes=('cat',), per_class=4)
  with pytest.raises(ValueError, match=r'folder:.*one has 1 class: a softmax over one class'):
    train.train_and_evaluate(tiny_config(*folder_args(one)), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  config = tiny_config(*folder_args(one))
  with pytest.raises(ValueError, match=r'No few-shot evaluation possible: the dataset has 1 class'):
    fewshot.evaluate(config, None, None, input_pipeline.get_source(config, 'train'), None, None)


# ----------------------------------------------------------------- 6. resuming is honest

def test_resuming_with_another_pretrained_path_is_refused_naming_both(finished, tmp_path):
  workdir = tmp_path / 'finetune'
  finetune = ['--config=configs/digits.py:finetune',
              *[a for a in TINY[1:] if 'representation_size' not in a]]
  source = tmp_path / 'source.npz'
  shutil.copy(finished / 'model.npz', source)
  train.train_and_evaluate(parse_config(*finetune, f'--config.pretrained_path={source}'),
                           str(workdir))
  other = tmp_path / 'other.npz'
  shutil.copy(finished / 'model.npz', other)
  before = snapshot(workdir)
  with pytest.raises(WorkdirMismatchError,
                     match=rf"started from pretrained_path='{source}'; this run names "
                           rf"pretrained_path='{other}'"):
    train.train_and_evaluate(parse_config(*finetune, f'--config.pretrained_path={other}',
                                          '--config.total_steps=9'), str(workdir))
  assert_unchanged(before, workdir)


def test_an_export_whose_description_contradicts_its_arrays_is_refused(finished, tmp_path):
  params = load_npz(finished / 'model.npz')
  description = json.loads(params[checkpoint.DESCRIPTION_KEY].tobytes())

  def write(name, **changes):
    described = json.loads(json.dumps(description))
    for key, value in changes.items():
      target = described
      *parents, last = key.split('.')
      for parent in parents:
        target = target[parent]
      target[last] = value
    path = tmp_path / name
    np.savez(path, **dict(params, **{checkpoint.DESCRIPTION_KEY: np.frombuffer(
        json.dumps(described).encode(), np.uint8)}))
    return str(path)

  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'(?s)does not hold the model its '
                     r'vit_jax_description describes.*missing.*encoderblock_1'):
    checkpoint.load_model(write('layers.npz', **{'model.transformer.num_layers': 2}))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'unexpected.*\n.*Transformer/posembed_input/pos_embedding'):
    checkpoint.load_model(write('sincos.npz', **{'model.transformer.posemb': 'sincos2d'}))
  with pytest.raises(ValueError, match=r'garbled.npz: its vit_jax_description .* not valid JSON'):
    path = tmp_path / 'garbled.npz'
    np.savez(path, **dict(params, **{checkpoint.DESCRIPTION_KEY: np.frombuffer(b'{no', np.uint8)}))
    checkpoint.load_model(str(path))
  with pytest.raises(ValueError, match=r'names.npz: its vit_jax_description has class_names '
                     r'that are not 10 strings'):
    checkpoint.load_model(write('names.npz', class_names=['cat', 'dog']))
  with pytest.raises(ValueError, match=r'pp.npz: its vit_jax_description has a preprocessing that'):
    checkpoint.read_description(write('pp.npz', preprocessing={'mean': [0.5] * 3,
                                                               'std': [0.0] * 3}))
  del description['model']
  with pytest.raises(ValueError, match=r'nomodel.npz: its vit_jax_description lacks model'):
    checkpoint.load_model(write('nomodel.npz'))


# ------------------------------------------------------------------------ 7. named errors

def test_files_that_are_not_checkpoints_are_named_for_what_they_are(finished, tmp_path):
  text = tmp_path / 'notes.txt'
  text.write_text('not a checkpoint')
  pickled = tmp_path / 'pytorch_model.bin'
  pickled.write_bytes(pickle.dumps({'weight': [1.0]}))
  cases = [(text, r"notes.txt is not an .npz archive \(it begins with b'not a checkpoint'\)"),
           (pickled, r'pytorch_model.bin is a Python pickle .* which vit_jax never loads'),
           (finished / 'checkpoints' / '6', r'is a train-state checkpoint of a run .*Use the '
                                            rf'model the run exported, {finished}/model.npz'),
           (finished, rf'is a workdir, not a model file: its model is {finished}/model.npz')]
  for path, message in cases:
    for read in (checkpoint.load_model, checkpoint.read_description):
      with pytest.raises(ValueError, match=message) as e:
        read(str(path))
      assert 'allow_pickle' not in str(e.value)


def test_few_shot_on_a_masked_patch_prediction_export_is_named(finished, tmp_path):
  params = load_npz(finished / 'model.npz')
  description = json.loads(params[checkpoint.DESCRIPTION_KEY].tobytes())
  description['model']['classifier'] = 'unpooled'
  description['model']['representation_size'] = None
  del params['pre_logits/kernel'], params['pre_logits/bias'], params['cls']
  table = 'Transformer/posembed_input/pos_embedding'
  params[table] = params[table][:, 1:]  # No class token: one output per patch.
  params[checkpoint.DESCRIPTION_KEY] = np.frombuffer(json.dumps(description).encode(), np.uint8)
  params['mask_token'] = np.zeros((1, 1, 16), np.float32)
  np.savez(tmp_path / 'mpp.npz', **params)
  with pytest.raises(ValueError, match=r"one output per patch \(classifier='unpooled'"):
    fewshot.evaluate_checkpoint(str(tmp_path / 'mpp.npz'), dataset='digits')


def test_report_shows_masked_patch_prediction_metrics(tmp_path, capsys):
  (tmp_path / 'results.json').write_text(json.dumps({
      'step': 6, 'train_loss': 5.1, 'wall_time_sec': 12.0, 'test': {
          'mpp_accuracy_test': 0.25, 'mpp_accuracy_test_top5': 0.5, 'loss_test': 5.0}}))
  report.main([str(tmp_path)])
  row = capsys.readouterr().out.splitlines()[1]
  assert '(mpp)' in row and '25.00%' in row and '50.00%' in row and 'nan' not in row


def test_temporaries_of_a_killed_export_are_removed_at_the_next_start(run_copy):
  workdir, before = run_copy
  ours = workdir / '.model.npz.vit_jax-tmp-999999'  # files.temporary_path's form.
  ours.write_bytes(b'half an export')
  users = {'notes.tmp-20251130': b'my notes', 'model.npz.tmp-999999': b'mine too',
           '.notes.vit_jax-tmp-': b'no pid: not a name vit_jax makes'}
  for name, content in users.items():
    (workdir / name).write_bytes(content)
  train.train_and_evaluate(tiny_config(), str(workdir))
  assert not ours.exists()
  for name, content in users.items():  # Only temporaries this codebase made go.
    assert (workdir / name).read_bytes() == content, name
  assert_unchanged(before, workdir, except_for=[HISTORY, 'model.npz', 'results.json'])
