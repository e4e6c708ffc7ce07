"""What makes XLA's CPU backend train and run ViTs faster: two settings of the process, which
the command lines apply (`tune_command_line`), and the layout of the Dense layers' inputs in
programs compiled for CPU devices (`over_tokens`). TPUs and GPUs ignore all three.

Measured on a 2-core AVX-512 machine (benchmarks/throughput.py, ViT-Ti/16 and ViT-S/16 at 224 px):

1. XLA_FLAGS `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions) leaves every
   dot to Eigen. JAX 0.10's default sends dots to YNNPACK, which runs the attention's batched
   (batch x heads) products at about half of Eigen's speed here: inference goes from ~35 to
   ~85 img/s on ViT-Ti/16. The command lines append the flag unless XLA_FLAGS already names
   it, so set it yourself (e.g. `--xla_cpu_experimental_ynn_fusion_type=individual_dot`) to keep
   YNNPACK. It has to be in the environment before JAX creates its CPU backend: the command
   lines set it (`tune_command_line`); importing vit_jax changes no environment variable, so a
   notebook or a script that wants it calls `set_xla_flags()` before its first computation.

2. GLIBC_TUNABLES `glibc.malloc.hugetlb=1`: XLA allocates each step's temporary buffers with
   malloc, which maps them fresh from the kernel every step and frees them after, so every 4 KiB
   page of activations is faulted in (and zeroed) again on every step: ~400k page faults and a
   third of a second of kernel time per ViT-Ti/16 training step. With transparent huge pages
   there is one fault per 2 MiB. glibc reads the setting only when a process starts, so the
   command-line programs re-execute themselves once with it (`restart_with_huge_pages`).

VIT_JAX_CPU_TUNING=0 in the environment turns both off (`make bench` measures with and without).
"""

import os
import platform
import sys

import jax

XLA_CPU_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def enabled() -> bool:
  return os.environ.get('VIT_JAX_CPU_TUNING', '1') != '0'


def set_xla_flags():
  """Adds XLA_CPU_FLAG to XLA_FLAGS unless the user has already chosen a value for it."""
  flags = os.environ.get('XLA_FLAGS', '')
  if enabled() and XLA_CPU_FLAG.split('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {XLA_CPU_FLAG}'.strip()


def huge_pages_available() -> bool:
  """glibc that knows the tunable (2.35+) and a kernel that grants huge pages on request."""
  name, version = platform.libc_ver()
  if name != 'glibc' or tuple(map(int, version.split('.')[:2])) < (2, 35):
    return False
  try:
    with open(_THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def restart_with_huge_pages():
  """Re-executes the current command once with HUGE_PAGES added to GLIBC_TUNABLES.

  Call it first thing in a program's `__main__`: the process keeps its pid, arguments and
  environment. It does nothing where the tunable is already set or huge pages are unavailable.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if not enabled() or 'glibc.malloc.hugetlb' in tunables or not huge_pages_available():
    return
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, HUGE_PAGES]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def no_tpu_here() -> bool:
  """libtpu is installed (the `tpu` / `test` extras: vit_jax.plan compiles for TPUs with it) but
  this host has no TPU chip and no GPU plugin: JAX would try the TPU first, print libtpu's
  INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES error block and lose ~2 s before using the CPU."""
  import glob
  from importlib import util
  if 'JAX_PLATFORMS' in os.environ or util.find_spec('libtpu') is None:
    return False
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):  # TPU VMs' chips.
    return False
  return not any(util.find_spec(f'jax_cuda{v}_plugin') for v in (12, 13))


def tune_command_line():
  """First thing in a command line's `__main__`: both settings, the CPU as JAX's platform where
  libtpu is installed without a TPU (no_tpu_here), and no TensorFlow INFO banner."""
  if no_tpu_here():
    jax.config.update('jax_platforms', 'cpu')  # JAX read JAX_PLATFORMS when it was imported.
  # TensorFlow (tf.data) announces its oneDNN kernels at INFO on every import; warnings stay.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  set_xla_flags()
  restart_with_huge_pages()


# ----------------------------------------------------- CPU programs: the layout of Dense layers

def over_tokens(layer, x):
  """layer(x) for x (batch, tokens, ...); compiled for CPU devices, applied to x as one
  (batch x tokens, ...) matrix.

  The products are the same, but XLA's CPU backend computes a weight's gradient (a contraction
  over batch and tokens together) by first copying both operands into transposed layouts unless
  batch and tokens are one axis: flattened, a ViT-Ti/16 block's forward + backward took 247
  instead of 297 ms on a 2-core Xeon, its MLP half the time (benchmarks/cpu_speed.md).
  Elsewhere the layer sees x as it is: on TPU, merging the axes can cost a copy between tiled
  layouts, and nothing was measured there. The devices of the mesh the program is traced under
  decide (sharding.under_mesh), not the host: compiled for a TPU from a CPU host, the program is
  the TPU one.
  """
  if not _compiling_for_cpu():
    return layer(x)
  y = layer(x.reshape((-1,) + x.shape[2:]))
  return y.reshape(x.shape[:2] + y.shape[1:])


def _compiling_for_cpu() -> bool:
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return device is not None and device.platform == 'cpu'
