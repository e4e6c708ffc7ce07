"""config.trainer='inference_time': img/s/core of the forward pass of a model, for a batch
(`batch_eval`) and resolution (`pp.crop`), written to the metric writer, the log and
`<workdir>/inference_time.json` (a list: earlier measurements are kept). A config that names its
model by `model_name` and says how many batches to time (`steps`, after `initial_steps` of
warm-up), as the official one (vit_jax/configs/inference_time.py), is timed so."""

import logging
import time

import jax
import numpy as np

from vit_jax import config_lib, models, objectives, sharding, steps, train
from vit_jax.results import append_results

REPETITIONS = 10


def median_seconds(fn, repetitions: int = REPETITIONS, warmup: int = 1) -> float:
  """Median wall time of fn() (its result waited for) after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(repetitions):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def inference_time(config, workdir: str) -> dict:
  if config.get('model_name'):  # The official config's way of naming the model.
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model = models.get_config(config.model_name)
  repetitions, warmup = config.get('steps', REPETITIONS), config.get('initial_steps', 1)
  with train.opened_workdir(config, workdir) as (mesh, writer, _):
    num_classes = config.num_classes or config_lib.dataset_info(config.dataset).get(
        'num_classes', 1000)
    objective = objectives.from_config(config, num_classes)
    model = steps.create_model(config, objective.num_outputs)
    height, width = config_lib.image_size(config)
    images = jax.device_put(
        jax.random.uniform(jax.random.PRNGKey(0), (config.batch_eval, height, width, 3),
                           minval=-1), sharding.batch_sharding(mesh))
    _, create_params = steps.abstract_params(config, model, mesh, (height, width), objective)
    params = create_params()
    forward = jax.jit(sharding.under_mesh(
        lambda p, x: model.apply({'params': p}, x, train=False), mesh))

    start = time.perf_counter()
    jax.block_until_ready(forward(params, images))  # Compiles.
    compile_seconds = time.perf_counter() - start
    batch_seconds = median_seconds(lambda: forward(params, images), repetitions, warmup)
    results = {
        'inference_img_sec_core': config.batch_eval / batch_seconds / jax.device_count(),
        'inference_sec_per_batch': batch_seconds,
        'compile_sec': compile_seconds,
    }
    writer.write_scalars(0, results)
    writer.flush()
    logging.info('%s at %dx%d, batch %d on %d devices: %.1f img/s/core (median of %d batches, '
                 '%.4f s each).', config.model.model_name, height, width, config.batch_eval,
                 jax.device_count(), results['inference_img_sec_core'], repetitions,
                 batch_seconds)
    append_results(workdir, 'inference_time.json',
                   dict(results, model=config.model.model_name, batch=config.batch_eval,
                        image_size=[height, width], devices=jax.device_count()))
    return results


if __name__ == '__main__':  # The official repository's habit; the timer runs through main.py.
  import sys
  sys.exit('vit_jax.inference_time is not a command: run python -m vit_jax.main '
           '--config=configs/<recipe>.py:<args> --config.trainer=inference_time '
           '--workdir=DIR (every flag: python -m vit_jax.main --helpfull).')
