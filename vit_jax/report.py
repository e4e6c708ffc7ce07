"""Prints the results.json of one or more workdirs as a table: python -m vit_jax.report DIR...

One row per workdir: its test evaluator's metrics (classification or masked patch prediction);
further evaluators (results.json[name]) are listed under it."""

import json
import os
import sys


def _test_metrics(test: dict):
  """(top-1, top-5, loss) of the test evaluator, whatever the objective named them; None where
  it has no such metric."""
  prefix = 'mpp_' if 'mpp_accuracy_test' in test else ''
  return (test.get(f'{prefix}accuracy_test'), test.get(f'{prefix}accuracy_test_top5'),
          test.get('loss_test'))


def _cell(value, form: str, width: int) -> str:
  return f'{"-":>{width}}' if value is None else f'{value:>{width}{form}}'


def main(workdirs):
  print(f'{"workdir":<32} {"step":>6} {"top-1":>7} {"top-5":>7} {"loss":>7} {"time":>8}')
  for workdir in workdirs:
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
    test = r.get('test', r)  # Earlier runs wrote the test metrics at the top level.
    top1, top5, loss = _test_metrics(test)
    name = workdir + (' (mpp)' if 'mpp_accuracy_test' in test else '')
    print(f'{name:<32} {r["step"]:>6} {_cell(top1, ".2%", 7)} {_cell(top5, ".2%", 7)} '
          f'{_cell(loss, ".4f", 7)} {r["wall_time_sec"]:>7.0f}s')
    for name, metrics in r.items():
      if isinstance(metrics, dict) and name != 'test':
        print(f'  {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  if not sys.argv[1:] or sys.argv[1] in ('-h', '--help', '--helpfull'):
    sys.exit(__doc__)
  missing = [d for d in sys.argv[1:] if not os.path.isfile(os.path.join(d, 'results.json'))]
  if missing:
    sys.exit(f'No results.json in {", ".join(missing)} (a workdir has one once a run finished '
             'or was preempted).')
  main(sys.argv[1:])
