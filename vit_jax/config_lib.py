"""Shared pieces of the recipe files in configs/: the common knobs, the paper's two optimisation
recipes, the datasets' facts, and the checks that reject a bad config before anything compiles.
"""

import logging
import math
import os

import ml_collections

from vit_jax import (datasets, decoders, evaluator_specs, layouts, models, models_vit,
                     objectives, published)
from vit_jax.datasets import DATASETS  # Recipes read the facts here too.

TRAINERS = ('train', 'evaluate', 'inference_time')
OPTIMIZERS = ('adam', 'sgd')
DECAY_TYPES = ('linear', 'cosine')
LOSSES = ('softmax_xent', 'sigmoid_xent')
SHARDINGS = ('replicate', 'fsdp')
DTYPES = ('float32', 'bfloat16')
OBJECTIVES = ('classification', 'mpp', 'segmentation', 'detection')
# ImageNet-21k checkpoints of the original release (gs://vit_models/imagenet21k).
OFFICIAL_CHECKPOINTS = ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
FINETUNE_STEPS = published.FINETUNE_STEPS  # Paper Table 4: fine-tuning steps per dataset.


def base_config() -> ml_collections.ConfigDict:
  """Every knob a recipe can set, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.trainer = 'train'
  c.seed = 0

  # 'digits', a TFDS name, or 'folder:<dir>' with <dir>/<split>/<class>/*.jpg or, without split
  # folders, <dir>/<class>/*.jpg (its split is 'train'); splits may be sliced: 'train[:99%]'.
  c.dataset = 'digits'
  c.train_split = 'train'
  c.test_split = 'test'
  c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: from the dataset.
  c.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
  c.tfds_download = False
  # Where TFDS finds archives it cannot download itself (ImageNet-1k: ILSVRC2012_img_train.tar,
  # ILSVRC2012_img_val.tar); default <tfds_data_dir>/downloads/manual.
  c.tfds_manual_dir = ml_collections.FieldReference(None, field_type=str)
  # An image folder's file list is kept here after the first listing ('' = list at every start).
  c.folder_index_dir = '~/.cache/vit_jax/folder_index'
  c.shuffle_buffer = 50_000
  c.pp = ml_collections.ConfigDict(dict(
      # Training and evaluation resolution: an int, or (height, width).
      crop=ml_collections.FieldReference(224, field_type=object),
      resize_eval=0,       # Eval: resize to this, then central crop to `crop`; 0 = resize to crop.
      crop_min_area=0.05,  # Inception crop: smallest fraction of the image kept.
      flip=True,
      # Bilinear resize (train crops and eval) without antialiasing, as in the paper's pipeline;
      # True averages detail that a shrink would alias (big_vision's advice for new recipes), at
      # twice the resize cost (ImageNet-sized JPEGs: 415 instead of 615 img/s per core).
      antialias=False,
      randaug_layers=0,       # RandAugment: operations per image (AugReg uses 2); 0 = off.
      randaug_magnitude=10.0,  # Their strength: 0 (none) to 10 (rotations of 30 degrees, ...).
      mixup_alpha=0.0,        # Mixup's Beta(alpha, alpha) (AugReg: 0.2 or 0.5); 0 = off.
      # Pixels (in [0, 1]) normalised as (pixel - mean) / std per channel, as a checkpoint of
      # another library expects (DeiT, DINOv2: ImageNet's); None: to [-1, 1], as the paper's.
      mean=ml_collections.FieldReference(None, field_type=object),
      std=ml_collections.FieldReference(None, field_type=object),
      # Segmentation and detection: training images scaled by a factor drawn from this range
      # (relative to their longer side fitting pp.crop), then cropped (scale jitter).
      scale_range=(1.0, 1.0),
  ))
  c.max_objects = 100  # Detection: objects per training image read (more are dropped).
  c.max_detections = 100  # Detection: boxes kept per image (COCO's limit).

  c.model = models.get_config('ViT-B_16')
  c.dtype = 'float32'  # Activations; parameters are always float32.
  c.pretrained_path = ml_collections.FieldReference(None, field_type=str)
  c.reinit_head = True  # False: keep the pretrained head (see checkpoint.load_pretrained).
  c.loss = 'softmax_xent'
  # or 'mpp': masked patch prediction (mpp.py), no labels used; 'segmentation' and 'detection'
  # with model.decoder (decoders.py).
  c.objective = 'classification'

  c.optimizer = 'adam'
  c.b1, c.b2 = 0.9, 0.999
  c.momentum = 0.9
  c.optim_dtype = 'float32'  # Adam's first moment / SGD's momentum ('bfloat16': half the memory).
  c.weight_decay = 0.0  # Decoupled (optax.adamw), on kernels only.
  c.grad_norm_clip = 1.0
  # Layer-wise learning-rate decay: block i's rate times layer_decay ** (layers - i); 1 = off.
  c.layer_decay = 1.0
  c.base_lr = 1e-3
  c.decay_type = 'linear'
  c.warmup_steps = 0
  c.total_steps = 1000

  c.batch = 512  # Global: all devices of all processes.
  c.batch_eval = 512
  c.accum_steps = 1  # Micro-batches per step (0 and 1: none, as in the official configs).
  c.sharding = 'replicate'
  # Before training, compile the steps for this machine's devices and, where they do not fit,
  # take the cheapest memory-only setting that does (vit_jax.plan's --auto_fit).
  c.auto_fit = False

  c.eval_every = 1000
  # What the run measures, by name (evaluators.py): the test split of the dataset, and whatever
  # a recipe adds (ImageNet ReaL / v2, few-shot on other datasets, ...).
  c.evals = ml_collections.ConfigDict({'test': evaluator_specs.classification(
      c.get_ref('test_split'), every=c.get_ref('eval_every'))})
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.progress_every = 100
  # > 0: a jax.profiler trace of this many steps (from the second of the run: the first
  # compiles) in <workdir>/profile, for TensorBoard's profile plugin.
  c.profile_steps = 0
  # XLA's compiled programs are kept here and reused by the next start of the same run
  # (resuming after preemption skips most compilation); '' turns the cache off.
  c.compilation_cache_dir = '~/.cache/vit_jax/xla'
  return c


def pretrain_recipe(c: ml_collections.ConfigDict):
  """Paper Sec. 4.1 / App. B.1: Adam, batch 4096, weight decay 0.1, 10k linear warm-up, linear decay,
  clipping at global norm 1, a representation (pre-logits) layer of width D."""
  c.optimizer = 'adam'
  c.b1, c.b2 = 0.9, 0.999
  c.weight_decay = 0.1
  c.grad_norm_clip = 1.0
  c.decay_type = 'linear'
  c.warmup_steps = 10_000
  c.batch = 4096
  c.model.representation_size = c.model.hidden_size


def finetune_recipe(c: ml_collections.ConfigDict):
  """Paper App. B.1.1: SGD with momentum 0.9, batch 512, no weight decay, clipping at 1, cosine
  decay after a short warm-up, higher resolution than pre-training, a fresh zero head."""
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.optim_dtype = 'bfloat16'  # The momentum accumulator, as in the paper's fine-tuning.
  c.weight_decay = 0.0
  c.grad_norm_clip = 1.0
  c.decay_type = 'cosine'
  c.warmup_steps = 500
  c.batch = 512
  c.model.representation_size = None


def finetune_source(c: ml_collections.ConfigDict, source: str):
  """The model and pretrained_path of a fine-tuning from `source`: a registry name (its official
  ImageNet-21k checkpoint where one was released) or a checkpoint, whose architecture and input
  normalisation are then the model's (.npz, Hugging Face directory, timm .safetensors,
  hf://ORG/NAME)."""
  if models.registry_name(source):  # 'B_16', 'R50+ViT-B_16', the official 'b16', ...
    c.model = models.get_config(source)
    if c.model.model_name in OFFICIAL_CHECKPOINTS:
      c.pretrained_path = f'gs://vit_models/imagenet21k/{c.model.model_name}.npz'
    return
  if not os.path.exists(source) and not any(ch in source for ch in '/.'):
    models.get_config(source)  # Neither: a misspelt model, named with the closest ones.
  from vit_jax import checkpoint
  read = checkpoint.load_model(source)
  c.model = read.config
  c.pretrained_path = source
  set_normalisation(c, read)


def finetune_dataset(c: ml_collections.ConfigDict, name: str):
  """The fine-tuning recipe's settings that follow from the dataset: its splits, Table 4's step
  count (10k where the paper gives none), warm-up, evaluation and checkpoint intervals."""
  set_dataset(c, name)
  c.total_steps = FINETUNE_STEPS.get(name, 10_000)
  c.warmup_steps = min(500, c.total_steps // 10)
  c.eval_every = c.checkpoint_every = max(c.total_steps // 10, 100)
  if name == 'imagenet2012':
    add_imagenet_variants(c)


def dense_recipe(c: ml_collections.ConfigDict, objective: str, arg: str) -> str:
  """What configs/segmentation.py and configs/detection.py share: `arg` 'shapes' (a small ViT
  from scratch on the embedded shapes, 64 px) or 'SOURCE,DATASET' (the backbone of SOURCE, its
  head dropped, drop path 0.1), Adam; returns the dataset. The recipe adds its decoder and
  schedule, then dense_evaluation."""
  c.objective = objective
  c.optimizer = 'adam'
  if arg == 'shapes':
    c.dataset = 'shapes'
    c.model = models.vit_config('ViT-shapes', hidden_size=96, mlp_dim=384, num_heads=4,
                                num_layers=4, patch=8, classifier='gap')
    c.pp.crop = 64
    c.batch, c.batch_eval = 32, 96
    c.shuffle_buffer = 2000
    c.progress_every = 50
  else:
    source, c.dataset = recipe_args(arg, objective, 'SOURCE,DATASET', 'shapes')
    finetune_source(c, source)
    c.model.representation_size = None
    c.model.transformer.stochastic_depth = 0.1
    c.progress_every = 100
  return c.dataset


def dense_evaluation(c: ml_collections.ConfigDict):
  """The objective's evaluator on the test split, four times a run, with the checkpoints."""
  c.eval_every = c.checkpoint_every = max(c.total_steps // 4, 100)
  c.keep_checkpoints = 2
  c.evals = ml_collections.ConfigDict({'test': evaluator_specs.dense(
      c.objective, c.get_ref('test_split'), every=c.get_ref('eval_every'))})


def add_imagenet_variants(c: ml_collections.ConfigDict):
  """ImageNet-1k runs report ReaL (Beyer et al. 2020) and ImageNet-v2 next to the validation
  split (TFDS prepares both from the ImageNet manual download and the network)."""
  every = c.get_ref('eval_every')
  c.evals.real = evaluator_specs.classification('validation', dataset='imagenet2012_real',
                                           label_key='real_label', every=every)
  c.evals.v2 = evaluator_specs.classification('test', dataset='imagenet_v2', every=every)


def recipe_args(arg: str, recipe: str, usage: str, alternative: str = '') -> list:
  """The comma-separated arguments of `--config=configs/<recipe>.py:<arg>`, as many as `usage`
  names, with an error that shows the expected form."""
  parts = arg.split(',')
  if len(parts) != len(usage.split(',')) or not all(parts):
    also = f' or ":{alternative}"' if alternative else ''
    raise ValueError(f'configs/{recipe}.py takes ":{usage}" (e.g. configs/{recipe}.py:B_16,'
                     f'cifar10){also}, not {arg!r}.')
  return parts


def dataset_info(name: str) -> dict:
  return DATASETS.get(name, {})


def set_normalisation(c: ml_collections.ConfigDict, read):
  """The input normalisation a checkpoint (checkpoint.load_model) expects: its mean and std of
  pixels in [0, 1], or None for [-1, 1]."""
  preprocessing = read.preprocessing or {'mean': None, 'std': None}
  for key in ('mean', 'std'):
    value = preprocessing[key]
    c.pp[key] = None if value is None else tuple(float(x) for x in value)


def normalisation(c: ml_collections.ConfigDict):
  """The config's input normalisation as a checkpoint describes it (None: [-1, 1])."""
  if c.pp.mean is None:
    return None
  return {'mean': list(c.pp.mean), 'std': list(c.pp.std)}


def official_dataset(dataset: str) -> str:
  """A dataset as the official repository names it (a TFDS name, or a directory of
  {train,test}/<class>/<image>) in this codebase's spelling."""
  if os.sep in dataset and os.path.isdir(os.path.expanduser(dataset)):
    return f'folder:{dataset}'
  return dataset


def set_dataset(c: ml_collections.ConfigDict, name: str):
  """A named dataset with its default splits, downloaded by TFDS on first use."""
  info = dataset_info(name)
  c.dataset = info.get('dataset', name)
  c.train_split = info.get('train', 'train')
  c.test_split = info.get('test', 'test')
  c.tfds_download = True


def image_size(config) -> tuple:
  crop = config.pp.crop
  return (crop, crop) if isinstance(crop, int) else tuple(crop)


def check(config, *, device_count: int, process_count: int = 1):
  """Raises ValueError naming the first impossible value; cheap, so it runs before any compile."""
  def fail(message):
    raise ValueError(f'Invalid config: {message}')

  def one_of(key, value, allowed):
    if value not in allowed:
      fail(f'{key}={value!r}; expected one of {allowed}.')

  _check_finite(config)
  if not config.dataset:
    fail('dataset is empty: set --config.dataset=<a TFDS name, folder:<directory> or digits>.')
  one_of('trainer', config.trainer, TRAINERS)
  one_of('optimizer', config.optimizer, OPTIMIZERS)
  one_of('decay_type', config.decay_type, DECAY_TYPES)
  one_of('loss', config.loss, LOSSES)
  one_of('sharding', config.sharding, SHARDINGS)
  one_of('dtype', config.dtype, DTYPES)
  one_of('optim_dtype', config.optim_dtype, DTYPES)
  one_of('objective', config.objective, OBJECTIVES)
  one_of('model.classifier', config.model.classifier, objectives.kind(config).classifiers)
  _check_decoder(config, fail, one_of)

  for name, spec in config.evals.items():
    one_of(f'evals.{name}.type', spec.type, evaluator_specs.TYPES)
    if name in ('step', 'train_loss', 'wall_time_sec', 'segments', 'evaluated', 'dataset',
                'time'):
      fail(f'evals.{name}: the name is taken by results.json / eval_results.json.')
    if spec.every < 0:
      fail(f'evals.{name}.every={spec.every} must be >= 0.')
    if spec.type == 'fewshot' and spec.every:
      if config.objective == 'mpp':
        fail(f'evals.{name}: few-shot evaluation needs pooled representations; objective=mpp '
             'has one output per patch.')
      if not spec.l2_reg > 0:
        fail(f'evals.{name}.l2_reg={spec.l2_reg} must be positive.')
      if spec.seeds < 1 or min(spec.shots) < 1:
        fail(f'evals.{name}.seeds={spec.seeds} and evals.{name}.shots={tuple(spec.shots)} must '
             'be at least 1.')
      if not spec.datasets or any(len(d) != 3 for d in spec.datasets.values()):
        fail(f'evals.{name}.datasets={spec.datasets}: expected {{name: (dataset, train_split, '
             'test_split)}.')
    if spec.type == 'classification':
      one_of(f'evals.{name}.classes', spec.get('classes', 'all'), evaluator_specs.CLASSES)
    if spec.type == 'corruption':
      if config.objective == 'mpp':
        fail(f'evals.{name}: ImageNet-C scores classifications; objective=mpp has none.')
      unknown = set(spec.corruptions) - set(evaluator_specs.CORRUPTION_ALEXNET_ERRORS)
      if unknown or not spec.corruptions:
        fail(f'evals.{name}.corruptions={tuple(spec.corruptions)}: expected some of '
             f'{tuple(evaluator_specs.CORRUPTION_ALEXNET_ERRORS)}.')
      if not spec.severities or not set(spec.severities) <= {1, 2, 3, 4, 5}:
        fail(f'evals.{name}.severities={tuple(spec.severities)}: expected some of 1..5.')
  if config.profile_steps < 0:
    fail(f'profile_steps={config.profile_steps} must be >= 0.')
  if config.accum_steps < 0:
    fail(f'accum_steps={config.accum_steps} must be >= 0 (0 and 1: no accumulation).')
  for key in ('batch', 'batch_eval', 'total_steps', 'eval_every',
              'checkpoint_every', 'keep_checkpoints', 'progress_every', 'shuffle_buffer'):
    if config[key] < 1:
      fail(f'{key}={config[key]} must be at least 1.')
  if not 0 <= config.warmup_steps < config.total_steps:
    fail(f'warmup_steps={config.warmup_steps} must lie in [0, total_steps={config.total_steps}).')
  if config.base_lr <= 0:
    fail(f'base_lr={config.base_lr} must be positive.')
  for key in ('b1', 'b2', 'momentum'):
    if not 0 <= config[key] < 1:
      fail(f'{key}={config[key]} must lie in [0, 1).')
  if config.weight_decay < 0:
    fail(f'weight_decay={config.weight_decay} must be >= 0.')
  if not 0 < config.layer_decay <= 1:
    fail(f'layer_decay={config.layer_decay} must lie in (0, 1] (1: off).')
  if not config.grad_norm_clip > 0:  # optax clips to norm 0: every update would be zero.
    fail(f'grad_norm_clip={config.grad_norm_clip} must be positive (1 in the paper\'s recipes).')
  transformer = config.model.transformer
  for key in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth'):
    rate = transformer.get(key, 0.0)
    if not 0 <= rate < 1:
      fail(f'model.transformer.{key}={rate} must lie in [0, 1).')
  one_of('model.transformer.remat', transformer.remat, tuple(models_vit.REMAT_POLICIES))
  one_of('model.transformer.attention', transformer.attention, models_vit.ATTENTIONS)
  if transformer.attention == 'dot_product' and transformer.attention_dropout_rate:
    fail(f'model.transformer.attention_dropout_rate={transformer.attention_dropout_rate} needs '
         "the attention probabilities: use model.transformer.attention='einsum'.")
  if config.num_classes is not None and config.num_classes < 1:
    fail(f'num_classes={config.num_classes} must be at least 1.')

  per_step = device_count * max(1, config.accum_steps)
  if config.batch % per_step:
    fail(f'batch={config.batch} is not divisible by device_count x accum_steps = '
         f'{device_count} x {config.accum_steps} = {per_step}.')
  if config.batch_eval % device_count:
    fail(f'batch_eval={config.batch_eval} is not divisible by device_count={device_count}.')
  if config.batch % process_count or config.batch_eval % process_count:
    fail(f'batch={config.batch} and batch_eval={config.batch_eval} must be divisible by the '
         f'process count {process_count}.')

  crop = config.pp.crop
  if not (isinstance(crop, int) or (isinstance(crop, (tuple, list)) and len(crop) == 2 and
                                    all(isinstance(side, int) for side in crop))):
    fail(f'pp.crop={crop!r} must be an int or a pair (height, width) of ints.')
  size = image_size(config)
  stride = models.token_stride(config.model)
  for side, p in zip(size, stride):
    if side < p or side % p:
      fail(f'pp.crop={config.pp.crop} must be a multiple of the patch size {stride} '
           '(and at least one patch).')
  if config.pp.resize_eval and config.pp.resize_eval < max(size):
    fail(f'pp.resize_eval={config.pp.resize_eval} is smaller than pp.crop={config.pp.crop}.')
  if config.pp.randaug_layers < 0 or not 0 <= config.pp.randaug_magnitude <= 10:
    fail(f'pp.randaug_layers={config.pp.randaug_layers} must be >= 0 and '
         f'pp.randaug_magnitude={config.pp.randaug_magnitude} in [0, 10].')
  if config.pp.mixup_alpha < 0:
    fail(f'pp.mixup_alpha={config.pp.mixup_alpha} must be >= 0.')
  if (config.pp.mean is None) != (config.pp.std is None) or (
      config.pp.mean is not None and not layouts.is_normalisation(config.pp.mean, config.pp.std)):
    fail(f'pp.mean={config.pp.mean} and pp.std={config.pp.std}: both None, or both three numbers '
         '(one per channel; std positive).')
  if not 0 < config.pp.crop_min_area <= 1:
    fail(f'pp.crop_min_area={config.pp.crop_min_area} must lie in (0, 1].')

  path = config.pretrained_path
  if path and not _exists(path):
    fail(f'pretrained_path={path!r} does not exist.')


def _check_decoder(config, fail, one_of):
  """A dense objective has its decoder and its kind of data; the others have neither."""
  objective = objectives.kind(config)
  decoder = config.model.get('decoder')
  if not objective.dense:
    if decoder is not None:
      fail(f'model.decoder={dict(decoder)} is for objective=segmentation or detection, not '
           f'objective={config.objective}.')
    if config.dataset != 'shapes' and (datasets.has_boxes(config.dataset) or
                                       datasets.has_class_maps(config.dataset)):
      fail(f'dataset={config.dataset!r} holds class maps or boxes: set objective=segmentation '
           'or detection (configs/segmentation.py, configs/detection.py).')
    return
  if decoder is None:
    fail(f'objective={config.objective} needs model.decoder, one of {objective.decoders} '
         f'(configs/{config.objective}.py sets it).')
  one_of('model.decoder.type', decoder.get('type'), objective.decoders)
  if objective.name == 'segmentation' and not datasets.has_class_maps(config.dataset):
    fail(f'objective=segmentation needs a dataset with class maps (shapes, seg:<dir>, '
         f'{", ".join(datasets.SEGMENTATION_TFDS)}), not dataset={config.dataset!r}.')
  if objective.name == 'detection' and not datasets.has_boxes(config.dataset):
    fail(f'objective=detection needs a dataset with boxes (shapes, det:<dir>, '
         f'{", ".join(datasets.DETECTION_TFDS)}), not dataset={config.dataset!r}.')
  low, high = config.pp.scale_range
  if not 0 < low <= high:
    fail(f'pp.scale_range={tuple(config.pp.scale_range)} must be (low, high) with 0 < low <= high.')
  for name, spec in config.evals.items():
    if spec.every and spec.type != objective.name:
      fail(f'evals.{name}.type={spec.type!r} cannot score objective={config.objective}: use '
           f"type='{objective.name}'.")
  if objective.name == 'detection':
    strides = tuple(decoder.strides)
    try:
      decoders.level_scales(models.token_stride(config.model)[0], strides)
    except ValueError as e:
      fail(f'model.decoder.strides={strides}: {e}')
    size = image_size(config)
    if any(side % max(strides) for side in size):
      fail(f'pp.crop={config.pp.crop} must be a multiple of the coarsest pyramid stride '
           f'{max(strides)}.')
    if decoder.get('instance_masks') and config.dataset in datasets.DETECTION_TFDS:
      fail(f'model.decoder.instance_masks=True, but TFDS {config.dataset} has boxes only: '
           'read COCO with its masks from det:<dir> (the COCO download), or set it False.')
    if config.max_objects < 1 or config.max_detections < 1:
      fail(f'max_objects={config.max_objects} and max_detections={config.max_detections} '
           'must be at least 1.')


def _check_finite(config):
  """Every float of the config, nested ones too, is finite: a NaN learning rate (or b1, ...)
  would otherwise pass every range check below (comparisons with NaN are all False)."""
  def floats(value, key):
    if isinstance(value, float):
      yield key, value
    elif isinstance(value, (ml_collections.ConfigDict, dict)):
      for k, v in value.items():
        yield from floats(v, f'{key}.{k}' if key else k)
    elif isinstance(value, (tuple, list)):
      for i, v in enumerate(value):
        yield from floats(v, f'{key}[{i}]')
  for key, value in floats(config, ''):
    if not math.isfinite(value):
      raise ValueError(f'Invalid config: {key}={value} is not a finite number.')


def _exists(path: str) -> bool:
  if path.startswith('hf://'):
    return True  # Resolved through the Hugging Face cache when read, with named errors.
  if '://' not in path:
    return os.path.exists(path)  # A file, or a Hugging Face / timm model directory.
  import tensorflow as tf
  try:
    return tf.io.gfile.exists(path)
  except tf.errors.OpError as e:  # No network, no credentials, no such bucket, ...
    reason = e.message.splitlines()[0] if e.message else type(e).__name__
    raise ValueError(f'Invalid config: cannot reach pretrained_path={path!r} ({reason}). '
                     'Download it (e.g. gsutil cp, or https://storage.googleapis.com/'
                     f'{path[len("gs://"):] if path.startswith("gs://") else "..."}) and pass '
                     '--config.pretrained_path=<local file>.') from None


def with_augreg_file(config):
  """The config with its pretrained_path, where it names an AugReg model instead of a file (the
  official vit_jax/configs/augreg.py:R_Ti_16): the ImageNet-21k pre-training with the best final
  validation accuracy in <pretrained_dir>/index.csv, as the official code picks it."""
  model = config.get('model_or_filename')
  if not model or '-' in model or config.pretrained_path:
    return config
  import csv
  import tensorflow as tf
  index = f'{config.pretrained_dir}/index.csv'
  try:
    with tf.io.gfile.GFile(index) as f:
      rows = [r for r in csv.DictReader(f)
              if r['filename'].split('-')[0] == model and r['ds'] == 'i21k']
  except (tf.errors.OpError, KeyError) as e:
    raise ValueError(f'Invalid config: cannot read the AugReg index {index} ({e}); name the '
                     'checkpoint file instead: augreg.py:<model>-i21k-300ep-...') from None
  if not rows:
    raise ValueError(f'Invalid config: {index} lists no ImageNet-21k checkpoint of {model}.')
  best = max(rows, key=lambda r: float(r['final_val']))
  logging.info('AugReg model %s: %s (final_val %s).', model, best['filename'], best['final_val'])
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.pretrained_path = f'{config.pretrained_dir}/{best["filename"]}.npz'
  return config


def epochs_to_steps(epochs: float, dataset: str, batch: int) -> int:
  return math.ceil(epochs * DATASETS[dataset]['train_size'] / batch)
