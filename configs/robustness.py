r"""An ImageNet-1k classifier under the distribution shifts of the ViT papers (trainer=evaluate).

python -m vit_jax.main --config=configs/robustness.py:CHECKPOINT --workdir=DIR

CHECKPOINT: any checkpoint with a 1000-class ImageNet head that checkpoint.load_model reads (the
official gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz, a run's model.npz, a Hugging Face
ViTForImageClassification, ...), evaluated at its own resolution and input normalisation on:

  test        ImageNet validation            imagenet_a  ImageNet-A (its 200 classes)
  real        ReaL labels (Beyer et al.)     imagenet_r  ImageNet-R (its 200 classes)
  v2          ImageNet-v2 matched frequency  imagenet_c  ImageNet-C: 15 corruptions x 5
  sketch      ImageNet-Sketch                            severities, mCE (AlexNet = 1)

Every metric comes with the NLL and the expected calibration error. The datasets are TFDS's:
ImageNet (and ReaL, ImageNet-C, built from its validation archive) from tfds_manual_dir, the
others downloaded on first use.
"""

from vit_jax import config_lib, evaluator_specs


def get_config(arg=''):
  (source,) = config_lib.recipe_args(arg, 'robustness', 'CHECKPOINT')
  from vit_jax import checkpoint
  read = checkpoint.load_model(source)
  if read.num_classes != 1000:
    raise ValueError(f'{source} has a head of {read.num_classes} classes: the robustness '
                     'suite scores ImageNet-1k classifiers (1000 classes).')
  c = config_lib.base_config()
  c.trainer = 'evaluate'
  c.model = read.config
  c.pretrained_path = source
  config_lib.set_normalisation(c, read)
  config_lib.set_dataset(c, 'imagenet2012')
  c.pp.crop = tuple(read.image_size)
  c.batch_eval = 512
  c.evals.test.every = 1
  c.evals.update(evaluator_specs.robustness(every=1))
  return c.lock()
