"""The XLA:CPU settings of the command-line tools and their huge-page restart; importing
vit_jax changes no environment variable."""

import os
import subprocess
import sys

from helpers import ROOT

from vit_jax import cpu_tuning


def test_the_xla_flag_keeps_a_users_choice(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  cpu_tuning.set_xla_flags()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=')
  chosen = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
  monkeypatch.setenv('XLA_FLAGS', chosen)
  cpu_tuning.set_xla_flags()
  assert os.environ['XLA_FLAGS'] == chosen
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('VIT_JAX_CPU_TUNING', '0')  # make bench's "untuned" measurement.
  cpu_tuning.set_xla_flags()
  cpu_tuning.restart_with_huge_pages()  # Returns: no re-execution.
  assert os.environ['XLA_FLAGS'] == ''


def test_restart_keeps_pid_arguments_and_environment():
  script = ('import os, sys; from vit_jax import cpu_tuning; '
            'print(os.getpid(), sys.argv[1:], os.environ.get("MARK"), flush=True); '
            'cpu_tuning.restart_with_huge_pages(); '
            'print(os.getpid(), sys.argv[1:], os.environ.get("MARK"), '
            'os.environ.get("GLIBC_TUNABLES"))')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(MARK='kept', PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, '-c', script, 'a', '--b=1'], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
  lines = run.stdout.splitlines()
  pid, args, mark = lines[0].split(' ', 2)[0], "['a', '--b=1']", 'kept'
  if cpu_tuning.huge_pages_available():  # Restarted once: the first line again, then the last.
    assert len(lines) == 3 and lines[1] == lines[0]
    assert lines[2] == f'{pid} {args} {mark} {cpu_tuning.HUGE_PAGES}'
  else:
    assert lines[1] == f'{pid} {args} {mark} None'


def test_importing_vit_jax_changes_no_environment_variable():
  script = ('import os, json; before = dict(os.environ); import vit_jax, vit_jax.main, '
            'vit_jax.train, vit_jax.predict; print(json.dumps(before == dict(os.environ)))')
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  run = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True,
                       text=True, check=True)
  assert run.stdout.strip().splitlines()[-1] == 'true'
