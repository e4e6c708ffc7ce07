"""Run by test_models with 4 simulated devices: the model under jax.pmap (forward, and the
official notebook's update step, train.make_update_fn, with gradient accumulation) and under
jax.shard_map equals the same computation jitted over the whole batch; the notebook's data
(input_pipeline.get_data_from_tfds) comes with the device axis pmap expects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from vit_jax import config_lib, input_pipeline, models, train
from vit_jax.models_vit import VisionTransformer

n = jax.local_device_count()
assert n > 1, 'Run with XLA_FLAGS=--xla_force_host_platform_device_count=4.'
config = models.vit_config('t', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch=4)
model = VisionTransformer(num_classes=3, **config)
images = jax.random.normal(jax.random.PRNGKey(1), (n * 2, 8, 8, 3))
labels = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), (n * 2,), 0, 3), 3)
params = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
                      params)  # Away from the zero head: every gradient is non-zero.
logits_of = lambda p, x: model.apply({'params': p}, x, train=False)
loss = lambda p, x, y: optax.softmax_cross_entropy(logits_of(p, x), y).mean()
sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
tx = optax.sgd(0.1)
jitted_logits = jax.jit(logits_of)(params, images)
jitted_step = jax.jit(lambda p, x, y: sgd(p, jax.grad(loss)(p, x, y)))(params, images, labels)
per_device = lambda a: a.reshape((n, -1) + a.shape[1:])
replicated = jax.tree.map(lambda p: jnp.stack([p] * n), params)
pmap_logits = jax.pmap(logits_of)(replicated, per_device(images))
update_fn = train.make_update_fn(apply_fn=model.apply, accum_steps=2, tx=tx)
pmap_step, _, pmap_loss, _ = update_fn(replicated, jax.tree.map(lambda s: jnp.stack([s] * n),
                                                                 tx.init(params)),
                                       {'image': per_device(images), 'label': per_device(labels)},
                                       jnp.stack([jax.random.PRNGKey(0)] * n))
mesh = jax.make_mesh((n,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
shard_logits = jax.jit(jax.shard_map(logits_of, mesh=mesh, in_specs=(P(), P('batch')),
                                     out_specs=P('batch')))(params, images)
np.testing.assert_allclose(pmap_logits.reshape(jitted_logits.shape), jitted_logits, atol=1e-6)
np.testing.assert_allclose(shard_logits, jitted_logits, atol=1e-6)
for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[0], pmap_step)),
                jax.tree.leaves(jitted_step)):
  np.testing.assert_allclose(a, b, atol=1e-6)
np.testing.assert_allclose(pmap_loss, loss(params, images, labels), atol=1e-6)

config = config_lib.base_config()  # The notebook's data cells, on the embedded digits.
config.update(batch=8, batch_eval=64)
config.pp.crop = 8
train_batch = next(input_pipeline.get_data_from_tfds(config=config, mode='train').as_numpy_iterator())
assert train_batch['image'].shape == (n, 2, 8, 8, 3) and train_batch['label'].shape == (n, 2, 10)
test_batches = list(input_pipeline.get_data_from_tfds(config=config, mode='test').as_numpy_iterator())
test_size = input_pipeline.get_dataset_info('digits', 'test')['num_examples']
assert len(test_batches) == -(-test_size // 64), len(test_batches)  # The last one padded:
assert all(b['mask'].shape == (n, 16) for b in test_batches)
assert sum(b['mask'].sum() for b in test_batches) == test_size == sum(
    b['label'].sum() for b in test_batches)  # every example once, the padding without a label.
print(f'pmap and shard_map equal jit on {n} devices')
