"""Run by test_models with 4 simulated devices: the model under jax.pmap (forward, and an SGD
step with the gradient averaged over devices, as the official notebook's update_fn) and under
jax.shard_map equals the same computation jitted over the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from vit_jax import models
from vit_jax.models_vit import VisionTransformer

n = jax.local_device_count()
assert n > 1, 'Run with XLA_FLAGS=--xla_force_host_platform_device_count=4.'
config = models.vit_config('t', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch=4)
model = VisionTransformer(num_classes=3, **config)
images = jax.random.normal(jax.random.PRNGKey(1), (n * 2, 8, 8, 3))
labels = jax.random.randint(jax.random.PRNGKey(2), (n * 2,), 0, 3)
params = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
                      params)  # Away from the zero head: every gradient is non-zero.
logits_of = lambda p, x: model.apply({'params': p}, x, train=False)
loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(logits_of(p, x), y).mean()
sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
jitted_logits = jax.jit(logits_of)(params, images)
jitted_step = jax.jit(lambda p, x, y: sgd(p, jax.grad(loss)(p, x, y)))(params, images, labels)
per_device = lambda a: a.reshape((n, -1) + a.shape[1:])
replicated = jax.tree.map(lambda p: jnp.stack([p] * n), params)
pmap_logits = jax.pmap(logits_of)(replicated, per_device(images))
pmap_step = jax.pmap(lambda p, x, y: sgd(p, jax.lax.pmean(jax.grad(loss)(p, x, y), 'batch')),
                     axis_name='batch')(replicated, per_device(images), per_device(labels))
mesh = jax.make_mesh((n,), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))
shard_logits = jax.jit(jax.shard_map(logits_of, mesh=mesh, in_specs=(P(), P('batch')),
                                     out_specs=P('batch')))(params, images)
np.testing.assert_allclose(pmap_logits.reshape(jitted_logits.shape), jitted_logits, atol=1e-6)
np.testing.assert_allclose(shard_logits, jitted_logits, atol=1e-6)
for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[0], pmap_step)),
                jax.tree.leaves(jitted_step)):
  np.testing.assert_allclose(a, b, atol=1e-6)
print(f'pmap and shard_map equal jit on {n} devices')
