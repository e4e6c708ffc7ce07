"""The processes of a multi-host run: joining them, and agreeing on what they run before they
run it.

Processes that disagree (another config on one host, another class folder, a missing peer) do
not fail in any way a user can read: a collective of another shape aborts in gloo / NCCL, one of
the same shape runs on with a wrong result or waits forever for a peer that stopped earlier. So
every process compares what it is about to run with process 0 before it compiles anything, and
a difference is named with the value on each side, within seconds.
"""

import contextlib
import json
import logging
import os
import sys
import threading

import jax
import numpy as np

# How long a process waits for the others at each agreement (they are seconds apart when all
# run; a peer that does not arrive within this died or runs something else).
AGREE_TIMEOUT_S = 120


class PodMismatchError(RuntimeError):
  """The processes of a run do not run the same thing (config, data)."""


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               timeout_s: int):
  """jax.distributed.initialize, with a named error when a peer does not join in time.

  JAX's client aborts the whole process when the coordinator's deadline passes, saying that
  "another task died" (none did: it never started). A watchdog speaks first and exits.
  """
  logging.info('Process %d of %d: joining the coordinator at %s (start-up timeout %d s).',
               process_id, num_processes, coordinator_address, timeout_s)
  joined = threading.Event()

  def name_the_missing_peer():
    if joined.wait(timeout_s + 2):
      return
    who = ('not every process joined' if process_id == 0 else
           'process 0 (the coordinator) did not answer, or not every process joined')
    sys.stderr.write(
        f'\nPeerMissingError: Process {process_id} of {num_processes} could not start the run '
        f'with the coordinator at {coordinator_address} within {timeout_s} s: {who}. Start all '
        f'{num_processes} processes (--process_id=0..{num_processes - 1}) with the same '
        '--coordinator_address, process 0 on that host; raise --startup_timeout_s if they start '
        'further apart. Nothing was run or written.\n')
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=name_the_missing_peer, daemon=True).start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  finally:
    joined.set()


def _flat(facts: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in facts.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _differences(theirs: dict, mine: dict) -> list:
  return [f'{k}: {theirs.get(k)!r} on process 0, {mine.get(k)!r} here'
          for k in sorted(theirs.keys() | mine.keys()) if theirs.get(k) != mine.get(k)]


def _allgather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (two small collectives)."""
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value, default=str).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


@contextlib.contextmanager
def _deadline(what: str, timeout_s: int):
  """A collective waits forever for a peer that stopped earlier: name it and exit instead."""
  done = threading.Event()

  def name_the_missing_peer():
    if done.wait(timeout_s):
      return
    sys.stderr.write(
        f'\nPeerMissingError: Process {jax.process_index()}: not every process reached the '
        f'agreement on the {what} within {timeout_s} s (one stopped earlier, or runs another '
        'command). Nothing was run or written.\n')
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=name_the_missing_peer, daemon=True).start()
  try:
    yield
  finally:
    done.set()


def agree(what: str, facts: dict, timeout_s: int = AGREE_TIMEOUT_S):
  """Every process compares `facts` (JSON-able) with process 0's; where they differ, every
  process raises PodMismatchError naming each differing key with both values (process 0 names
  the processes that differ). Nothing happens with one process."""
  if jax.process_count() == 1:
    return
  with _deadline(what, timeout_s):
    everyone = _allgather_json(_flat(facts))
  me, theirs = jax.process_index(), everyone[0]
  disagreeing = {p: d for p, d in ((p, _differences(theirs, facts_p))
                                   for p, facts_p in enumerate(everyone)) if d}
  if me > 0:
    if me in disagreeing:
      differences = disagreeing[me]
      raise PodMismatchError(
          f'Process {me} runs another {what} than process 0: {"; ".join(differences[:10])}'
          f'{" ..." if len(differences) > 10 else ""}. Every process must run the same command '
          'on the same data; nothing was run or written.')
    return
  if disagreeing:
    details = ' | '.join(f'process {p}: {"; ".join(d[:5])}' for p, d in disagreeing.items())
    raise PodMismatchError(
        f'The processes run different {what}s ({details}). Every process must run the same '
        'command on the same data; nothing was run or written.')
  logging.info('All %d processes run the same %s.', jax.process_count(), what)
