"""Two settings that make XLA's CPU backend train and run ViTs faster; TPUs and GPUs ignore both.

Measured on a 2-core AVX-512 machine (benchmarks/throughput.py, ViT-Ti/16 and ViT-S/16 at 224 px):

1. XLA_FLAGS `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions) leaves every
   dot to Eigen. JAX 0.10's default sends dots to YNNPACK, which runs the attention's batched
   (batch x heads) products at about half of Eigen's speed here: inference goes from ~35 to
   ~85 img/s on ViT-Ti/16. Importing vit_jax appends the flag unless XLA_FLAGS already names it,
   so set it yourself (e.g. `--xla_cpu_experimental_ynn_fusion_type=individual_dot`) to keep
   YNNPACK. It has to be in the environment before JAX creates its CPU backend.

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
