"""The processes of a multi-host run: joining them, and agreeing on what they run before they
run it.

Processes that disagree (another config on one host, another class folder, a missing peer) do
not fail in any way a user can read: a collective of another shape aborts in gloo / NCCL, one of
the same shape runs on with a wrong result or waits forever for a peer that stopped earlier. So
every process compares what it is about to run with process 0 before it compiles anything, and
a difference is named with the value on each side, within seconds.
"""

import json
import logging
import os
import sys
import threading

import jax

# How long a process waits for the others at each agreement (they are seconds apart when all
# run; a peer that does not arrive within this died or runs something else).
AGREE_TIMEOUT_S = 120


class PodMismatchError(RuntimeError):
  """The processes of a run do not run the same thing (config, data)."""


class PeerMissingError(RuntimeError):
  """A process did not answer in time."""


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


def agree(what: str, facts: dict, timeout_s: int = AGREE_TIMEOUT_S):
  """Every process compares `facts` (JSON-able) with process 0's; where they differ, every
  process raises PodMismatchError naming each differing key with both values (process 0 names
  the processes that differ). Nothing happens with one process."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # The coordination service's key-value store.
  client = distributed.global_state.client
  key, me = f'vit_jax/agree/{what}', jax.process_index()
  mine = json.loads(json.dumps(_flat(facts), default=str))
  if me == 0:
    client.key_value_set(key, json.dumps(mine))
  try:
    theirs = json.loads(client.blocking_key_value_get(key, timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise PeerMissingError(f'Process {me}: process 0 did not publish its {what} within '
                           f'{timeout_s} s ({str(e)[:200]}).') from None
  differences = _differences(theirs, mine)
  client.key_value_set(f'{key}/{me}', json.dumps(differences))
  if me > 0:
    if differences:
      raise PodMismatchError(
          f'Process {me} runs another {what} than process 0: {"; ".join(differences[:10])}'
          f'{" ..." if len(differences) > 10 else ""}. Every process must run the same command '
          'on the same data; nothing was run or written.')
    return
  disagreeing = {}
  for other in range(1, jax.process_count()):
    try:
      verdict = json.loads(client.blocking_key_value_get(f'{key}/{other}', timeout_s * 1000))
    except Exception:  # pylint: disable=broad-except
      verdict = [f'no answer within {timeout_s} s']
    if verdict:
      disagreeing[other] = verdict
  if disagreeing:
    details = ' | '.join(f'process {p}: {"; ".join(d[:5])}' for p, d in disagreeing.items())
    raise PodMismatchError(
        f'The processes run different {what}s ({details}). Every process must run the same '
        'command on the same data; nothing was run or written.')
  logging.info('All %d processes run the same %s.', jax.process_count(), what)
