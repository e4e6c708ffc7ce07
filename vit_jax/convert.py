r"""Converts a checkpoint between layouts:

python -m vit_jax.convert --format=hf|timm|npz SOURCE DEST

SOURCE: anything checkpoint.load_model reads (an .npz of any Google release or of a run here, a
Hugging Face model directory, a timm .safetensors file, hf://ORG/NAME[@REVISION]).
  --format=npz   the official layout, describing itself (model config, resolution, class
                 names, input normalisation)
  --format=hf    a Hugging Face directory (config.json, model.safetensors) that transformers'
                 AutoModelForImageClassification (or AutoModel, headless) loads
  --format=timm  a timm state dict (.safetensors); prints the timm.create_model(...) call whose
                 model loads it strictly
DEST must not exist, and never will be overwritten: it is checked before the conversion, and
taken only if still free when the result is complete (files.create / create_dir). A gs:// DEST
is uploaded once written in full.
"""

from absl import app, flags

from vit_jax import checkpoint, cpu_tuning, files
from vit_jax.layouts import hugging_face, timm

FORMATS = ('npz', 'hf', 'timm')


def convert(source: str, dest: str, fmt: str) -> str:
  """Writes `source` as `fmt` into `dest`; returns a line saying how to load it."""
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; expected one of {FORMATS}.')
  files.check_new(dest, 'folder' if fmt == 'hf' else 'file')
  read = checkpoint.load_model(source)
  if fmt == 'npz':
    checkpoint.save(read.params, dest, model_config=read.config, image_size=read.image_size,
                    multi_label=read.multi_label, class_names=read.class_names,
                    preprocessing=read.preprocessing, num_classes=read.num_classes,
                    resize=read.resize, new=True)
    return f'vit_jax.checkpoint.load_model({dest!r})'
  # PyTorch's libraries read local files: a gs:// DEST is named as its local copy.
  local = dest.rstrip('/').rsplit('/', 1)[-1] if files.is_remote(dest) else dest
  fetch = f'# gsutil cp -r {dest} .\n' if files.is_remote(dest) else ''
  if fmt == 'hf':
    hugging_face.write(read, dest)
    return (f'{fetch}transformers.AutoModel'
            f'{"ForImageClassification" if read.num_classes else ""}.from_pretrained({local!r})')
  call = timm.write(read, dest)
  return (f'{fetch}model = {call}\nmodel.load_state_dict(safetensors.torch.load_file('
          f'{local!r}), strict=True)')


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('Expected SOURCE DEST (and --format).')
  print(convert(argv[1], argv[2], flags.FLAGS.format))


if __name__ == '__main__':
  cpu_tuning.tune_command_line()
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.', required=True)
  app.run(main)
