"""Prints the results.json of one or more workdirs as a table:

  python -m vit_jax.report DIR... [--reliability=FILE.png]

One row per workdir: its test evaluator's metrics (classification or masked patch prediction;
segmentation and detection metrics are listed under the row, as other evaluators'),
with the expected calibration error, and where the run fine-tunes a released checkpoint whose
result was published (vit_jax/published.py: same model, pre-training, dataset, steps, resolution
and dropout) the published top-1 ("paper") and the run's difference from it; further evaluators
(results.json[name]) are listed under it, with the published figure of their dataset where
there is one (ReaL: the paper's Table 2).
--reliability draws the test evaluator's reliability diagram (accuracy against confidence per
bin) of each workdir into one figure (.png, .pdf or .svg; never over a file report did not
write there)."""

import json
import os
import sys

from vit_jax import files, published


def _test_metrics(test: dict):
  """(top-1, top-5, loss, ECE) of the test evaluator, whatever the objective named them; None
  where it has no such metric."""
  prefix = 'mpp_' if 'mpp_accuracy_test' in test else ''
  return (test.get(f'{prefix}accuracy_test'), test.get(f'{prefix}accuracy_test_top5'),
          test.get('loss_test'), test.get('ece_test'))


def _cell(value, form: str, width: int) -> str:
  return f'{"-":>{width}}' if value is None else f'{format(value, form):>{width}}'


def _scalars(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def read(workdir: str) -> dict:
  path = os.path.join(workdir, 'results.json')
  try:
    with open(path) as f:
      results = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} is not readable JSON ({e}): the run that wrote it was cut off, '
                     'or the file was edited; evaluate the workdir again (config.trainer='
                     'evaluate) to rewrite it.') from None
  if not isinstance(results, dict) or 'step' not in results:
    raise ValueError(f'{path} is not a results file of vit_jax (no "step").')
  return results


def main(workdirs):
  print(f'{"workdir":<32} {"step":>6} {"top-1":>7} {"paper":>7} {"diff":>7} {"top-5":>7} '
        f'{"loss":>7} {"ECE":>7} {"time":>8}')
  for workdir in workdirs:
    r = read(workdir)
    test = r.get('test', r)  # Earlier runs wrote the test metrics at the top level.
    top1, top5, loss, ece = _test_metrics(test)
    name = workdir + (' (mpp)' if 'mpp_accuracy_test' in test else '')
    config = published.run_config(workdir)
    paper = published.for_run(config)
    diff = None if paper is None or top1 is None else top1 - paper.top1
    print(f'{name:<32} {r["step"]:>6} {_cell(top1, ".2%", 7)} '
          f'{_cell(paper and paper.top1, ".2%", 7)} {_cell(diff, "+.2%", 7)} '
          f'{_cell(top5, ".2%", 7)} {_cell(loss, ".4f", 7)} {_cell(ece, ".4f", 7)} '
          f'{r["wall_time_sec"]:>7.0f}s')
    if paper is not None:
      print(f'  paper: {paper.source}' + (f', {paper.time}' if paper.time else ''))
    evals = config.get('evals') or {}
    for name, metrics in r.items():
      if isinstance(metrics, dict) and (name != 'test' or top1 is None) and _scalars(metrics):
        print(f'  {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in _scalars(metrics).items())
              + _beside_published(config, (evals.get(name) or {}).get('dataset'),
                                  metrics.get(f'accuracy_{name}')))


def _beside_published(config: dict, dataset, top1) -> str:
  """'; paper X (source), diff Y' for an evaluator whose dataset has a published result."""
  paper = dataset and top1 is not None and published.for_run(config, dataset)
  return f'; paper {paper.top1:.2%} ({paper.source}), diff {top1 - paper.top1:+.2%}' if paper \
      else ''


def reliability_diagram(workdirs, path: str):
  """Accuracy against mean confidence per bin (the diagonal is perfect calibration)."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(5, 5))
  axes.plot([0, 1], [0, 1], 'k:', label='calibrated')
  for workdir in workdirs:
    test = read(workdir).get('test', {})
    bins = test.get('reliability_test')
    if bins is None:
      raise ValueError(f'{workdir}/results.json has no reliability_test: its run predates the '
                       'calibration metrics or is not a classification.')
    points = [(c, a) for c, a in zip(bins['confidence'], bins['accuracy']) if c is not None]
    axes.plot(*zip(*points), 'o-', label=f'{workdir} (ECE {test["ece_test"]:.3f})')
  axes.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
           title='Reliability diagram')
  axes.legend(fontsize='small')
  folder = files.OutputFolder(os.path.dirname(path) or '.')
  folder.write(os.path.basename(path), lambda temporary: figure.savefig(
      temporary, dpi=100, bbox_inches='tight', format=os.path.splitext(path)[1][1:]))
  print(f'Wrote {path}')


def check_diagram_path(path: str):
  """Refuses, before any work, a --reliability path that is a folder, has no image extension
  or names a file that report did not write."""
  formats = ('png', 'pdf', 'svg')
  if os.path.isdir(path) or os.path.splitext(path)[1][1:].lower() not in formats:
    raise ValueError(f'--reliability={path}: expected a new file named .png, .pdf or .svg.')
  files.OutputFolder(os.path.dirname(path) or '.').check([os.path.basename(path)])


if __name__ == '__main__':
  args = sys.argv[1:]
  diagrams = [a.split('=', 1)[1] for a in args if a.startswith('--reliability=')]
  workdirs = [a for a in args if not a.startswith('--reliability=')]
  if not workdirs or workdirs[0] in ('-h', '--help', '--helpfull'):
    sys.exit(__doc__)
  unknown = [a for a in workdirs if a.startswith('--')]
  if unknown:
    sys.exit(f'Unknown flag {unknown[0]}: expected DIR... [--reliability=FILE.png].')
  missing = [d for d in workdirs if not os.path.isfile(os.path.join(d, 'results.json'))]
  if missing:
    sys.exit(f'No results.json in {", ".join(missing)} (a workdir has one once a run finished '
             'or was preempted).')
  for diagram in diagrams:
    try:
      check_diagram_path(diagram)
    except (ValueError, FileExistsError) as e:
      sys.exit(str(e))
  try:
    main(workdirs)
  except ValueError as e:
    sys.exit(str(e))
  for diagram in diagrams:
    reliability_diagram(workdirs, diagram)
