"""What a run measured: each evaluator's metrics into TensorBoard and the log, and the workdir's
results files (results.json accumulated over the starts of a resumed run, eval_results.json
and inference_time.json appended to). Only process 0 writes."""

import json
import logging
import os
import time

import jax

from vit_jax import files
from vit_jax.workdir import append_json, read_json


def run_evaluator(name, evaluator, params, step, writer) -> dict:
  metrics = evaluator.run(params)  # Scalars, and lists (a reliability diagram's bins).
  scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
  writer.write_scalars(step, {f'{name}/{k}': v for k, v in scalars.items()})
  logging.info('step %d: %s: %s', step, name,
               ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()))
  return metrics


def read_results(workdir) -> dict:
  """The results.json of the workdir's earlier starts ({} if none)."""
  earlier = read_json(os.path.join(workdir, 'results.json'))
  return earlier if isinstance(earlier, dict) else {}


def accumulated_results(earlier: dict, results: dict, *, start_step, start_time) -> dict:
  """This start's results on top of the earlier starts' (a resumed or restarted run): what
  this start did not measure (the train loss of a finished run started again, an evaluator
  that did not run) is kept, the wall time is summed over `segments` (one per start)."""
  segments = list(earlier.get('segments') or [])
  if not segments and 'wall_time_sec' in earlier:  # Written before segments were recorded.
    segments = [{'end_step': earlier.get('step'), 'wall_time_sec': earlier['wall_time_sec']}]
  segments.append({'start_step': start_step, 'end_step': results['step'],
                   'wall_time_sec': round(time.time() - start_time, 3)})
  kept = {k: v for k, v in earlier.items() if isinstance(v, dict)}  # Evaluators' metrics.
  merged = dict(kept, **{k: v for k, v in results.items() if v is not None})
  merged.setdefault('train_loss', earlier.get('train_loss'))
  merged['wall_time_sec'] = round(sum(s['wall_time_sec'] for s in segments), 3)
  merged['segments'] = segments
  return merged


def write_results(workdir, name, results):
  """<workdir>/<name> as JSON, from process 0, never half-written."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, name)
    files.write_bytes(path, json.dumps(results, indent=2).encode())
    logging.info('Wrote %s: %s', path, results)


def append_results(workdir, name, results):
  """Adds `results` to the list in <workdir>/<name>: earlier entries are kept."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, name)
    append_json(path, dict(results, time=time.strftime('%Y-%m-%d %H:%M:%S')))
    logging.info('Added to %s: %s', path, results)
