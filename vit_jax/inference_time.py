"""config.trainer='inference_time': img/s/core of the forward pass of a model, for a batch
(`batch_eval`) and resolution (`pp.crop`), written to the metric writer, the log and
`<workdir>/inference_time.json`."""

import logging
import time

import jax
import numpy as np

from vit_jax import config_lib, sharding, train

REPETITIONS = 10


def median_seconds(fn, repetitions: int = REPETITIONS) -> float:
  """Median wall time of fn() (its result waited for) after one warm-up call."""
  jax.block_until_ready(fn())
  seconds = []
  for _ in range(repetitions):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def inference_time(config, workdir: str) -> dict:
  mesh, writer = train.setup(config, workdir)
  num_classes = config.num_classes or config_lib.dataset_info(config.dataset).get('num_classes', 1000)
  model = train.create_model(config, num_classes)
  height, width = config_lib.image_size(config)
  images = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(0), (config.batch_eval, height, width, 3), minval=-1),
      sharding.batch_sharding(mesh))
  params = jax.jit(lambda rng: model.init(rng, images[:1], train=False)['params'],
                   out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))

  start = time.perf_counter()
  jax.block_until_ready(forward(params, images))  # Compiles.
  compile_seconds = time.perf_counter() - start
  batch_seconds = median_seconds(lambda: forward(params, images))
  results = {
      'inference_img_sec_core': config.batch_eval / batch_seconds / jax.device_count(),
      'inference_sec_per_batch': batch_seconds,
      'compile_sec': compile_seconds,
  }
  writer.write_scalars(0, results)
  writer.flush()
  logging.info('%s at %dx%d, batch %d on %d devices: %.1f img/s/core (median of %d batches, '
               '%.4f s each).', config.model.model_name, height, width, config.batch_eval,
               jax.device_count(), results['inference_img_sec_core'], REPETITIONS, batch_seconds)
  train.write_results(workdir, 'inference_time.json',
                      dict(results, model=config.model.model_name, batch=config.batch_eval,
                           image_size=[height, width], devices=jax.device_count()))
  return results
