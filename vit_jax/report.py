"""Prints the results.json of one or more workdirs as a table: python -m vit_jax.report DIR...

One row per workdir: its test evaluator's metrics; further evaluators (results.json[name]) are
listed under it."""

import json
import os
import sys


def main(workdirs):
  print(f'{"workdir":<32} {"step":>6} {"top-1":>7} {"top-5":>7} {"loss":>7} {"time":>8}')
  for workdir in workdirs:
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
    test = r.get('test', r)  # Earlier runs wrote the test metrics at the top level.
    print(f'{workdir:<32} {r["step"]:>6} {test.get("accuracy_test", float("nan")):>7.2%} '
          f'{test.get("accuracy_test_top5", float("nan")):>7.2%} '
          f'{test.get("loss_test", float("nan")):>7.4f} {r["wall_time_sec"]:>7.0f}s')
    for name, metrics in r.items():
      if isinstance(metrics, dict) and name != 'test':
        print(f'  {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  main(sys.argv[1:])
