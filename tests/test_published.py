"""The published results: the paper's tables as transcribed (checked against each other and
against the model's FLOP count), their lookup, and the "paper" columns of report and vtab."""

import json

import jax
import jax.numpy as jnp
import pytest

from helpers import parse_config
from vit_jax import mfu, models, published, report, vtab, vtab_tasks
from vit_jax.models_vit import VisionTransformer


@pytest.mark.parametrize('model,data', [('ViT-H_14', 'jft300m'), ('ViT-L_16', 'jft300m'),
                                        ('ViT-L_16', 'imagenet21k')])
def test_table9_tasks_average_to_table2_vtab(model, data):
  """Table 9 prints each task to 0.1, Table 2 the mean over the 19 to 0.01: a mistyped task
  moves the mean by >= 0.005 points."""
  tasks = [published.lookup(model, data, f'vtab:{t}', 2500).top1 for t in vtab_tasks.VTAB_1K]
  assert published.VTAB_TASKS == vtab_tasks.VTAB_1K
  assert sum(tasks) / 19 == pytest.approx(published.lookup(model, data, 'vtab', 2500).top1,
                                          abs=0.0002)


@pytest.mark.parametrize('model,epochs', sorted(published.PRETRAINING_EXAFLOPS))
def test_table5_compute_equals_the_models_flops(model, epochs):
  """Table 5's exaFLOPs = 3 x XLA's forward count at 224 px x epochs x JFT's 303M images."""
  vit = VisionTransformer(num_classes=18_291, **models.get_config(model))
  params = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                           train=False)['params'])
  forward = mfu.forward_flops_per_image(vit, params, (224, 224))
  exaflops = 3 * forward * epochs * published.JFT_IMAGES / 1e18
  assert exaflops == pytest.approx(published.PRETRAINING_EXAFLOPS[model, epochs], rel=0.03)


def test_lookup_takes_the_most_specific_match():
  table2 = published.lookup('ViT-L_16', 'imagenet21k', 'imagenet2012', 20_000, 512, 0.1)
  assert table2 == published.Published(0.8530, 'paper Table 2', std=0.0002)
  official = published.lookup('ViT-L_16', 'imagenet21k', 'imagenet2012', 20_000, 384, 0.1)
  assert official == published.Published(0.8505, 'official repository', '59.7h V100')
  assert published.lookup('ViT-L_16', 'imagenet21k', 'imagenet2012', 20_000, 224, 0.1) is None
  assert published.lookup('ViT-B_16', 'imagenet21k', 'vtab:dtd', 2500) is None  # Not in Table 9.
  assert published.lookup('ViT-L_16', 'imagenet21k', 'vtab:dtd', 2500).top1 == 0.741


def l16_run(tmp_path, top1=0.8540):
  """The workdir of a ViT-L/16 ImageNet-21k fine-tuning on ImageNet at 512 px (Table 2's)."""
  workdir = tmp_path / 'l16'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({
      'pretrained_path': '/ckpt/imagenet21k/ViT-L_16.npz', 'dataset': 'imagenet2012',
      'total_steps': 20_000, 'pp': {'crop': 512},
      'model': {'model_name': 'ViT-L_16', 'transformer': {'dropout_rate': 0.1}},
      'evals': {'real': {'type': 'classification', 'dataset': 'imagenet2012_real'},
                'v2': {'type': 'classification', 'dataset': 'imagenet_v2'}}}))
  (workdir / 'results.json').write_text(json.dumps({
      'step': 20_000, 'wall_time_sec': 9.0, 'test': {'accuracy_test': top1},
      'real': {'accuracy_real': 0.8850}, 'v2': {'accuracy_v2': 0.75}}))
  return workdir


def test_report_puts_the_papers_real_figure_beside_the_real_evaluator(tmp_path, capsys):
  report.main([str(l16_run(tmp_path))])
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split()[1:5] == ['20000', '85.40%', '85.30%', '+0.10%']
  assert lines[2] == '  paper: paper Table 2'
  assert lines[3] == ('  real: accuracy_real 0.8850; paper 88.62% (paper Table 2), '
                      'diff -0.12%')
  assert lines[4] == '  v2: accuracy_v2 0.7500'


def test_vtab_table_has_the_papers_columns_for_a_checkpoint_of_table9():
  config = parse_config('--config=configs/vtab.py:L_16,dtd')
  paper = vtab.paper(config)
  assert len(paper) == 20 and paper['dtd'] == 0.741 and paper['all'] == 0.7272
  assert vtab.paper(parse_config('--config=configs/vtab.py:B_16,dtd')) == {}
  results = {'dtd': {'group': 'natural', 'val200': {0.01: 0.70}, 'lr': 0.01, 'test': 0.75}}
  lines = vtab.table(results, vtab.summary(results), paper).splitlines()
  assert lines[0].split()[-2:] == ['paper', 'diff']
  assert lines[1].split() == ['dtd', 'natural', '0.01', '70.00%', '75.00%', '74.10%', '+0.90%']
  assert lines[3].split() == ['mean', 'all', '75.00%', '72.72%', '+2.28%']


def test_a_finished_run_that_reproduces_a_published_cell_prints_it(tmp_path, capsys):
  from vit_jax import main
  workdir = l16_run(tmp_path)
  main._beside_published(str(workdir))  # pylint: disable=protected-access
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split()[2:5] == ['85.40%', '85.30%', '+0.10%']
  config = json.loads((workdir / 'config.json').read_text())
  config['pp']['crop'] = 448  # Published at 384 and 512, not at 448.
  (workdir / 'config.json').write_text(json.dumps(config))
  main._beside_published(str(workdir))  # pylint: disable=protected-access
  assert capsys.readouterr().out == ''


def test_the_listing_names_an_unknown_model_with_the_known_ones(capsys):
  published.main(['published', 'ViT-H_14'])
  rows = capsys.readouterr().out.splitlines()[1:]
  assert len(rows) == 7 + 6 + 19 and all(r.startswith('ViT-H_14 ') for r in rows)
  with pytest.raises(SystemExit, match=r"No published result of 'ViT-X_16'; the table has "
                                       r'R\+ViT-Ti_16, R26\+ViT-S_32, '):
    published.main(['published', 'ViT-X_16'])
