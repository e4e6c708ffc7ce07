"""Multi-host runs, and runs that are killed, preempted, diverge or get bad input."""

import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from helpers import (COUNTED, ROOT, TINY, assert_same_params, assert_unchanged, built_once,
                     free_port, load_npz, main_command, run_main, scalars, tiny_config)
from vit_jax import checkpoint, train

# Long enough to be interrupted: 60 steps, a checkpoint every 10.
LONG = [*TINY, '--config.total_steps=60', '--config.checkpoint_every=10',
        '--config.eval_every=60', '--config.progress_every=10']


def cpu_env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted LONG run, in a subprocess like the interrupted ones; with a compilation
  cache (every program cached, however fast it compiled)."""
  def build(path):
    env = dict(cpu_env(1), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    result = run_main(*LONG, f'--workdir={path / "run"}',
                      f'--config.compilation_cache_dir={path / "xla_cache"}', env=env)
    assert result.returncode == 0, result.stderr[-3000:]

  path = built_once(tmp_path_factory, 'reference', build)
  return path / 'run', path / 'xla_cache'


def test_compiled_programs_are_cached_for_the_next_start(reference):
  _, cache = reference
  assert glob.glob(str(cache / 'jit_train_step-*')), os.listdir(cache)


def wait_for(path, process, timeout=300):
  start = time.time()
  while not os.path.exists(path):
    assert process.poll() is None, 'the run ended before it could be interrupted'
    assert time.time() - start < timeout, f'{path} did not appear'
    time.sleep(0.05)


def start(workdir):
  return subprocess.Popen(main_command(*LONG, f'--workdir={workdir}'), cwd=ROOT, env=cpu_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_processes_give_the_same_run_as_one(tmp_path):
  port = free_port()
  run = [*TINY, '--config.evals.fewshot.every=6']  # Each process embeds its share.
  processes = [subprocess.Popen(
      main_command(*run, f'--workdir={tmp_path / "2x2"}', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=cpu_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  one = run_main(*run, f'--workdir={tmp_path / "1x4"}', env=cpu_env(4))
  errors = [p.communicate(timeout=600)[1] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
  assert one.returncode == 0, one.stderr[-3000:]
  assert 'Mesh: 4 devices in 2 processes' in errors[0]
  assert_same_params(load_npz(tmp_path / '2x2' / 'model.npz'),
                     load_npz(tmp_path / '1x4' / 'model.npz'), atol=1e-6)
  # Only process 0 writes logs, results and the export.
  assert len(glob.glob(str(tmp_path / '2x2' / 'events.out.tfevents*'))) == 1
  two, single = (json.loads((tmp_path / d / 'results.json').read_text()) for d in ('2x2', '1x4'))
  # The counts agree exactly; the confidence sums (ECE) up to their float32 summation order.
  assert [two['test'][k] for k in COUNTED] == [single['test'][k] for k in COUNTED]
  assert scalars(two['test']) == pytest.approx(scalars(single['test']), abs=1e-6)
  assert two['fewshot'] == single['fewshot'] and len(two['fewshot']) == 4


def pod(tmp_path, port, args_of_process, startup_timeout_s=60):
  return [subprocess.Popen(
      main_command(*args, f'--workdir={tmp_path / "pod"}', f'--coordinator_address=127.0.0.1:{port}',
                   f'--num_processes={len(args_of_process)}', f'--process_id={i}',
                   f'--startup_timeout_s={startup_timeout_s}'),
      cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i, args in enumerate(args_of_process)]


# Bounds of the two tests below: start-up (imports, joining) takes ~10 s per process here.
MISMATCH_BOUND_S, MISSING_PEER_BOUND_S = 150, 90


@pytest.mark.slow
def test_two_processes_with_different_configs_stop_within_seconds_naming_it(tmp_path):
  began = time.time()
  processes = pod(tmp_path, free_port(), [[*TINY, '--config.total_steps=20'],
                                          [*TINY, '--config.total_steps=10']])
  errors = [p.communicate(timeout=MISMATCH_BOUND_S)[1] for p in processes]
  assert time.time() - began < MISMATCH_BOUND_S
  assert [p.returncode != 0 for p in processes] == [True, True]
  assert 'PodMismatchError' in errors[1] and 'total_steps: 20 on process 0, 10 here' in errors[1], (
      errors[1][-3000:])
  assert 'process 1: total_steps: 20 on process 0, 10 here' in errors[0], errors[0][-3000:]
  assert not (tmp_path / 'pod' / 'checkpoints').exists()


def test_a_missing_peer_is_named_with_the_coordinator_after_the_start_up_timeout(tmp_path):
  began, port = time.time(), free_port()
  alone = subprocess.Popen(  # Process 1 never starts.
      main_command(*TINY, f'--workdir={tmp_path / "pod"}', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', '--process_id=0', '--startup_timeout_s=10'),
      cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, stderr = alone.communicate(timeout=MISSING_PEER_BOUND_S)
  assert time.time() - began < MISSING_PEER_BOUND_S
  assert alone.returncode != 0
  assert (f'Process 0 of 2 could not start the run with the coordinator at 127.0.0.1:{port} '
          'within 10 s') in stderr, stderr[-3000:]


@pytest.mark.slow
def test_sigterm_during_start_up_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  process = start(tmp_path)
  lock = tmp_path / 'lock'
  while not (lock.exists() and lock.read_text()):  # Taken before anything compiles.
    assert process.poll() is None
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert 'Preempted: saved the checkpoint of step 1;' in stderr, stderr[-3000:]
  # A complete checkpoint (its files recorded), which the SIGTERM tests above resume from.
  assert (tmp_path / 'checkpoints' / '1' / 'files.json').exists()
  assert json.loads((tmp_path / 'results.json').read_text())['step'] == 1


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(reference, tmp_path):
  process = start(tmp_path)
  wait_for(tmp_path / 'checkpoints' / '20', process)
  process.kill()
  process.wait()
  assert not (tmp_path / 'model.npz').exists()
  resumed = run_main(*LONG, f'--workdir={tmp_path}', env=cpu_env(1))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint of step' in resumed.stderr
  assert_same_params(load_npz(tmp_path / 'model.npz'), load_npz(reference[0] / 'model.npz'))


def test_sigterm_saves_the_current_step_and_exits_cleanly(reference, tmp_path):
  process = start(tmp_path)
  wait_for(tmp_path / 'checkpoints' / '10', process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  saved = [line for line in stderr.splitlines() if 'Preempted: saved the checkpoint of step' in line]
  assert saved, stderr[-3000:]
  step = int(saved[0].split('of step ')[1].split(';')[0])
  assert (tmp_path / 'checkpoints' / str(step)).is_dir() and step < 60
  resumed = run_main(*LONG, f'--workdir={tmp_path}', env=cpu_env(1))
  assert f'Resumed from the checkpoint of step {step}' in resumed.stderr
  assert_same_params(load_npz(tmp_path / 'model.npz'), load_npz(reference[0] / 'model.npz'))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finished, run_copy, caplog):
  workdir, _ = run_copy
  for path in glob.glob(str(workdir / 'checkpoints' / '6' / '**'), recursive=True):
    if os.path.isfile(path) and not path.endswith('files.json'):  # Which records their sizes.
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  half_written = workdir / 'checkpoints' / '9.orbax-checkpoint-tmp-1234'
  half_written.mkdir()
  (half_written / 'junk').write_text('a save that never finished')
  os.remove(workdir / 'model.npz')
  train.train_and_evaluate(tiny_config(), str(workdir))
  assert 'The checkpoint of step 6 is damaged (0 file(s) missing, ' in caplog.text
  assert (workdir / 'checkpoints' / '6.unreadable').is_dir()
  assert (workdir / 'checkpoints' / '6').is_dir()  # Written again by the resumed run.
  assert_same_params(load_npz(workdir / 'model.npz'), load_npz(finished / 'model.npz'))


def test_divergence_stops_naming_the_step_and_saves_nothing_of_it(tmp_path):
  config = tiny_config('--config.base_lr=1e30', '--config.warmup_steps=0',
                       '--config.checkpoint_every=1')
  # The first update is infinite (loss and gradient are not yet): not applied, not saved.
  with pytest.raises(FloatingPointError, match=r'Non-finite training at step 1: train_loss 2.3.*'
                                               r'update_norm inf.*last checkpoint is of step 0'):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == []
  assert not (tmp_path / 'model.npz').exists()


@pytest.mark.parametrize('overrides, error, message', [
    (['--config.batch=30', '--config.accum_steps=4'], ValueError,
     r'batch=30 is not divisible by device_count x accum_steps = 1 x 4 = 4'),
    (['--config.model.hidden_size=32'], ValueError,
     r"holds checkpoints of a different run \(model.hidden_size: 16 in the checkpoints, 32 now\)"),
    (['--config.optimizer=sgd'], ValueError, r"optimizer: 'adam' in the checkpoints, 'sgd' now"),
    (['--config.dataset=no_such_dataset'], ValueError, r"Unknown dataset 'no_such_dataset'"),
    (['--config.test_split=validation'], ValueError,
     r"Unknown split 'validation' of dataset 'digits'"),
    (['--config.pretrained_path=/nowhere/model.npz'], ValueError,
     r"pretrained_path='/nowhere/model.npz' does not exist"),
])
def test_bad_input_is_named_and_leaves_the_workdir_intact(run_copy, overrides, error, message):
  workdir, before = run_copy
  with pytest.raises(error, match=message):
    train.train_and_evaluate(tiny_config(*overrides), str(workdir))
  assert_unchanged(before, workdir)


def test_unreadable_and_mismatching_pretrained_files_are_named(finished, tmp_path):
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'\x00' * 100)
  with pytest.raises(ValueError, match=r'garbage.npz is not an .npz archive'):
    train.train_and_evaluate(tiny_config(f'--config.pretrained_path={garbage}'),
                             str(tmp_path / 'a'))
  wider = tmp_path / 'wider.npz'
  params = load_npz(finished / 'model.npz')
  params['embedding/kernel'] = np.zeros((4, 4, 3, 24), np.float32)
  del params['Transformer/encoder_norm/scale']
  params['Transformer/encoderblock_5/LayerNorm_0/scale'] = np.ones(16, np.float32)
  np.savez(wider, **params)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    train.train_and_evaluate(tiny_config(f'--config.pretrained_path={wider}'), str(tmp_path / 'b'))
  assert 'embedding/kernel: checkpoint (4, 4, 3, 24), model (4, 4, 3, 16)' in str(e.value)
  assert 'Transformer/encoder_norm/scale' in str(e.value)
  assert 'Transformer/encoderblock_5/LayerNorm_0/scale' in str(e.value)


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match=r'workdir .*a_file/run is not writable'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))


def test_corrupt_image_in_a_folder_is_named(tmp_path):
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      folder = tmp_path / 'images' / split / name
      folder.mkdir(parents=True)
      for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
  (tmp_path / 'images' / 'train' / 'b' / 'broken.jpg').write_bytes(b'this is no JPEG')
  config = tiny_config(f'--config.dataset=folder:{tmp_path / "images"}', '--config.batch=8',
                       '--config.batch_eval=8')
  with pytest.raises(ValueError, match=r'1 image file\(s\) cannot be decoded.*train/b/broken.jpg'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
