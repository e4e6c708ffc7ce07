"""Files users own are never touched: predict's and analysis' --outdir, report's diagram,
convert's DEST and a workdir's temporaries (issue 36's data-loss cases). Every test ends with
the user's files byte for byte as they were."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import snapshot
from vit_jax import analysis, checkpoint, convert, files, models, predict, report
from vit_jax.models_vit import VisionTransformer


def tiny_export(path, posemb='learn'):
  config = models.vit_config('tiny', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1,
                             patch=4)
  config.transformer.posemb = posemb
  model = VisionTransformer(num_classes=3, **config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  params = jax.tree.map(lambda p: p + 0.05, params)
  checkpoint.save(params, str(path), model_config=config, image_size=(8, 8))
  return model, params, config


def photo(path, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
  return path


# ---------------------------------------------------------------------------- the mechanism

def test_create_never_replaces_a_name_taken_meanwhile_or_a_dangling_link(tmp_path):
  dest = tmp_path / 'dest.bin'

  def write_while_someone_takes_the_name(temporary):
    open(temporary, 'wb').write(b'converted')
    dest.write_bytes(b'the user was faster')

  with pytest.raises(FileExistsError, match='appeared while it was being written'):
    files.create(str(dest), write_while_someone_takes_the_name)
  assert dest.read_bytes() == b'the user was faster'
  link = tmp_path / 'link.bin'
  link.symlink_to(tmp_path / 'nowhere')
  with pytest.raises(FileExistsError, match='exists'):
    files.create(str(link), lambda t: open(t, 'wb').write(b'x'))
  assert os.readlink(link) == str(tmp_path / 'nowhere') and not (tmp_path / 'nowhere').exists()
  with pytest.raises(FileNotFoundError, match='its folder .*missing does not exist'):
    files.create(str(tmp_path / 'missing' / 'dest.bin'), lambda t: open(t, 'wb').write(b'x'))
  assert sorted(os.listdir(tmp_path)) == ['dest.bin', 'link.bin']  # No temporaries left.


def test_create_dir_never_replaces_a_folder_made_meanwhile(tmp_path):
  dest = tmp_path / 'out'

  def fill(folder):
    open(os.path.join(folder, 'model.safetensors'), 'wb').write(b'converted')
    dest.mkdir()  # An empty folder a user makes meanwhile is theirs too.

  with pytest.raises(FileExistsError, match='appeared while it was being written'):
    files.create_dir(str(dest), fill)
  assert os.listdir(dest) == [] and sorted(os.listdir(tmp_path)) == ['out']
  files.create_dir(str(tmp_path / 'new'), lambda f: open(os.path.join(f, 'a'), 'w').write('a'))
  assert (tmp_path / 'new' / 'a').read_text() == 'a'


def test_remote_destinations_are_checked_before_and_uploaded_whole():
  import tensorflow as tf  # ram:// stands in for gs://.
  files.create('ram://bucket/one.bin', lambda t: open(t, 'wb').write(b'one'))
  with pytest.raises(FileExistsError, match='ram://bucket/one.bin exists'):
    files.create('ram://bucket/one.bin', lambda t: pytest.fail('work began'))
  files.create_dir('ram://bucket/dir', lambda f: open(os.path.join(f, 'a.json'), 'w').write('{}'))
  assert tf.io.gfile.GFile('ram://bucket/dir/a.json').read() == '{}'
  assert tf.io.gfile.GFile('ram://bucket/one.bin', 'rb').read() == b'one'


def test_only_temporaries_this_codebase_made_are_removed(tmp_path):
  users = {'notes.tmp-20251130': b'notes', 'model.npz.tmp-12': b'mine', '.x.vit_jax-tmp-': b'y',
           'a.vit_jax-tmp-12': b'not hidden: not a name vit_jax makes'}
  for name, content in users.items():
    (tmp_path / name).write_bytes(content)
  (tmp_path / '.model.npz.vit_jax-tmp-12').write_bytes(b'half an export')
  assert files.remove_temporaries(str(tmp_path)) == ['model.npz']
  assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == users


def test_an_output_folder_rewrites_only_its_own_unchanged_files(tmp_path):
  folder = files.OutputFolder(str(tmp_path))
  folder.write('a.png', lambda t: open(t, 'wb').write(b'first'))
  files.OutputFolder(str(tmp_path)).write('a.png', lambda t: open(t, 'wb').write(b'second'))
  assert (tmp_path / 'a.png').read_bytes() == b'second'  # Its own: a re-run replaces it.
  (tmp_path / 'a.png').write_bytes(b'edited by the user')
  with pytest.raises(FileExistsError, match='were not written by vit_jax here'):
    files.OutputFolder(str(tmp_path)).check(['a.png'])
  files.OutputFolder(str(tmp_path)).remove('a.png')
  assert (tmp_path / 'a.png').read_bytes() == b'edited by the user'
  with pytest.raises(ValueError, match='Two inputs would both be written to'):
    folder.check(['b.png', 'b.png'])


# -------------------------------------------------------------------------------- predict

def test_predict_never_draws_over_an_input_or_a_users_file(tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  holiday = photo(photos / 'holiday.png')
  photo(photos / 'x.jpg', 1)
  photo(tmp_path / 'x.png', 2)
  drawn = tmp_path / 'drawn'
  drawn.mkdir()
  (drawn / 'holiday.png').write_bytes(b'my own drawing')
  before = snapshot(tmp_path)
  dense = str(tmp_path / 'never-loaded.npz')  # Refused before the checkpoint is read.
  with pytest.raises(ValueError, match='would be drawn over its own input image'):
    predict.predict_dense([str(holiday)], dense, str(photos), 0.3)
  with pytest.raises(ValueError, match='Two inputs would both be written to .*x.png'):
    predict.predict_dense([str(photos / 'x.jpg'), str(tmp_path / 'x.png')], dense,
                          str(tmp_path / 'out'), 0.3)
  with pytest.raises(FileExistsError, match='drawn/holiday.png already exist'):
    predict.predict_dense([str(holiday)], dense, str(drawn), 0.3)
  assert snapshot(tmp_path) == before and not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------- analysis

def test_analysis_keeps_a_users_figure_a_model_has_none_of(tmp_path):
  model, params, config = tiny_export(tmp_path / 'model.npz', posemb='relative')
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  out = tmp_path / 'figures'
  out.mkdir()
  (out / 'position_embedding_similarity.png').write_bytes(b'a user\'s figure')
  (out / 'notes.txt').write_text('keep')
  written = analysis.analyse(params, model, config, images, str(out))
  assert len(written) == 3 and (out / 'position_embedding_similarity.png').read_bytes() == (
      b'a user\'s figure') and (out / 'notes.txt').read_text() == 'keep'

  # A figure analysis drew itself for an earlier model goes; one the user drew stays.
  other = tmp_path / 'other'
  learned = tiny_export(tmp_path / 'learned.npz')
  analysis.analyse(learned[1], learned[0], learned[2], images, str(other))
  assert (other / 'position_embedding_similarity.png').exists()
  analysis.analyse(params, model, config, images, str(other))
  assert not (other / 'position_embedding_similarity.png').exists()

  # A name that is a folder, or a figure the user changed: refused before anything is drawn.
  (tmp_path / 'third' / 'attention_rollout.png').mkdir(parents=True)
  (out / 'attention_rollout.png').write_bytes(b'edited')
  before = snapshot(tmp_path)
  for outdir in (tmp_path / 'third', out):
    with pytest.raises(FileExistsError, match='attention_rollout.png already exist'):
      analysis.analyse(params, model, config, images, str(outdir))
  assert snapshot(tmp_path) == before
  assert (tmp_path / 'third' / 'attention_rollout.png').is_dir()


# --------------------------------------------------------------------------------- report

def test_report_draws_its_diagram_only_over_its_own_file(tmp_path):
  (tmp_path / 'mine.png').write_bytes(b'a user\'s picture')
  (tmp_path / 'folder').mkdir()
  for path, message in ((tmp_path / 'folder', 'expected a new file named .png'),
                        (tmp_path / 'noext', 'expected a new file named .png'),
                        (tmp_path / 'mine.png', 'mine.png already exist')):
    with pytest.raises((ValueError, FileExistsError), match=message):
      report.check_diagram_path(str(path))
  assert (tmp_path / 'mine.png').read_bytes() == b'a user\'s picture'
  assert sorted(os.listdir(tmp_path)) == ['folder', 'mine.png']


# -------------------------------------------------------------------------------- convert

@pytest.mark.parametrize('fmt, name', [('npz', 'dest.npz'), ('timm', 'dest.safetensors'),
                                       ('hf', 'dest')])
def test_convert_keeps_a_dest_that_appears_while_it_runs(tmp_path, monkeypatch, fmt, name):
  tiny_export(tmp_path / 'model.npz')
  dest = tmp_path / name
  load_model = checkpoint.load_model

  def slow_load(path):  # The user writes DEST while the source is being read.
    dest.write_bytes(b'written meanwhile') if fmt != 'hf' else dest.mkdir()
    return load_model(path)

  monkeypatch.setattr(checkpoint, 'load_model', slow_load)
  with pytest.raises(FileExistsError, match=f'{name} (exists|appeared while it was being)'):
    convert.convert(str(tmp_path / 'model.npz'), str(dest), fmt)
  assert (dest.read_bytes() == b'written meanwhile') if fmt != 'hf' else os.listdir(dest) == []
  assert sorted(os.listdir(tmp_path)) == sorted(['model.npz', name])


def test_convert_refuses_a_dangling_link_missing_parents_and_an_existing_remote_dest(
    tmp_path, monkeypatch):
  import tensorflow as tf
  source = tmp_path / 'model.npz'
  tiny_export(source)
  link = tmp_path / 'link.npz'
  link.symlink_to(tmp_path / 'nowhere.npz')
  tf.io.gfile.GFile('ram://bucket/taken.npz', 'wb').write(b'someone\'s file')
  monkeypatch.setattr(checkpoint, 'load_model', lambda path: pytest.fail('read before checking'))
  for dest, fmt, message in ((link, 'npz', 'link.npz exists'),
                             (tmp_path / 'no' / 'such' / 'dir', 'hf', 'its folder .* not exist'),
                             ('ram://bucket/taken.npz', 'npz', 'taken.npz exists'),
                             ('ram://bucket/taken.npz', 'timm', 'taken.npz exists')):
    with pytest.raises((FileExistsError, FileNotFoundError), match=message):
      convert.convert(str(source), str(dest), fmt)
  assert os.path.islink(link) and not (tmp_path / 'nowhere.npz').exists()
  assert tf.io.gfile.GFile('ram://bucket/taken.npz', 'rb').read() == b'someone\'s file'
  assert sorted(os.listdir(tmp_path)) == ['link.npz', 'model.npz']


def test_convert_uploads_hf_and_timm_to_a_remote_dest(tmp_path):
  import tensorflow as tf
  source = str(tmp_path / 'model.npz')
  tiny_export(source)
  how = convert.convert(source, 'ram://bucket/hf-out', 'hf')
  assert "from_pretrained('hf-out')" in how and 'gsutil cp -r ram://bucket/hf-out' in how
  assert sorted(tf.io.gfile.listdir('ram://bucket/hf-out')) == ['config.json',
                                                                 'model.safetensors']
  assert json.loads(tf.io.gfile.GFile('ram://bucket/hf-out/config.json').read())['model_type']
  convert.convert(source, 'ram://bucket/timm.safetensors', 'timm')
  assert tf.io.gfile.exists('ram://bucket/timm.safetensors')
  assert not os.path.exists('ram:') and not os.path.exists('gs:')  # Nothing local.


def test_report_names_a_truncated_results_file(tmp_path):
  (tmp_path / 'results.json').write_text('{"step": 6, "test": {"accuracy_te')
  with pytest.raises(ValueError, match=r'results.json is not readable JSON .*evaluate the'):
    report.main([str(tmp_path)])
