r"""VTAB-1k, the paper's protocol as one command (Sec. 4.1, App. B.1.1):

python -m vit_jax.vtab --pretrained=SOURCE --workdir=DIR [--tasks=dtd,svhn,...]
    [--lrs=0.001,0.003,0.01,0.03] [--config.<key>=<value> ...]

For each task, each learning rate is trained on train800 and scored on val200
(DIR/<task>/lr_<lr>); the one with the best val200 accuracy is trained on train800val200 and
scored on test (DIR/<task>/final). SOURCE and the runs' settings are configs/vtab.py's; any of its
keys can be overridden. Every run has its own workdir, so a killed sweep started again skips the
finished runs and resumes the interrupted one from its checkpoint. A run counts as finished only
if it was trained with the setting asked for now: a workdir whose runs used another checkpoint,
resolution, schedule or learning rate is refused before anything trains, naming the keys that
differ (every key but the bookkeeping ones, `SAME_RUN_EITHER_WAY`). At the end it prints the
paper's table (each task, each group's mean, the mean over all tasks; beside the paper's Tables 9
and 2 where they have the checkpoint: ViT-L/16 from ImageNet-21k) and writes DIR/vtab.json.
"""

import copy
import json
import math
import os
import sys

import flax
from absl import app, flags, logging

from vit_jax import cpu_tuning, files
from vit_jax import main as cli
from vit_jax import published
from vit_jax import vtab_tasks
from vit_jax.configs import common
from vit_jax.workdir import NEWER_KEYS, SAME_STATE_EITHER_WAY, Workdir

_TASKS = flags.DEFINE_list('tasks', list(vtab_tasks.VTAB_1K), 'VTAB tasks to run (default: all '
                           '19; the offline digits, digits_parity also exist).')
_LRS = flags.DEFINE_list('lrs', ['0.001', '0.003', '0.01', '0.03'],
                         'Learning rates swept on val200.')


# Keys that change how a run is logged, checkpointed or found on disk, not what it computes.
SAME_RUN_EITHER_WAY = ('eval_every', 'progress_every', 'checkpoint_every', 'keep_checkpoints',
                       'compilation_cache_dir', 'folder_index_dir', 'tfds_data_dir',
                       'tfds_download', 'tfds_manual_dir', 'evals.test.every', 'trainer',
                       *SAME_STATE_EITHER_WAY)


class SweepMismatchError(ValueError):
  """A sub-run's workdir holds a run of another setting than the sweep asks for."""


def _setting(config_dict: dict) -> dict:
  flat = {**NEWER_KEYS,
          **flax.traverse_util.flatten_dict(json.loads(json.dumps(config_dict)), sep='.')}
  return {k: v for k, v in flat.items() if k not in SAME_RUN_EITHER_WAY}


def check_same_run(config, workdir: str, ignore=()):
  """Refuses `workdir` if a run of another setting than `config` trained there (`ignore`: keys
  not known yet, e.g. the final run's learning rate before the val200 runs have finished)."""
  last = Workdir(workdir).last_training()
  if last is None:
    return
  then, now = _setting(last[0]), _setting(json.loads(config.to_json_best_effort()))
  differ = sorted(k for k in then.keys() | now.keys()
                  if k not in ignore and then.get(k) != now.get(k))
  if differ:
    details = '; '.join(f'{k}: {then.get(k)!r} there, {now.get(k)!r} now' for k in differ[:6])
    raise SweepMismatchError(
        f'{workdir} holds a run of another setting than this sweep asks for ({details}'
        f'{" ..." if len(differ) > 6 else ""}): its result would be reported (or the run '
        'resumed) as if it were this setting\'s. Nothing was changed: sweep with the setting it '
        'was started with, or into a new --workdir.')


def finished(workdir: str, total_steps: int):
  """The run's results.json if the run reached its last step, else None."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  return results if results.get('step') == total_steps else None


def run(config, workdir: str) -> dict:
  """The run in `workdir`, trained (or resumed) unless it finished before with this very
  setting; its test accuracy."""
  from vit_jax import train
  check_same_run(config, workdir)
  results = finished(workdir, config.total_steps)
  if results is None:
    train.train_and_evaluate(config, workdir)
    results = finished(workdir, config.total_steps)
    if results is None:  # Stopped (SIGTERM) before its last step: so is the sweep.
      logging.info('%s stopped before its last step: the sweep stops here.', workdir)
      sys.exit(0)
  else:
    logging.info('%s: finished before with this setting, skipped.', workdir)
  return results['test']['accuracy_test']


def with_run(config, task: str, lr: float, train_split: str, test_split: str):
  config = copy.deepcopy(config)  # Keeps the references: evals.test follows test_split.
  with config.unlocked():
    config.dataset = f'vtab:{task}'
    config.train_split, config.test_split = train_split, test_split
    config.base_lr = lr
  return config.lock()


def sweep(config, workdir: str, tasks, lrs) -> dict:
  """{task: {'val200': {lr: accuracy}, 'lr': chosen, 'test': accuracy, 'group': ...}}."""
  for task in tasks:  # Every run already there, checked before anything trains.
    for lr in lrs:
      check_same_run(with_run(config, task, lr, 'train800', 'val200'),
                     os.path.join(workdir, task, f'lr_{lr}'))
    check_same_run(with_run(config, task, lrs[0], 'train800val200', 'test'),
                   os.path.join(workdir, task, 'final'), ignore=('base_lr',))
  results = {}
  for task in tasks:
    val = {lr: run(with_run(config, task, lr, 'train800', 'val200'),
                   os.path.join(workdir, task, f'lr_{lr}')) for lr in lrs}
    best = max(lrs, key=lambda lr: val[lr])  # The first of equals: the smallest listed first.
    test = run(with_run(config, task, best, 'train800val200', 'test'),
               os.path.join(workdir, task, 'final'))
    results[task] = {'group': vtab_tasks.get(task).group, 'val200': val, 'lr': best,
                     'test': test}
  return results


def summary(results: dict) -> dict:
  """Each group's mean test accuracy over its tasks, and the mean over all tasks."""
  groups = {}
  for task in results.values():
    groups.setdefault(task['group'], []).append(task['test'])
  means = {group: sum(v) / len(v) for group, v in groups.items()}
  means['all'] = sum(t['test'] for t in results.values()) / len(results)
  return means


def paper(config) -> dict:
  """{task or 'all': published test accuracy} of the checkpoint `config` fine-tunes, where the
  paper gives one (Tables 9 and 2: ViT-L/16 from ImageNet-21k, the JFT models)."""
  run = published.setting(config.to_dict())
  found = {task: published.lookup(run.model, run.pretraining, f'vtab:{task}', config.total_steps)
           for task in vtab_tasks.VTAB_1K}
  found['all'] = published.lookup(run.model, run.pretraining, 'vtab', config.total_steps)
  return {name: result.top1 for name, result in found.items() if result is not None}


def table(results: dict, means: dict, paper: dict) -> str:
  """The sweep's table; with 'paper' and 'diff' columns where `paper` has the task."""

  def beside(name, accuracy):
    if name not in paper:
      return ''
    return f' {paper[name]:>7.2%} {accuracy - paper[name]:>+7.2%}'

  lines = [f'{"task":<24} {"group":<12} {"lr":>6} {"val200":>7} {"test":>7}'
           + (f' {"paper":>7} {"diff":>7}' if paper else '')]
  for name, task in results.items():
    lines.append(f'{name:<24} {task["group"]:<12} {task["lr"]:>6g} '
                 f'{task["val200"][task["lr"]]:>7.2%} {task["test"]:>7.2%}'
                 + beside(name, task['test']))
  for group, mean in means.items():
    lines.append(f'{"mean " + group:<24} {"":<12} {"":>6} {"":>7} {mean:>7.2%}'
                 + beside(group, mean))
  return '\n'.join(lines)


def parse_lrs(values) -> list:
  """--lrs as positive finite numbers, refused as a whole before anything trains."""
  lrs = []
  for value in values:
    try:
      lr = float(value)
    except ValueError:
      lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
      raise app.UsageError(f'--lrs={",".join(values)}: {value!r} is not a positive learning '
                           'rate; expected e.g. --lrs=0.001,0.003,0.01,0.03.')
    lrs.append(lr)
  if not lrs:
    raise app.UsageError('--lrs is empty; expected e.g. --lrs=0.001,0.003,0.01,0.03.')
  return lrs


def main(argv):
  config, workdir = cli.start(argv)
  if not _TASKS.value:
    raise app.UsageError('--tasks is empty; expected some of '
                         f'{", ".join(list(vtab_tasks.TASKS) + list(vtab_tasks.OFFLINE))}.')
  unknown = [t for t in _TASKS.value if t not in vtab_tasks.TASKS and t not in vtab_tasks.OFFLINE]
  if unknown:
    raise app.UsageError(f'Unknown VTAB task(s) {", ".join(unknown)}; expected some of '
                         f'{", ".join(list(vtab_tasks.TASKS) + list(vtab_tasks.OFFLINE))}.')
  lrs = parse_lrs(_LRS.value)
  results = sweep(config, workdir, _TASKS.value, lrs)
  means = summary(results)
  text = table(results, means, paper(config))
  print(text)
  files.write_bytes(os.path.join(workdir, 'vtab.json'),  # Never a half-written table.
                    json.dumps({'tasks': results, 'means': means}, indent=1).encode())
  logging.info('Wrote %s', os.path.join(workdir, 'vtab.json'))


def with_pretrained_flag(argv: list) -> list:
  """--pretrained=SOURCE stands for --config=<checkout>/configs/vtab.py:SOURCE,<first task> (the
  task is set per run)."""
  tasks = next((a.split('=', 1)[1] for a in argv if a.startswith('--tasks=')), '').split(',')
  first = next((task for task in tasks if task), vtab_tasks.VTAB_1K[0])  # main checks --tasks.
  out = []
  for arg in argv:
    if arg.startswith('--pretrained='):
      source = arg.split('=', 1)[1]
      arg = f'--config={os.path.join(common.ROOT, "configs", "vtab.py")}:{source},{first}'
    out.append(arg)
  return out


if __name__ == '__main__':
  if not any(a.startswith(('--pretrained=', '--config=', '--help', '-h')) for a in sys.argv):
    sys.exit('Give the checkpoint to evaluate: --pretrained=SOURCE (a registry name such as B_16, '
             'or a checkpoint file, directory or hf:// id); see --help.')
  cpu_tuning.tune_command_line()
  sys.argv = with_pretrained_flag(sys.argv)
  app.run(main, flags_parser=cli.parse_flags)
