"""Every notebook runs top to bottom, offline, on the CPU (with small parameters)."""

import nbformat
from nbclient import NotebookClient

from helpers import ROOT, tiny_config
from vit_jax import train


def run_notebook(name, tmp_path, **parameters):
  """Executes notebooks/<name> with `parameters` set after its 'parameters' cell (as papermill
  does); any error in any cell fails."""
  notebook = nbformat.read(f'{ROOT}/notebooks/{name}', as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  assignments = '\n'.join(f'{key} = {value!r}' for key, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(assignments))
  NotebookClient(notebook, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': ROOT}}).execute()
  nbformat.write(notebook, tmp_path / name)
  return notebook


def test_finetune_notebook_offline(tmp_path):
  pretrained = tmp_path / 'pretrain'
  train.train_and_evaluate(tiny_config('--config.total_steps=40', '--config.eval_every=40',
                                       '--config.checkpoint_every=40'), str(pretrained))
  notebook = run_notebook('finetune.ipynb', tmp_path, CHECKPOINT=str(pretrained / 'model.npz'),
                          IMAGE_SIZE=12, BATCH=32, STEPS=40, WARMUP_STEPS=4,
                          SEGMENTATION_SIZE=32, SEGMENTATION_STEPS=20)
  text = '\n'.join(output.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                   for output in cell.outputs)
  assert 'Pre-trained at (8, 8), fine-tuning at 12x12.' in text
  assert 'after fine-tuning:' in text
  images = sum('image/png' in output.get('data', {}) for cell in notebook.cells
               if cell.cell_type == 'code' for output in cell.outputs)
  assert 'mIoU' in text and 'disc:' in text
  # Inputs, loss curve, predictions, attention maps, segmentations.
  assert images == 5
