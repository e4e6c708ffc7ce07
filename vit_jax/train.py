"""The trainers: the training loop, `train_and_evaluate(config, workdir)`, and
`evaluate(config, workdir)`.

Flat and in sections: parameters I/O, loop, evaluation. The model, its state and the jitted
steps are steps.py's; one train step runs over a mesh of every device of every process, each
process feeds its share of the global batch; only process 0 writes logs, results (results.py)
and the exported model. `make_update_fn` is the official repository's pmap step, for its
notebook.

TensorFlow (the input pipeline) and clu are imported by the functions that read data and write
logs, so that the benchmarks run on a bare accelerator install.
"""

import contextlib
import json
import logging
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import (checkpoint, config_lib, evaluators, mfu, models, multihost, objectives, optim,
                     resume, sharding)
from vit_jax.results import (accumulated_results, append_results, read_results, run_evaluator,
                             write_results)
from vit_jax.steps import (abstract_params, abstract_state, accumulate_gradient, create_model,
                           make_eval_step, make_train_step, shardings_of)
from vit_jax.workdir import (CHECKPOINT_DIR, EXPORT_FILE, PARAMS_DEFINING_KEYS, Workdir,
                             WorkdirLock, make_writable_directory, remove_temporaries)


# ---------------------------------------------------------------- the official repository's step

def make_update_fn(*, apply_fn, accum_steps: int, tx):
  """The official repository's data-parallel step, for its notebook: jax.pmap over axis 'batch'
  of (params, opt_state, batch {'image', 'label' one-hot}, rng) -> (params, opt_state, loss,
  next rng), each with a leading device axis; softmax cross-entropy, gradients averaged over the
  devices. (The trainer's step, make_train_step, is one jit over a device mesh instead.)"""
  def loss_fn(params, images, labels, rng):
    logits = apply_fn({'params': params}, images, train=True, rngs={'dropout': rng})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()

  def update_fn(params, opt_state, batch, rng):
    rng, next_rng = jax.random.split(rng)
    rng = jax.random.fold_in(rng, jax.lax.axis_index('batch'))  # Dropout differs per device.
    loss, grads = jax.lax.pmean(accumulate_gradient(
        jax.value_and_grad(loss_fn), params, batch['image'], batch['label'], rng, accum_steps),
                                axis_name='batch')
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, next_rng

  return jax.pmap(update_fn, axis_name='batch', donate_argnums=(0,))


# ------------------------------------------------------------------------------ parameters I/O

def load_pretrained_params(config, params, mesh, image_size, **kwargs):
  restored = checkpoint.load_pretrained(
      pretrained_path=config.pretrained_path, init_params=sharding.gather(params, mesh),
      model_config=config.model, image_size=image_size, **kwargs)
  return jax.tree.map(
      lambda value, like: jax.make_array_from_callback(value.shape, like.sharding,
                                                       lambda index: value[index]),
      restored, params)


def export_params(params, path: str, mesh, config, class_names=None, num_classes=None):
  """Writes the parameters as an official-layout .npz that carries its model config, class
  names and input normalisation (gathered to every process first)."""
  params = sharding.gather(params, mesh)
  if jax.process_index() == 0:
    checkpoint.save(params, path, model_config=config.model, num_classes=num_classes,
                    image_size=config_lib.image_size(config),
                    multi_label=objectives.kind(config) is objectives.MultiLabel,
                    class_names=class_names, preprocessing=config_lib.normalisation(config))


def check_normalisation(config):
  """Refuses to fine-tune pretrained_path on inputs normalised otherwise than it was trained
  with (a DINOv2 file on [-1, 1] pixels learns, but from a needlessly shifted start)."""
  expected = checkpoint.read_preprocessing(config.pretrained_path)
  as_pp = lambda n: ('[-1, 1]' if n is None else
                     f'--config.pp.mean={tuple(n["mean"])} --config.pp.std={tuple(n["std"])}')
  configured = config_lib.normalisation(config)
  same = lambda a, b: (a is None) == (b is None) and (a is None or all(
      np.allclose(a[k], b[k]) for k in ('mean', 'std')))
  if not same(expected, configured):
    raise ValueError(
        f'pretrained_path={config.pretrained_path!r} expects inputs normalised as '
        f'{as_pp(expected)}, but the config normalises as {as_pp(configured)}: set the '
        f'former (configs/finetune.py:<checkpoint>,<dataset> does). Nothing was trained.')


# ----------------------------------------------------------------------------------------- loop

def check_finite(step_metrics, first_step, last_checkpoint):
  """Stops the run at the first step whose loss, gradient or update is not finite."""
  for offset, metrics in enumerate(step_metrics):
    if not all(np.isfinite(metrics[k]) for k in ('train_loss', 'grad_norm', 'update_norm')):
      raise FloatingPointError(
          f'Non-finite training at step {first_step + offset + 1}: train_loss '
          f'{metrics["train_loss"]}, grad_norm {metrics["grad_norm"]}, update_norm '
          f'{metrics["update_norm"]}. That step was not applied '
          f'and nothing after it saved; the last checkpoint is of step {last_checkpoint}. '
          'Lower base_lr or raise warmup_steps.')


class Progress:
  """Logs step, %, img/s/core, achieved TFLOP/s per device with the MFU, and ETA every `every`
  steps; writes img_sec_core_train, tflops_per_device_train and mfu_train."""

  def __init__(self, total_steps, batch, writer, train_flops_per_image=None, peak_flops=None):
    self.total_steps, self.batch, self.writer = total_steps, batch, writer
    self.train_flops_per_image, self.peak_flops = train_flops_per_image, peak_flops
    self.last_step, self.last_time = None, None

  def start(self, step):
    self.last_step, self.last_time = step, time.perf_counter()

  def report(self, step, train_metrics):
    now = time.perf_counter()
    steps, seconds = step - self.last_step, now - self.last_time
    img_sec_core = self.batch * steps / seconds / jax.device_count()
    eta = (self.total_steps - step) * seconds / max(steps, 1)
    summary = {k: float(np.mean([m[k] for m in train_metrics])) for k in train_metrics[0]}
    speed = {'img_sec_core_train': img_sec_core}
    utilisation = ''
    if self.train_flops_per_image:
      speed['tflops_per_device_train'] = img_sec_core * self.train_flops_per_image / 1e12
      tflops = speed['tflops_per_device_train']
      utilisation = (f', {tflops:.3g} TFLOP/s/device' if tflops >= 1 else
                     f', {tflops * 1e3:.3g} GFLOP/s/device')
      if self.peak_flops:
        speed['mfu_train'] = speed['tflops_per_device_train'] * 1e12 / self.peak_flops
        utilisation += f' (MFU {speed["mfu_train"]:.1%})'
    self.writer.write_scalars(step, dict(summary, **speed))
    logging.info('step %d/%d (%.1f%%), train_loss %.4f, lr %.2e, %.1f img/s/core%s, ETA %s',
                 step, self.total_steps, 100 * step / self.total_steps, summary['train_loss'],
                 summary['lr'], img_sec_core, utilisation,
                 time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.start(step)
    return summary


class Profile:
  """A jax.profiler trace of steps [first_step, first_step + num_steps) into `directory`."""

  def __init__(self, directory, *, first_step, num_steps):
    self.directory, self.first_step, self.num_steps = directory, first_step, num_steps
    self.tracing = False

  def before(self, step, state):
    """Called before each step runs (`step` steps done so far)."""
    if self.num_steps and step == self.first_step:
      jax.profiler.start_trace(self.directory)
      self.tracing = True
    elif self.tracing and step == self.first_step + self.num_steps:
      jax.block_until_ready(state)
      self.stop()

  def stop(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
      logging.info('Wrote a profile of %d steps to %s.', self.num_steps, self.directory)


@contextlib.contextmanager
def opened_workdir(config, workdir):
  """Checks the config, creates and locks the workdir; yields the mesh and the metric writer.

  Every entry point that writes into a workdir opens it here, so two runs never share one;
  `lock.check` tells a long run that its lock was lost.
  """
  config_lib.check(config, device_count=jax.device_count(), process_count=jax.process_count())
  multihost.agree('config', {'workdir': workdir, **json.loads(config.to_json_best_effort())})
  if config.compilation_cache_dir:  # Before anything of the run compiles.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))
  if jax.process_index() == 0:
    try:
      make_writable_directory(workdir)
    except OSError as e:
      raise ValueError(f'workdir {workdir} is not writable ({e.strerror}).') from None
  with WorkdirLock(workdir) as lock:
    if jax.process_index() == 0:
      remove_temporaries(workdir)
    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    mesh = sharding.make_mesh()
    logging.info('Mesh: %d devices in %d processes, %s.', jax.device_count(),
                 jax.process_count(), dict(mesh.shape))
    try:
      yield mesh, writer, lock
    finally:
      writer.close()


def _pipeline(config):
  """The input pipeline module of the run's objective: classification-style or dense."""
  if objectives.kind(config).dense:
    from vit_jax import dense_pipeline
    return dense_pipeline
  from vit_jax import input_pipeline
  return input_pipeline


def _source(config, split):
  """This process' shard of `split`, once every process agrees on what the split holds."""
  source = _pipeline(config).get_source(config, split, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  multihost.agree(f'data ({config.dataset}, {split})', {
      'examples': source.num_examples, 'classes': source.num_classes,
      'class names': list(source.class_names or ())})
  return source


def _refuse_to_overwrite_the_source(config, workdir):
  export = os.path.join(workdir, EXPORT_FILE)
  source = config.pretrained_path
  if (source and '://' not in source and os.path.exists(source) and os.path.exists(export) and
      os.path.samefile(source, export)):
    raise ValueError(f'pretrained_path={source!r} is the {EXPORT_FILE} this run would '
                     f'write in workdir {workdir}: fine-tune into another workdir (the source is '
                     'kept).')


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and exports; resumes from the latest checkpoint in workdir if any."""
  config = config_lib.with_augreg_file(config)
  _refuse_to_overwrite_the_source(config, workdir)
  with opened_workdir(config, workdir) as (mesh, writer, lock):
    return _train_and_evaluate(config, workdir, mesh, writer, lock)


def _train_and_evaluate(config, workdir, mesh, writer, lock) -> dict:
  start_time = time.time()
  earlier_results = read_results(workdir)  # Before any work: an unreadable one is named now.
  train_source = _source(config, config.train_split)
  objective = objectives.from_config(config, train_source.num_classes)
  image_size = config_lib.image_size(config)
  record = Workdir(workdir)
  record.check_compatible(config, num_outputs=objective.num_outputs, image_size=image_size)
  class_names = train_source.class_names if objective.uses_labels else None
  record.check_classes(class_names)
  record.check_pretrained_path(config)
  if config.pretrained_path and not record.has_checkpoints():
    check_normalisation(config)

  model = create_model(config, objective.num_outputs)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config)
  abstract, create_state = abstract_state(config, model, tx, mesh, image_size, objective)
  shardings = shardings_of(abstract)
  eval_step = make_eval_step(objective, model, shardings['params'], mesh)
  # Opens their data now.
  evals = evaluators.build(config, model, objective, eval_step, mesh, shardings['params'])

  checkpoints = resume.Checkpoints(workdir, config.keep_checkpoints)
  state = checkpoints.restore_latest(abstract)
  if state is None:
    state = create_state()
    if config.pretrained_path:
      params = load_pretrained_params(config, state['params'], mesh, image_size,
                                      reinit_head=config.reinit_head)
      state = dict(state, params=params, opt_state=jax.jit(
          tx.init, out_shardings=shardings['opt_state'])(params))
  step = last_checkpoint = start_step = int(jax.device_get(state['step']))
  record.record_start(config, num_outputs=objective.num_outputs, image_size=image_size,
                      start_step=step, class_names=class_names)
  if jax.process_index() == 0:
    from clu import parameter_overview
    parameter_overview.log_parameter_overview(state['params'])
  writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                        for k, v in flax.traverse_util.flatten_dict(
                            config.to_dict(), sep='.').items()})

  train_step = make_train_step(config, model, tx, schedule, shardings, mesh, objective)

  local_batch = config.batch // jax.process_count()
  batches = _pipeline(config).train_batches(config, train_source, batch_size=local_batch,
                                            start_step=step)
  forward_flops = mfu.forward_flops_per_image(
      model, abstract['params'], image_size,
      **objective.init_inputs(jax.random.PRNGKey(0), config.model, image_size))
  progress = Progress(config.total_steps, config.batch, writer,
                      train_flops_per_image=forward_flops and 3 * forward_flops,
                      peak_flops=mfu.device_peak_flops())
  progress.start(step)
  preemption = resume.Preemption()
  # Metrics of the steps since the last report: `pending` still on device, `checked` fetched
  # and found finite. `evaluated`: each evaluator's latest metrics.
  pending, checked, summary, evaluated = [], [], {}, {}

  def check_pending():
    nonlocal pending
    fetched = jax.device_get(pending)
    check_finite(fetched, step - len(pending), last_checkpoint)
    checked.extend(fetched)
    pending = []

  profile = Profile(os.path.join(workdir, 'profile'), first_step=step + 1,
                    num_steps=config.profile_steps)
  try:
    while step < config.total_steps:
      profile.before(step, state)
      state, metrics = train_step(state, sharding.to_global(next(batches), mesh))
      pending.append(metrics)
      step += 1
      checkpoints.check_save(step)  # A failed asynchronous save stops the run now.
      if step % config.progress_every == 0 or step == config.total_steps:
        check_pending()
        summary = progress.report(step, checked)
        checked.clear()
      for name, evaluator in evals.items():
        if step % evaluator.every == 0 or step == config.total_steps:
          evaluated[name] = run_evaluator(name, evaluator, state['params'], step, writer)
          progress.start(step)  # Evaluation time is not training throughput.
      preempted = preemption.reached(step)
      saving = step % config.checkpoint_every == 0 or step == config.total_steps or preempted
      if saving or jax.process_count() == 1:  # (Several processes: a collective, so rarely.)
        lock.check(step)
      if saving:
        check_pending()
        checkpoints.save(step, state)
        last_checkpoint = step
      if preempted:
        checkpoints.wait(step)
        write_results(workdir, 'results.json', accumulated_results(
            earlier_results, dict(step=step, train_loss=summary.get('train_loss'), **evaluated),
            start_step=start_step, start_time=start_time))
        logging.warning('Preempted: saved the checkpoint of step %d; run the same command to '
                        'resume.', step)
        return {'preempted_at_step': step}
  except BaseException:
    checkpoints.finish_quietly()
    raise
  finally:
    profile.stop()
    preemption.close()
  checkpoints.wait(step)

  for name, evaluator in evals.items():  # Resumed at the end: evaluate what was restored.
    if name not in evaluated:
      evaluated[name] = run_evaluator(name, evaluator, state['params'], step, writer)
  lock.check(step)
  export_params(state['params'], os.path.join(workdir, EXPORT_FILE), mesh, config,
                class_names, num_classes=objective.num_outputs)
  results = accumulated_results(
      earlier_results, dict(step=step, train_loss=summary.get('train_loss'), **evaluated),
      start_step=start_step, start_time=start_time)
  write_results(workdir, 'results.json', results)
  writer.flush()
  return results


def with_exported_model(config):
  """The config with the model an export describes (the recipe's config.model may be another
  one: a model trained with posemb='sincos2d' has no parameter that says so) and the input
  normalisation it expects; how it computes (remat, scan, attention) stays the config's. Files
  without a description are unchanged."""
  export = checkpoint.read_description(config.pretrained_path)
  if export is None:
    return config
  model = export.config
  for key in models.IMPLEMENTATION_DEFAULTS:
    model.transformer[key] = config.model.transformer[key]
  described, configured = (flax.traverse_util.flatten_dict(c.to_dict(), sep='.')
                           for c in (model, config.model))
  differing = sorted(k for k in described.keys() | configured.keys()
                     if described.get(k) != configured.get(k))
  if differing:
    logging.info('Evaluating %s as the model it describes (model.%s differ from the config).',
                 config.pretrained_path, ', model.'.join(differing))
  if config_lib.normalisation(config) != export.preprocessing:
    logging.info('Evaluating %s on inputs normalised as it describes (%s).',
                 config.pretrained_path, export.preprocessing or '[-1, 1]')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = model
    config_lib.set_normalisation(config, export)
  return config


def evaluate(config, workdir: str) -> dict:
  """{evaluator name: metrics} of config.pretrained_path (.npz), or else of the latest checkpoint
  in workdir: every evaluator of config.evals that is on (an ImageNet-1k recipe: validation,
  ReaL and v2)."""
  config = config_lib.with_augreg_file(config)
  if config.pretrained_path:
    config_lib.check(config, device_count=jax.device_count(), process_count=jax.process_count())
    config = with_exported_model(config)
  with opened_workdir(config, workdir) as (mesh, writer, lock):
    source = _source(config, config.test_split)
    objective = objectives.from_config(config, source.num_classes)
    image_size = config_lib.image_size(config)
    model = create_model(config, objective.num_outputs)
    record = Workdir(workdir)
    if not config.pretrained_path:  # Before anything is built: the workdir's run must match.
      record.check_compatible(config, num_outputs=objective.num_outputs, image_size=image_size,
                              keys=PARAMS_DEFINING_KEYS)
      record.check_classes(source.class_names if objective.uses_labels else None)
    abstract, create_params = abstract_params(config, model, mesh, image_size, objective)
    params_shardings = shardings_of(abstract)
    eval_step = make_eval_step(objective, model, params_shardings, mesh)
    evals = evaluators.build(config, model, objective, eval_step, mesh, params_shardings)
    if config.pretrained_path:
      params = load_pretrained_params(config, create_params(), mesh, image_size,
                                      reinit_head=False)
      step, evaluated = 0, config.pretrained_path
    else:  # Only the parameters are read: the optimizer of the run does not matter.
      step_abstract = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
      restored = resume.Checkpoints(workdir, config.keep_checkpoints,
                                    saving=False).restore_latest(
          {'params': abstract, 'step': step_abstract}, partial=True)
      if restored is None:
        raise ValueError(f'Nothing to evaluate: no pretrained_path and no checkpoint in {workdir}.')
      params, step = restored['params'], int(restored['step'])
      evaluated = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    record.record_start(config, num_outputs=objective.num_outputs, image_size=image_size,
                        start_step=step,
                        class_names=source.class_names if objective.uses_labels else None)
    results = {name: run_evaluator(name, evaluator, params, step, writer)
               for name, evaluator in evals.items()}
    lock.check(step)
    append_results(workdir, 'eval_results.json', dict(
        results, evaluated=evaluated, dataset=config.dataset, step=step))
    writer.flush()
    return results


if __name__ == '__main__':  # The official repository's habit; the trainer runs through main.py.
  import sys
  sys.exit('vit_jax.train is not a command: run python -m vit_jax.main '
           '--config=configs/<recipe>.py:<args> --workdir=DIR (every flag: '
           'python -m vit_jax.main --helpfull).')
