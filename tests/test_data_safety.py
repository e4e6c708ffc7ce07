"""The fault catalogue: everyday mistakes that used to lose or damage a user's files.

Each test takes a copy of a finished run, does the wrong thing, and checks that every file that
existed before is byte-for-byte what it was (and, where the run should go on, that it does).
"""

import json
import os
import shutil
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from helpers import (ROOT, TINY, assert_unchanged, load_npz, main_command, parse_config,
                     run_main, scalars, snapshot, tiny_config)
from vit_jax import checkpoint, config_lib, resume, train
from vit_jax.workdir import CLASSES_FILE, HISTORY_FILE, LOCK_FILE, Workdir, WorkdirMismatchError

HISTORY = HISTORY_FILE


# ------------------------------------------------------------------- 1. evaluate on a workdir

@pytest.mark.parametrize('overrides, message', [
    (['--config.pp.crop=12'], r"image size: \[8, 8\] in the checkpoints, \[12, 12\] now"),
    (['--config.model.hidden_size=32'], r'model.hidden_size: 16 in the checkpoints, 32 now'),
    (['--config.model.representation_size=8'],
     r'model.representation_size: 16 in the checkpoints, 8 now'),
])
def test_evaluate_with_another_model_is_refused_and_changes_nothing(run_copy, overrides,
                                                                   message):
  workdir, before = run_copy
  with pytest.raises(WorkdirMismatchError, match=message):
    train.evaluate(tiny_config('--config.trainer=evaluate', *overrides), str(workdir))
  assert_unchanged(before, workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


def test_evaluate_with_the_finetune_recipe_names_what_differs(run_copy):
  workdir, before = run_copy
  config = parse_config('--config=configs/digits.py:finetune', '--config.trainer=evaluate',
                        *[a for a in TINY[1:] if 'representation_size' not in a])
  with pytest.raises(WorkdirMismatchError, match=r'model.representation_size'):
    train.evaluate(config, str(workdir))
  assert_unchanged(before, workdir)


def test_evaluate_with_another_optimizer_reads_only_the_parameters(run_copy, finished):
  workdir, before = run_copy
  results = train.evaluate(tiny_config('--config.trainer=evaluate', '--config.optimizer=sgd'),
                           str(workdir))
  trained = json.loads((finished / 'results.json').read_text())
  assert scalars(results['test']) == pytest.approx(scalars(trained['test']), abs=1e-6)
  assert_unchanged(before, workdir, except_for=[HISTORY])
  history = json.loads((workdir / HISTORY).read_text())
  assert [entry['trainer'] for entry in history] == ['train', 'evaluate']
  entries = json.loads((workdir / 'eval_results.json').read_text())
  assert entries[0]['evaluated'].endswith('checkpoints/6') and entries[0]['step'] == 6


def test_evaluate_of_an_mpp_workdir_reports_mpp_metrics(tmp_path):
  mpp_args = ['--config=configs/mpp.py:digits',
              *[a for a in TINY[1:] if 'representation_size' not in a]]
  train.train_and_evaluate(parse_config(*mpp_args), str(tmp_path))
  before = snapshot(tmp_path)
  results = train.evaluate(parse_config(*mpp_args, '--config.trainer=evaluate'), str(tmp_path))
  trained = json.loads((tmp_path / 'results.json').read_text())
  assert set(results['test']) == {'mpp_accuracy_test', 'mpp_accuracy_test_top5', 'loss_test'}
  assert scalars(results['test']) == pytest.approx(scalars(trained['test']), abs=1e-6)
  assert_unchanged(before, tmp_path, except_for=[HISTORY])


# ----------------------------------------------------------- 2. the data changed under a run

def image_folder(root, classes):
  for split in ('train', 'test'):
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 30 * i + 5 * len(name), np.uint8)).save(
            folder / f'{i}.png')


@pytest.mark.parametrize('records', ['kept', 'deleted'])
def test_a_class_added_to_a_folder_dataset_is_refused(tmp_path, records):
  images, workdir = tmp_path / 'images', tmp_path / 'run'
  image_folder(images, ['a', 'b'])
  folder_args = [f'--config.dataset=folder:{images}', '--config.batch=8', '--config.batch_eval=8']
  train.train_and_evaluate(tiny_config(*folder_args), str(workdir))
  if records == 'deleted':  # Then the checkpoint's own metadata catches it.
    for name in ('config.json', HISTORY, CLASSES_FILE):
      os.remove(workdir / name)
  image_folder(images, ['c'])
  before = snapshot(workdir)
  message = (r'number of outputs: 2 in the checkpoints, 3 now' if records == 'kept' else
             r'holds another train state than this run builds: .*head/kernel: \(16, 2\) in the '
             r'checkpoint, \(16, 3\) in this run')
  with pytest.raises(WorkdirMismatchError, match=message):
    train.train_and_evaluate(tiny_config(*folder_args, '--config.total_steps=9'), str(workdir))
  assert_unchanged(before, workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


# ------------------------------------------------------------- 3. Ctrl-C during the restore

@pytest.mark.parametrize('wrapped', [False, True])
def test_an_interrupt_during_the_restore_propagates_and_renames_nothing(run_copy, monkeypatch,
                                                                       wrapped):
  workdir, before = run_copy

  def interrupted(self, *args, **kwargs):
    if not wrapped:
      raise KeyboardInterrupt()
    try:  # What orbax raises when the interrupt lands in its reading threads.
      raise KeyboardInterrupt()
    except KeyboardInterrupt as e:
      raise Exception('Encountered error while reading array index') from e

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
  assert_unchanged(before, workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


def test_a_failed_restore_of_intact_files_stops_and_renames_nothing(run_copy, monkeypatch):
  workdir, before = run_copy

  def failing(self, *args, **kwargs):
    raise RuntimeError('a bug in the restore')

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing)
  with pytest.raises(resume.CheckpointRestoreError,
                     match=r'step 6 .*a bug in the restore.*files are complete'):
    train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
  assert_unchanged(before, workdir)


# ------------------------------------------------------------- 4. two runs on one workdir

def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_first(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = subprocess.Popen(main_command(*TINY, f'--workdir={workdir}'), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lock = workdir / LOCK_FILE
  start = time.time()
  while not (lock.exists() and lock.read_text()):  # Taken before it compiles: seconds ahead.
    assert first.poll() is None and time.time() - start < 300, 'the first run ended early'
    time.sleep(0.02)
  with pytest.raises(RuntimeError, match=rf'in use by another run \(pid {first.pid} on '):
    train.train_and_evaluate(tiny_config('--config.optimizer=sgd'), str(workdir))
  _, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-3000:]
  # The refused run left no trace: one start in the history, the first run's, which finished.
  history = json.loads((workdir / HISTORY).read_text())
  assert len(history) == 1 and history[0]['config']['optimizer'] == 'adam'
  assert json.loads((workdir / 'results.json').read_text())['step'] == 6


def test_a_stale_lock_is_taken_over(run_copy, caplog):
  workdir, _ = run_copy
  (workdir / LOCK_FILE).write_text('pid 999999 on a-host, since 2026-01-01 00:00:00\n')
  caplog.set_level('INFO')
  train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
  assert 'Taking over the lock of an ended run (pid 999999 on a-host' in caplog.text
  assert 'Resumed from the checkpoint of step 6' in caplog.text


# ------------------------------------------------- 5. fine-tuning from the workdir's own export

def test_fine_tuning_from_the_export_it_would_overwrite_is_refused(run_copy):
  workdir, before = run_copy
  with pytest.raises(ValueError, match=r'is the model.npz this run would write'):
    train.train_and_evaluate(tiny_config(f'--config.pretrained_path={workdir}/model.npz'),
                             str(workdir))
  assert_unchanged(before, workdir)


# ---------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs (needs root, as on the CI machines)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
  yield disk
  subprocess.run(['umount', '--lazy', str(disk)], check=True)


def fill(disk, leave: int):
  free = shutil.disk_usage(disk).free
  with open(disk / 'filler', 'wb') as f:
    f.write(b'\0' * max(free - leave, 0))


def test_a_full_disk_at_a_checkpoint_stops_the_run_naming_the_step(finished, small_disk):
  workdir = small_disk / 'run'
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  fill(small_disk, leave=100_000)  # A checkpoint of the tiny run needs ~210 kB.
  config = tiny_config('--config.total_steps=30', '--config.eval_every=30')
  with pytest.raises(resume.CheckpointSaveError,
                     match=r'checkpoint of step 9 failed \(No space left on device; .*stopped '
                           r'at step (9|1[0-2])\b'):  # The reason first, however long the path.
    train.train_and_evaluate(config, str(workdir))
  assert_unchanged(before, workdir, except_for=[HISTORY])
  assert not (workdir / 'checkpoints' / '12').exists()


def test_a_full_disk_ends_the_command_at_once_with_the_named_error_last(finished, small_disk):
  workdir = small_disk / 'run'
  shutil.copytree(finished, workdir)
  fill(small_disk, leave=100_000)
  began = time.time()
  result = run_main(*TINY, f'--workdir={workdir}', '--config.total_steps=30',
                    '--config.eval_every=30', timeout=300)
  assert result.returncode == 1 and time.time() - began < 120
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  assert last.startswith('CheckpointSaveError: Saving the checkpoint of step 9 failed'), (
      result.stderr[-3000:])


def test_a_read_only_checkpoint_directory_is_named_before_the_first_step(finished, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  mounted = subprocess.run(['mount', '--bind', '-o', 'ro', str(workdir / 'checkpoints'),
                            str(workdir / 'checkpoints')], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot bind-mount read-only here: {mounted.stderr.strip()}')
  try:
    with pytest.raises(resume.CheckpointSaveError, match=r'checkpoint directory .*checkpoints is '
                                                         r'not writable \(Read-only file system\)'):
      train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
    assert_unchanged(before, workdir)
    # Evaluating only reads the checkpoints: a read-only directory is fine for it.
    results = train.evaluate(tiny_config('--config.trainer=evaluate'), str(workdir))
    assert 0 <= results['test']['accuracy_test'] <= 1
  finally:
    subprocess.run(['umount', str(workdir / 'checkpoints')], check=True)
  assert_unchanged(before, workdir, except_for=[HISTORY])


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(finished, small_disk):
  path = small_disk / 'model.npz'
  shutil.copy(finished / 'model.npz', path)
  fill(small_disk, leave=4096)
  params = checkpoint.load(str(path))
  with pytest.raises(OSError, match='No space left on device'):
    checkpoint.save(params, str(path))
  assert sorted(os.listdir(small_disk)) == ['filler', 'model.npz']
  assert (path.read_bytes() == (finished / 'model.npz').read_bytes())


# -------------------------------------------------------------------- named before any work

@pytest.mark.parametrize('overrides, message', [
    (['--config.grad_norm_clip=0'], r'grad_norm_clip=0.0 must be positive'),
    (['--config.model.transformer.dropout_rate=1.5'],
     r'model.transformer.dropout_rate=1.5 must lie in \[0, 1\)'),
    (['--config.evals.fewshot.every=3', '--config.evals.fewshot.seeds=0'],
     r'evals.fewshot.seeds=0'),
    (['--config.objective=mpp', '--config.model.classifier=unpooled',
      '--config.evals.fewshot.every=3'], r'evals.fewshot: few-shot evaluation needs pooled'),
    # An evaluator's data, opened before anything is restored or written.
    (['--config.test_split=validation'], r"Unknown split 'validation' of dataset 'digits'"),
    (['--config.evals.fewshot.every=3', '--config.evals.fewshot.shots=(1000,)'],
     r'evals.fewshot: some class of digits:train has fewer examples than the fewest of'),
])
def test_impossible_values_are_named_and_change_nothing(run_copy, overrides, message):
  workdir, before = run_copy
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(*overrides), str(workdir))
  assert_unchanged(before, workdir)


def test_an_unreachable_remote_checkpoint_says_what_to_do(monkeypatch):
  import tensorflow as tf

  def offline(path):
    raise tf.errors.FailedPreconditionError(None, None, "libcurl code 6 meaning 'Could not "
                                            "resolve hostname'")

  monkeypatch.setattr(tf.io.gfile, 'exists', offline)
  config = parse_config('--config=configs/finetune.py:B_16,cifar10')
  with pytest.raises(ValueError, match=r"cannot reach pretrained_path='gs://vit_models/imagenet21k"
                                       r"/ViT-B_16.npz' \(libcurl.*pass --config.pretrained_path"):
    config_lib.check(config, device_count=1)


def test_a_misspelt_recipe_argument_shows_the_expected_form():
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r'configs/mpp.py takes ":MODEL,DATASET" .* or ":digits", not \'digit\''):
    parse_config('--config=configs/mpp.py:digit')


def test_the_same_crop_in_another_spelling_resumes(run_copy):
  workdir, _ = run_copy
  config = tiny_config()
  config.pp.crop = (8, 8)
  Workdir(str(workdir)).check_compatible(config, num_outputs=10,
                                                image_size=config_lib.image_size(config))


def test_resuming_keeps_the_config_history(finished, run_copy):
  workdir, before = run_copy
  train.train_and_evaluate(tiny_config('--config.total_steps=9'), str(workdir))
  assert (workdir / 'config.json').read_bytes() == (finished / 'config.json').read_bytes()
  history = json.loads((workdir / HISTORY).read_text())
  assert [(e['start_step'], e['config']['total_steps']) for e in history] == [(0, 6), (6, 9)]
  assert_unchanged(before, workdir, except_for=[HISTORY, 'model.npz', 'results.json'])


def test_command_line_tools_name_bad_input(finished, tmp_path):
  mpp_export = tmp_path / 'mpp.npz'
  params = load_npz(finished / 'model.npz')  # As an MPP export without its description:
  for key in (checkpoint.DESCRIPTION_KEY, 'cls', 'head/kernel', 'head/bias', 'pre_logits/kernel',
              'pre_logits/bias'):  # no class token, no head, a mask token.
    del params[key]
  posemb = 'Transformer/posembed_input/pos_embedding'
  params[posemb] = params[posemb][:, 1:]
  params['mask_token'] = np.zeros((1, 1, 16), np.float32)
  np.savez(mpp_export, **params)
  image = tmp_path / 'digit.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  a_file = tmp_path / 'a_file'
  a_file.write_text('keep me')
  cases = [
      ('vit_jax.predict', [f'--checkpoint={mpp_export}', str(image)],
       "has no image classification head (classifier='unpooled'"),
      ('vit_jax.fewshot', [f'--checkpoint={finished}/model.npz', '--shots=1000'],
       'No few-shot evaluation possible'),
      ('vit_jax.fewshot', [f'--checkpoint={finished}/model.npz', '--seeds=0'],
       '--seeds=0 and --shots=1,5,10,25 must be at least 1'),
      ('vit_jax.fewshot', [f'--checkpoint={finished}/model.npz', '--shots=abc'],
       '--shots=abc: expected whole numbers of examples per class'),
      ('vit_jax.fewshot', [f'--checkpoint={finished}/model.npz', '--l2_reg=nan'],
       '--l2_reg=nan must be a positive number'),
      ('vit_jax.fewshot', [f'--checkpoint={finished}/model.npz', '--l2_reg=-1'],
       '--l2_reg=-1.0 must be a positive number'),
      ('vit_jax.predict', [f'--checkpoint={finished}/model.npz', '--top=-1', str(image)],
       '--top=-1 must be at least 1'),
      ('vit_jax.predict', [f'--checkpoint={finished}/checkpoints/6', str(image)],
       'is a train-state checkpoint of a run'),
      ('vit_jax.analysis', [f'--checkpoint={finished}/model.npz', '--dataset=digits',
                            f'--outdir={tmp_path}/figures', '--num_images=0'],
       '--num_images=0 must be at least 1'),
      ('vit_jax.analysis', [f'--checkpoint={finished}/model.npz', '--dataset=digits',
                            f'--outdir={a_file}'], 'is a file, not a directory'),
  ]
  for module, args, message in cases:
    result = run_main(*args, module=module)
    assert result.returncode != 0 and message in result.stderr, (module, args,
                                                                  result.stderr[-2000:])
    assert 'Traceback' not in result.stderr or 'ValueError' in result.stderr
  assert a_file.read_text() == 'keep me'
