"""What a foreign checkpoint (Hugging Face, timm, official .npz) must agree with before it is read
or converted (issue 36): every array as wide as the model its files describe, weights of a
floating type, a config.json that is JSON and agrees with its weights, an image processor that
normalises, shards inside their folder; writers that refuse what their format cannot hold.
Each case gives the right answer or an error naming the file, the key and what was expected.
Tiny synthetic files only: no training, no subprocess."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from test_layouts import (HF_CONFIG, HF_VIT, HEADS, TIMM, WIDTH, apply, images, random_weights,
                          write_hf)
from vit_jax import checkpoint, convert, models
from vit_jax.layouts import timm as timm_layout


@pytest.fixture
def timm_heads(monkeypatch):
  monkeypatch.setitem(timm_layout.HEADS_BY_WIDTH, WIDTH, HEADS)  # timm's own: 64 channels a head.


def timm_file(tmp_path, name='model.safetensors', **changes):
  """A timm ViT state dict with a 3-class head, `changes` ({key: array}) applied."""
  w = random_weights(TIMM, prefix_tokens=1, pos_tokens=5, fused_qkv=True, heads=[('head', 3)])
  w.update(changes)
  path = str(tmp_path / name)
  save_file(w, path)
  return path, w


def hf_dir(tmp_path, name='vit', config=None, **changes):
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  w.update(changes)
  return write_hf(tmp_path / name, w, dict(HF_CONFIG, model_type='vit', hidden_act='gelu',
                                           **(config or {}))), w


# ----------------------------------------------- 1. every array as its described model has it

def test_a_timm_head_narrower_than_its_width_is_refused_naming_the_key(tmp_path, timm_heads):
  rng = np.random.default_rng(0)
  source, _ = timm_file(tmp_path, **{'head.weight': rng.normal(size=(3, 24)).astype(np.float32)})
  dest = str(tmp_path / 'out.npz')
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'model.safetensors: head.weight is \(3, 24\), expected \(any, 16\) '
                           r'\(one row per class, the width 16 of patch_embed.proj.weight\)'):
    convert.convert(source, dest, 'npz')
  assert not os.path.exists(dest)  # No mis-shaped .npz.


def test_every_mis_shaped_array_of_a_foreign_file_is_named_against_its_model(tmp_path):
  """What no reader looks at (a LayerNorm's width, a bias) is compared with the model that the
  file's config describes (jax.eval_shape of its init): every mismatching key named."""
  path, _ = hf_dir(tmp_path, **{
      'vit.encoder.layer.1.layernorm_before.weight': np.ones(8, np.float32),
      'vit.layernorm.bias': np.zeros(12, np.float32)})
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.load_model(path)
  message = str(error.value)
  assert 'does not hold the model its files describe' in message
  assert 'mis-shaped: 2' in message
  assert 'Transformer/encoderblock_1/LayerNorm_0/scale: checkpoint (8,), model (16,)' in message
  assert 'Transformer/encoder_norm/bias: checkpoint (12,), model (16,)' in message


def test_an_official_npz_whose_blocks_disagree_is_named(tmp_path):
  """Official files say nothing of their model: it is read off the first block; the others must
  agree (and no layer may be missing)."""
  config = models.vit_config('tiny', hidden_size=WIDTH, mlp_dim=32, num_heads=2, num_layers=2,
                             patch=4)
  model = models.build(config, 3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  flat = {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  path = str(tmp_path / 'official.npz')
  np.savez(path, **flat)
  assert checkpoint.load_model(path).num_classes == 3  # As written: read.
  key = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'
  flat[key] = np.zeros((WIDTH, 24), np.float32)
  np.savez(path, **flat)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'(?s)official.npz does not hold the model its parameter shapes '
                           rf'describe.*{key}: checkpoint \(16, 24\), model \(16, 32\)'):
    checkpoint.load_model(path)


# --------------------------------------------------------------------- 2. floating weights only

@pytest.mark.parametrize('dtype', [np.int8, bool])
def test_integer_and_bool_tensors_are_refused_naming_key_and_dtype(tmp_path, timm_heads, dtype):
  source, _ = timm_file(tmp_path, **{'blocks.0.mlp.fc1.weight': np.ones((32, WIDTH), dtype)})
  name = np.dtype(dtype).name
  with pytest.raises(ValueError, match=rf'model.safetensors holds tensors that are not '
                                       rf'floating-point weights: blocks.0.mlp.fc1.weight '
                                       rf'\({name}\)'):
    checkpoint.load_model(source)
  path = str(tmp_path / 'official.npz')  # An .npz likewise.
  np.savez(path, **{'embedding/kernel': np.ones((4, 4, 3, WIDTH), dtype)})
  with pytest.raises(ValueError, match=rf'official.npz holds tensors that are not floating-point '
                                       rf'weights: embedding/kernel \({name}\)'):
    checkpoint.load_model(path)


def test_float16_and_bfloat16_weights_are_read_as_float32(tmp_path, timm_heads):
  import ml_dtypes
  _, w = timm_file(tmp_path, name='float32.safetensors')
  expected = checkpoint.load_model(str(tmp_path / 'float32.safetensors'))
  for dtype in (np.float16, ml_dtypes.bfloat16):
    narrow = {k: v.astype(dtype) for k, v in w.items()}
    path = str(tmp_path / f'{np.dtype(dtype).name}.safetensors')
    save_file(narrow, path)
    read = checkpoint.load_model(path)
    leaves = jax.tree.leaves(read.params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}
    tolerance = 1e-2 if dtype == np.float16 else 5e-2
    np.testing.assert_allclose(apply(read, images()), apply(expected, images()),
                               atol=tolerance, rtol=tolerance)


# ------------------------------------------------------- 3. what timm and transformers can't hold

def dense_export(tmp_path):
  config = models.vit_config('tiny', hidden_size=WIDTH, mlp_dim=32, num_heads=2, num_layers=2,
                             patch=4)
  config.decoder = ml_collections.ConfigDict(dict(type='linear'))
  params = models.build(config, 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                        train=False)['params']
  path = str(tmp_path / 'segmentation.npz')
  checkpoint.save(params, path, model_config=config, image_size=(16, 16), num_classes=3)
  return path


@pytest.mark.parametrize('fmt, family', [('timm', 'timm'), ('hf', 'Hugging Face')])
def test_a_dense_export_is_not_written_without_its_decoder(tmp_path, fmt, family):
  source = dense_export(tmp_path)
  dest = str(tmp_path / ('out.safetensors' if fmt == 'timm' else 'out'))
  with pytest.raises(ValueError, match=rf"Cannot write a {family} model: a dense decoder "
                                       rf"\(model.decoder.type='linear': \d+ of \d+ arrays\), "
                                       r'which the PyTorch ViT classes have no place for'):
    convert.convert(source, dest, fmt)
  assert not os.path.exists(dest)
  convert.convert(source, str(tmp_path / 'copy.npz'), 'npz')  # Its own format holds it.
  assert checkpoint.load_model(str(tmp_path / 'copy.npz')).config.decoder.type == 'linear'


# --------------------------------------------------------------- 4. an image processor's values

@pytest.mark.parametrize('std, named', [
    ([0.5, 0.0, 0.5], r'image_std=\[0.5, 0.0, 0.5\]; a standard deviation must be positive'),
    ([0.5, -0.2, 0.5], r'image_std=\[0.5, -0.2, 0.5\]; a standard deviation must be positive'),
    ([0.5, float('nan'), 0.5], r'image_std=\[0.5, nan, 0.5\] is not finite'),
    ([0.5, 0.5], r'image_std=\[0.5, 0.5\]; expected three numbers'),
    ('0.5', r"image_std='0.5'; expected three numbers")])
def test_a_processor_that_does_not_normalise_is_refused(tmp_path, std, named):
  path, _ = hf_dir(tmp_path)
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': [0.5, 0.5, 0.5], 'image_std': std}))
  for read in (checkpoint.load_model, checkpoint.read_preprocessing):
    with pytest.raises(ValueError, match=r'vit/preprocessor_config.json: ' + named):
      read(path)


def test_one_number_normalises_every_channel(tmp_path):
  path, _ = hf_dir(tmp_path)
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': 0.5, 'image_std': 0.25}))
  assert checkpoint.load_model(path).preprocessing == {'mean': [0.5] * 3, 'std': [0.25] * 3}


# ------------------------------------------------------------- 5. crashes become named errors

def test_a_config_json_that_is_not_json_is_named_with_the_position(tmp_path):
  path, _ = hf_dir(tmp_path)
  (tmp_path / 'vit' / 'config.json').write_text('{"model_type": "vit",\n "hidden_size": 16,,}')
  with pytest.raises(ValueError, match=r'vit/config.json is not valid JSON: Expecting property '
                                       r'name enclosed in double quotes at line 2, column 20'):
    checkpoint.load_model(path)


def test_a_fused_qkv_of_the_wrong_height_is_named(tmp_path, timm_heads):
  rng = np.random.default_rng(0)
  source, _ = timm_file(tmp_path, **{
      'blocks.1.attn.qkv.weight': rng.normal(size=(40, WIDTH)).astype(np.float32)})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'model.safetensors: blocks.1.attn.qkv.weight is \(40, 16\), expected '
                           r'\(48, 16\) \(query, key and value stacked: 3 x the width 16 rows\)'):
    checkpoint.load_model(source)


def test_a_config_json_that_disagrees_with_its_weights_is_named(tmp_path):
  path, _ = hf_dir(tmp_path, config=dict(hidden_size=32))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'vit/config.json says hidden_size=32, but its weights are 16 wide: '
                           r'embeddings.patch_embeddings.projection.weight is \(16, 3, 4, 4\), '
                           r'expected \(32, 3, 4, 4\)'):
    checkpoint.load_model(path)
  path, _ = hf_dir(tmp_path, name='layers', config=dict(num_hidden_layers=12))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'layers/config.json says num_hidden_layers=12, but its weights hold '
                           r'2 layers \(encoder.layer.0 .. encoder.layer.1\)'):
    checkpoint.load_model(path)
  path, _ = hf_dir(tmp_path, name='patch', config=dict(patch_size=8))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'patch/config.json says patch_size=8, but embeddings.patch_embeddings'
                           r'.projection.weight is \(16, 3, 4, 4\): 4x4 patches'):
    checkpoint.load_model(path)


def test_a_destination_that_exists_says_so(tmp_path, timm_heads):
  source, _ = timm_file(tmp_path)
  existing = tmp_path / 'taken.npz'
  existing.write_bytes(b'mine')
  for dest in ('/dev/null', str(existing)):
    for fmt in ('npz', 'hf', 'timm'):
      with pytest.raises(FileExistsError, match=rf'{dest} exists: name a new'):
        convert.convert(source, dest, fmt)
  assert existing.read_bytes() == b'mine'


def test_fewshot_of_a_segmentation_export_is_a_named_refusal(tmp_path):
  from vit_jax import fewshot
  source = dense_export(tmp_path)
  with pytest.raises(ValueError, match=r"segmentation.npz is a dense model \(model.decoder.type="
                                       r"'linear': segmentation or detection\).*few-shot "
                                       'evaluation needs one pooled representation per image'):
    fewshot.evaluate_checkpoint(source, dataset='digits', shots=(1,), seeds=1)


def test_an_empty_pretrained_dir_is_the_current_directory():
  from helpers import parse_config
  config = parse_config('--config=vit_jax/configs/vit.py:testing,digits',
                        '--config.pretrained_dir=')
  assert config.pretrained_path == 'testing.npz'  # Not /testing.npz at the root.
  config = parse_config('--config=vit_jax/configs/vit.py:testing,digits',
                        '--config.pretrained_dir=/models/')
  assert config.pretrained_path == '/models/testing.npz'


# ----------------------------------------------------- 6. shards stay inside their model folder

@pytest.mark.parametrize('entry', ['../other/model.safetensors', '/etc/passwd',
                                   'sub/../../other/model.safetensors'])
def test_an_index_naming_shards_outside_its_folder_is_refused(tmp_path, entry):
  _, w = hf_dir(tmp_path, name='other')  # A readable file outside the model's folder.
  directory = tmp_path / 'vit'
  directory.mkdir()
  (directory / 'config.json').write_text(json.dumps(dict(HF_CONFIG, model_type='vit')))
  (directory / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {k: entry for k in w}}))
  with pytest.raises(ValueError, match=rf"vit/model.safetensors.index.json names shard files "
                                       rf"outside its folder .*'{entry}'.*nothing was read"):
    checkpoint.load_model(str(directory))
