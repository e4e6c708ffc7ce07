r"""Will a run fit the devices it is sent to? The compiler says, before the slice is paid for.

python -m vit_jax.plan --config=configs/pretrain.py:B_16,imagenet21k --topology=v3:4x4 \
    [--config.<key>=<value> ...] [--auto_fit [--allow_bfloat16]] [--json]

Compiles the run's own train step and eval step (steps.make_train_step / make_eval_step, the
functions vit_jax.main runs) for the devices of `--topology`, with abstract parameters and
batches (nothing is allocated), and prints per device what the compiler's memory analysis says:
arguments, outputs, temporaries, code, and their total against the chip's HBM.

--topology  a TPU slice, e.g. v3:4x4, v4:2x2x2, v5e:16x16, v5p:2x2x1, v6e:2x2: the real XLA:TPU
            compiler through libtpu (`pip install -e '.[tpu]'`), on any host, no TPU needed;
            cpu:N: N simulated CPU devices (buffer sizes carry over, TPU fusion does not);
            none: this machine's own devices (a TPU VM's chips).
--auto_fit  where the run does not fit, searches the settings that change memory but not the
            mathematics of the update (sharding, rematerialisation, scan, gradient accumulation
            at the same global batch; bfloat16 optimizer state and activations only with
            --allow_bfloat16), cheapest first, compiling each, and prints the cheapest that fits
            as --config flags that vit_jax.main accepts as they are.
--json      the last line is one JSON object (topology, device_kind, devices, fits, total_gib,
            hbm_gib, temp_gib, argument_gib, output_gib, code_gib, compile_s, tflop_per_device,
            overrides, ...).

The usable HBM per chip is the compiler's own figure: a probe program too large for any chip
makes it state what it has (`RESOURCE_EXHAUSTED ... exceeds available HBM (15.48G)`).
"""

import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Optional

from absl import app, flags

FLAGS = flags.FLAGS

GIB = 2**30
# Memory-only settings and what each costs in speed, roughly (a fraction of the step time): the
# search tries the cheapest combination first. Rematerialisation recomputes the forward pass
# (full: about a third more FLOPs); accumulation runs smaller matmuls one after the other; FSDP
# gathers each weight where it is used; scan only changes how the layers are compiled.
REMAT_COST = {'none': 0.0, 'dots_no_batch': 0.10, 'dots': 0.15, 'full': 0.33}
ACCUM_STEPS = (1, 2, 4, 8, 16)
ACCUM_COST = 0.03  # Per doubling.
FSDP_COST = 0.05
BFLOAT16_COST = 0.01  # Allowed only with --allow_bfloat16: it changes the numerics.


class PlanError(ValueError):
  """The plan cannot be made (topology, libtpu, config)."""


@dataclasses.dataclass
class Plan:
  topology: str
  device_kind: str
  devices: int
  fits: Optional[bool]  # None on CPU devices (no memory limit to fit).
  hbm_gib: Optional[float]
  argument_gib: float = 0.0
  output_gib: float = 0.0
  alias_gib: float = 0.0
  temp_gib: float = 0.0
  code_gib: float = 0.0
  total_gib: float = 0.0
  eval_total_gib: float = 0.0
  compile_s: float = 0.0
  tflop_per_device: float = 0.0
  overrides: dict = dataclasses.field(default_factory=dict)
  error: str = ''  # The compiler's words when it does not fit.

  def flags(self) -> str:
    return ' '.join(f'--config.{k}={v}' for k, v in self.overrides.items())


# ------------------------------------------------------------------------------------ devices

def topology_devices(topology: Optional[str]):
  """(devices, name) for --topology (see the module docstring)."""
  import jax
  if not topology or topology == 'none':
    return jax.devices(), f'{jax.devices()[0].platform}:{jax.device_count()}'
  kind, _, shape = topology.partition(':')
  if kind == 'cpu':
    if not shape.isdigit() or int(shape) < 1:
      raise PlanError(f'--topology={topology}: expected cpu:N with N >= 1.')
    devices = jax.devices('cpu')
    if len(devices) < int(shape):
      raise PlanError(f'--topology={topology}: this process has {len(devices)} CPU devices; '
                      f'start it with XLA_FLAGS=--xla_force_host_platform_device_count='
                      f'{shape} (python -m vit_jax.plan sets it itself).')
    return devices[:int(shape)], topology
  try:
    import libtpu  # pylint: disable=unused-import
  except ImportError:
    raise PlanError(f'--topology={topology} needs the TPU compiler (libtpu): pip install -e '
                    "'.[tpu]'. (--topology=cpu:N simulates N CPU devices without it.)") from None
  from jax.experimental import topologies
  # Compile-only programs cannot be loaded back from JAX's persistent cache: keep them out.
  jax.config.update('jax_enable_compilation_cache', False)
  # v4 and v5p chips hold two cores that their runtime joins into one device (megacore).
  chip = {'chip_config_name': 'megacore'} if kind in ('v4', 'v5p') else {}
  try:
    description = topologies.get_topology_desc(topology_name=topology, platform='tpu', **chip)
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(f'--topology={topology} is not a TPU slice libtpu knows ({str(e)[:300]}); '
                    'expected e.g. v3:4x4, v4:2x2x2, v5e:16x16, v5p:2x2x1, v6e:2x2, or cpu:N.'
                    ) from None
  return list(description.devices), topology


_HBM = {}


def hbm_gib(device) -> Optional[float]:
  """The compiler's figure of the HBM a program may use on `device`'s chip; None on a CPU."""
  if device.platform == 'cpu':
    return None
  if device.device_kind not in _HBM:
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    probe = jax.jit(lambda x: x * 2, out_shardings=SingleDeviceSharding(device))
    try:
      probe.lower(jax.ShapeDtypeStruct((2**40,), jnp.float32,
                                       sharding=SingleDeviceSharding(device))).compile()
      _HBM[device.device_kind] = None
    except Exception as e:  # pylint: disable=broad-except
      _HBM[device.device_kind] = _available_hbm(str(e))
  return _HBM[device.device_kind]


def _available_hbm(message: str) -> Optional[float]:
  found = re.search(r'available HBM \(([\d.]+)([KMGT])\)', message)
  if not found:
    return None
  return float(found.group(1)) * 1024.0**'KMGT'.index(found.group(2)) / 1024**2


# ---------------------------------------------------------------------------------- compiling

def _num_classes(config) -> int:
  from vit_jax import datasets
  if config.num_classes:
    return config.num_classes
  known = next((info['num_classes'] for name, info in datasets.DATASETS.items()
                if config.dataset in (name, info.get('dataset'))), None)
  known = known or datasets.SEGMENTATION_TFDS.get(config.dataset)
  if known is None:
    raise PlanError(f'The plan reads no data: say how many classes {config.dataset!r} has with '
                    '--config.num_classes=K.')
  return known


def _abstract_batch(config, objective, image_size, batch_size, train: bool):
  import jax
  import jax.numpy as jnp
  from vit_jax import objectives
  if objectives.kind(config).dense:
    raise PlanError(f'--config.objective={config.objective}: the plan compiles classification-'
                    'style steps (classification, multi-label, masked patch prediction) so far.')
  h, w = image_size
  batch = {'image': jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
           'labels': jax.ShapeDtypeStruct((batch_size, objective.num_outputs), jnp.float32)}
  if not train:
    batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  return batch


def _steps(config, mesh, train_step: bool = True, eval_step: bool = True):
  """The lowered train and eval steps of `config` on `mesh` (None where not asked for), as
  vit_jax.main builds them."""
  from vit_jax import config_lib, objectives, optim, steps
  objective = objectives.from_config(config, _num_classes(config))
  model = steps.create_model(config, objective.num_outputs)
  tx, schedule = optim.make_optimizer(config), optim.make_schedule(config)
  image_size = config_lib.image_size(config)
  abstract, _ = steps.abstract_state(config, model, tx, mesh, image_size, objective)
  shardings = steps.shardings_of(abstract)
  lowered_train = lowered_eval = None
  if train_step:
    step = steps.make_train_step(config, model, tx, schedule, shardings, mesh, objective)
    lowered_train = step.lower(abstract, _abstract_batch(config, objective, image_size,
                                                         config.batch, True))
  if eval_step:
    step = steps.make_eval_step(objective, model, shardings['params'], mesh)
    lowered_eval = step.lower(abstract['params'], _abstract_batch(config, objective, image_size,
                                                                  config.batch_eval, False))
  return lowered_train, lowered_eval


def _flops_per_device(config, devices: int) -> float:
  """The step's FLOPs per device, from XLA's count of the global program lowered for one CPU
  device (an analysis of the program, nothing compiled; the same FLOPs as the TPU program's). A
  loop's body counts once there: a scanned encoder or accumulated micro-batches are counted from
  the same step unrolled, at once."""
  import jax
  from vit_jax import sharding
  flat = config.copy_and_resolve_references()
  with flat.unlocked():
    flat.model.transformer.scan = False
    flat.accum_steps = 1
  lowered = _steps(flat, sharding.make_mesh(jax.devices('cpu')[:1]), eval_step=False)[0]
  return float(lowered.cost_analysis()['flops']) / devices


def compile_plan(config, devices, topology: str, overrides=None, eval_step: bool = True) -> Plan:
  """Compiles `config` (with `overrides`, dotted keys) for `devices`; never raises for memory.
  `eval_step=False`: the train step only (the search's candidates: the eval step, without
  gradients or optimizer state, is the smaller one)."""
  from vit_jax import config_lib, sharding
  config = with_overrides(config, overrides or {})
  # The steps take abstract parameters: the plan reads no checkpoint (nor reaches its gs://).
  config_lib.check(with_overrides(config, {'pretrained_path': ''}), device_count=len(devices))
  mesh = sharding.make_mesh(devices)
  plan = Plan(topology=topology, device_kind=devices[0].device_kind, devices=len(devices),
              fits=None, hbm_gib=hbm_gib(devices[0]), overrides=dict(overrides or {}))
  start = time.perf_counter()
  try:
    compiled = _steps(config, mesh, eval_step=False)[0].compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
      raise
    plan.compile_s = time.perf_counter() - start
    plan.fits = False
    plan.error = next((line.strip() for line in text.splitlines() if 'exceeds' in line or
                       'Ran out of memory' in line), text.splitlines()[0])[:400]
    plan.hbm_gib = plan.hbm_gib or _available_hbm(text)
    required = re.search(r'required for [^(]*\(([\d.]+)([KMGT])\)', text)
    if required:  # Its temporaries alone; the total is at least that.
      plan.temp_gib = plan.total_gib = (
          float(required.group(1)) * 1024.0**'KMGT'.index(required.group(2)) / 1024**2)
    return plan
  plan.compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  plan.argument_gib = memory.argument_size_in_bytes / GIB
  plan.output_gib = memory.output_size_in_bytes / GIB
  plan.alias_gib = memory.alias_size_in_bytes / GIB
  plan.temp_gib = memory.temp_size_in_bytes / GIB
  plan.code_gib = memory.generated_code_size_in_bytes / GIB
  # The donated state's outputs reuse its arguments' buffers (aliased): counted once.
  plan.total_gib = (plan.argument_gib + plan.output_gib - plan.alias_gib + plan.temp_gib +
                    plan.code_gib)
  plan.fits = None if devices[0].platform == 'cpu' else True
  if eval_step:
    _add_eval_step(plan, config, mesh)
  return plan


def _add_eval_step(plan: Plan, config, mesh):
  """The eval step's total and the train step's FLOPs, into a plan whose train step fits."""
  start = time.perf_counter()
  memory = _steps(config, mesh, train_step=False)[1].compile().memory_analysis()
  plan.compile_s += time.perf_counter() - start
  plan.eval_total_gib = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes + memory.temp_size_in_bytes +
                         memory.generated_code_size_in_bytes) / GIB
  plan.tflop_per_device = _flops_per_device(config, plan.devices) / 1e12


def with_overrides(config, overrides: dict):
  """A copy of `config` with dotted keys set (as --config.<key>=<value> would)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      *parents, last = key.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[last] = value
  return config


# ----------------------------------------------------------------------------------- auto fit

def _now(config) -> dict:
  transformer = config.model.transformer
  return {'model.transformer.remat': transformer.get('remat', 'none'),
          'model.transformer.scan': bool(transformer.get('scan', False)),
          'sharding': config.sharding, 'accum_steps': max(1, config.accum_steps),
          'optim_dtype': config.optim_dtype, 'dtype': config.dtype}


def candidates(config, devices: int, allow_bfloat16: bool) -> list:
  """Settings that change memory but not the update's mathematics, cheapest first: a list of
  {dotted key: value} holding what differs from `config` (the first is {}: as it is)."""
  now = _now(config)
  per_device = config.batch // devices
  choices = {
      'model.transformer.remat': [r for r in REMAT_COST
                                  if REMAT_COST[r] >= REMAT_COST[now['model.transformer.remat']]],
      'model.transformer.scan': [now['model.transformer.scan'], not now['model.transformer.scan']],
      'sharding': list(dict.fromkeys([now['sharding'], 'fsdp'])),
      'accum_steps': [a for a in ACCUM_STEPS if a >= now['accum_steps'] and per_device % a == 0],
      'optim_dtype': list(dict.fromkeys([now['optim_dtype']] + ['bfloat16'] * allow_bfloat16)),
      'dtype': list(dict.fromkeys([now['dtype']] + ['bfloat16'] * allow_bfloat16)),
  }

  def cost(setting):
    return (REMAT_COST[setting['model.transformer.remat']]
            + ACCUM_COST * math.log2(setting['accum_steps'] / now['accum_steps'])
            + FSDP_COST * (setting['sharding'] != now['sharding'])
            + BFLOAT16_COST * ((setting['optim_dtype'] != now['optim_dtype']) +
                               (setting['dtype'] != now['dtype']))
            + 0.001 * (setting['model.transformer.scan'] != now['model.transformer.scan']))

  settings = sorted((dict(zip(choices, values)) for values in itertools.product(*choices.values())),
                    key=cost)
  return [{k: v for k, v in setting.items() if v != now[k]} for setting in settings]


def auto_fit(config, devices, topology: str, allow_bfloat16: bool = False, log=print) -> Plan:
  """The cheapest setting of `candidates` whose steps the compiler fits on `devices`. The
  costliest setting (the most memory saved) is compiled first: if even it does not fit, the
  search stops there."""
  options = candidates(config, len(devices), allow_bfloat16)

  def attempt(overrides, eval_step=False):
    plan = compile_plan(config, devices, topology, overrides, eval_step)
    log(f'  {plan.flags() or "(as is)"}: ' + (
        f'fits, {plan.total_gib:.2f} of {plan.hbm_gib:.2f} GiB' if plan.fits else
        f'does not fit ({plan.error})' if plan.fits is False else
        f'{plan.total_gib:.2f} GiB (CPU devices: no limit)'))
    return plan

  if len(options) > 1:
    leanest = attempt(options[-1])
    if leanest.fits is False:
      raise PlanError(f'Not even {leanest.flags()} fits on {topology} ({leanest.error}): a '
                      f'larger slice or a smaller batch'
                      f'{"" if allow_bfloat16 else " (or --allow_bfloat16)"}.')
  from vit_jax import sharding
  for overrides in options:
    plan = attempt(overrides)
    if plan.fits is not False:
      _add_eval_step(plan, with_overrides(config, overrides), sharding.make_mesh(devices))
      return plan
  raise AssertionError('unreachable: the leanest setting fits')


# ---------------------------------------------------------------------------------- the CLI

def describe(plan: Plan) -> str:
  hbm = f' of {plan.hbm_gib:.2f} GiB HBM' if plan.hbm_gib else ''
  verdict = {True: 'fits', False: 'DOES NOT FIT', None: 'CPU devices (no HBM limit)'}[plan.fits]
  lines = [f'{plan.topology}: {plan.devices} x {plan.device_kind}: {verdict}'
           + (f' -- {plan.error}' if plan.error else '')]
  if plan.fits is not False:
    lines += [f'  per device: arguments    {plan.argument_gib:8.2f} GiB',
              f'              outputs      {plan.output_gib:8.2f} GiB (aliased to arguments: '
              f'{plan.alias_gib:.2f})',
              f'              temporaries  {plan.temp_gib:8.2f} GiB',
              f'              code         {plan.code_gib:8.2f} GiB',
              f'              total        {plan.total_gib:8.2f} GiB{hbm} (train step); eval '
              f'step {plan.eval_total_gib:.2f} GiB',
              f'  FLOPs per step and device  {plan.tflop_per_device:8.2f} TFLOP']
  lines.append(f'  compile time {plan.compile_s:.1f} s')
  if plan.overrides:
    lines.append(f'  with {plan.flags()}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  import jax
  config = FLAGS.config
  try:
    devices, topology = topology_devices(FLAGS.topology)
    if FLAGS.auto_fit:
      print(f'Searching memory-only settings for {topology}, cheapest first:')
      plan = auto_fit(config, devices, topology, FLAGS.allow_bfloat16,
                      log=lambda line: print(line, flush=True))
    else:
      plan = compile_plan(config, devices, topology)
  except PlanError as e:
    sys.exit(f'error: {e}')
  print(describe(plan))
  if FLAGS.json:
    print(json.dumps({**dataclasses.asdict(plan), 'jax': jax.__version__,
                      'libtpu': _libtpu_version()}))
  if plan.fits is False:
    sys.exit(1)


def _libtpu_version() -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version('libtpu')
  except Exception:  # pylint: disable=broad-except
    return None


def define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Recipe file and its arguments.')
  flags.mark_flags_as_required(['config'])
  flags.DEFINE_string('topology', None, 'v3:4x4, v4:2x2x2, v5e:16x16, ...; cpu:N; none.')
  flags.DEFINE_bool('auto_fit', False, 'Search memory-only settings until the run fits.')
  flags.DEFINE_bool('allow_bfloat16', False, '--auto_fit may also store the optimizer state '
                    'and the activations in bfloat16 (changes the numerics).')
  flags.DEFINE_bool('json', False, 'End with one JSON line.')


def set_up_devices(argv):
  """Before JAX starts: cpu:N devices, and libtpu quiet where there is no TPU (compile-only
  devices need none of its runtime)."""
  topology = next((a.split('=', 1)[1] for a in argv if a.startswith('--topology=')), '')
  if topology.startswith('cpu:') and topology[4:].isdigit():
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={topology[4:]}')
  if topology and topology != 'none':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')


if __name__ == '__main__':
  set_up_devices(sys.argv)
  define_flags()
  app.run(main)
