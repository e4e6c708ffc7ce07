"""Prints the results.json of one or more workdirs as a table: python -m vit_jax.report DIR..."""

import json
import os
import sys


def main(workdirs):
  print(f'{"workdir":<32} {"step":>6} {"top-1":>7} {"top-5":>7} {"loss":>7} {"time":>8}')
  for workdir in workdirs:
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
    print(f'{workdir:<32} {r["step"]:>6} {r["accuracy_test"]:>7.2%} '
          f'{r["accuracy_test_top5"]:>7.2%} {r["loss_test"]:>7.4f} {r["wall_time_sec"]:>7.0f}s')


if __name__ == '__main__':
  main(sys.argv[1:])
