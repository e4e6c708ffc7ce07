"""The documentation against the code: docs/config.md's key table against
config_lib.base_config() (every key documented, none stale, each default as it is), and every
relative link of README.md and docs/*.md against the files. No JAX computation."""
import ast
import pathlib
import re

import ml_collections

from vit_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / 'docs' / 'config.md'
DOCUMENTS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]

_ROW = re.compile(r'^\|\s*`(?P<key>[^`]+)`\s*\|\s*(?P<default>[^|]*?)\s*\|(?P<meaning>.*)\|\s*$')
_LINK = re.compile(r'(?<!!)\[(?:[^\]\\]|\\.)*\]\((?P<target>[^)\s]+)(?:\s+"[^"]*")?\)')
_FENCE = re.compile(r'^\s*(```|~~~)')


def flat_keys(config, prefix=''):
  """{'pp.crop': 224, ...}: every leaf of a (nested) ConfigDict, references resolved."""
  keys = {}
  for name, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      keys.update(flat_keys(value, f'{prefix}{name}.'))
    else:
      keys[f'{prefix}{name}'] = value
  return keys


def documented_keys():
  """{key: default cell} of the table in docs/config.md, in the order written."""
  rows = {}
  for line in CONFIG_DOC.read_text().splitlines():
    match = _ROW.match(line)
    if match:
      key = match['key']
      assert key not in rows, f'docs/config.md documents {key!r} twice'
      rows[key] = match['default']
  assert rows, 'docs/config.md has no | `key` | default | meaning | table'
  return rows


def test_config_table_names_every_key_and_no_other():
  actual = set(flat_keys(config_lib.base_config().to_dict()))
  documented = set(documented_keys())
  missing, stale = sorted(actual - documented), sorted(documented - actual)
  assert not missing and not stale, (
      f'docs/config.md against config_lib.base_config(): missing (add a row): {missing}; '
      f'stale (no such key any more): {stale}')


def test_config_table_defaults_are_the_real_ones():
  actual = flat_keys(config_lib.base_config().to_dict())
  wrong = []
  for key, cell in documented_keys().items():
    if key not in actual:
      continue  # Named by the test above.
    literal = re.fullmatch(r'`([^`]*)`', cell)
    assert literal, f'docs/config.md: the default of {key!r} is not a `literal`: {cell!r}'
    value = ast.literal_eval(literal[1])
    if value != actual[key] or type(value) is not type(actual[key]):
      wrong.append(f'{key}: documented {literal[1]}, actual {actual[key]!r}')
  assert not wrong, 'docs/config.md: defaults that differ from base_config(): ' + '; '.join(wrong)


def _anchors(path: pathlib.Path) -> set:
  """GitHub's anchors of a Markdown file's headings."""
  anchors, fenced = set(), False
  for line in path.read_text().splitlines():
    if _FENCE.match(line):
      fenced = not fenced
    elif not fenced and line.startswith('#'):
      title = line.lstrip('#').strip().lower()
      anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
  return anchors


def _links(path: pathlib.Path):
  """(line number, target) of every Markdown link outside code blocks and code spans."""
  fenced = False
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if _FENCE.match(line):
      fenced = not fenced
      continue
    if fenced:
      continue
    prose = re.sub(r'`[^`]*`', '', line)  # A code span as a link's text leaves [](target).
    for match in _LINK.finditer(prose):
      yield number, match['target']


def test_relative_links_point_to_files():
  broken = []
  for document in DOCUMENTS:
    for number, target in _links(document):
      if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
        continue
      path, _, anchor = target.partition('#')
      file = (document.parent / path).resolve() if path else document
      where = f'{document.relative_to(ROOT)}:{number}: {target}'
      if not file.exists():
        broken.append(f'{where} (no such file)')
      elif anchor and file.suffix == '.md' and anchor not in _anchors(file):
        broken.append(f'{where} (no heading #{anchor} in {file.relative_to(ROOT)})')
  assert not broken, 'broken links:\n' + '\n'.join(broken)


def test_documents_were_found():
  names = {d.relative_to(ROOT).as_posix() for d in DOCUMENTS}
  assert {'README.md', 'docs/config.md'} <= names
