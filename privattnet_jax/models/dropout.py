"""Inverted dropout that draws 8 or 16 random bits per element instead of 32.

The attention head masks five (B, L, D) tensors per step (the feature, key and three energy
dropouts: 1M elements per 224 px image), and with threefry the random bits cost more time than
the head's arithmetic on a CPU (docs/benchmarks.md, "On the 2-core CPU" under the feature cache).
`flax.linen.Dropout` draws one 32-bit word per element
(`jax.random.bernoulli`); here one word serves four elements (8-bit draws) where the keep
probability is a multiple of 1/256 (0.5, 0.25, ...) or two (16-bit draws) otherwise, so a mask
costs a quarter or half of the PRNG work, on every backend.

The realised keep probability is threshold / 2**bits: exact for multiples of 1/256 with 8 bits
and of 1/65536 with 16 bits, else the nearest multiple of 1/65536 (p = 0.8 keeps 13107/65536
= 0.1999969 instead of 0.2). Kept values are scaled by the realised probability, so the layer is
exactly unbiased, as inverted dropout should be.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def keep_threshold(rate: float) -> tuple[int, int]:
  """(bits, threshold): an element is kept when its `bits`-bit draw is < threshold."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must lie in [0, 1), got {rate!r}")
  keep = 1.0 - rate
  if abs(keep * 256 - round(keep * 256)) < 1e-9:
    return 8, round(keep * 256)
  return 16, min(max(round(keep * 65536), 1), 65535)


def random_bits(key: jax.Array, shape: tuple[int, ...], bits: int) -> jax.Array:
  """`bits`-bit unsigned draws of `shape`, packed 32 // bits to each 32-bit PRNG word."""
  size = math.prod(shape)
  per_word = 32 // bits
  words = jax.random.bits(key, (-(-size // per_word),), jnp.uint32)
  narrow = jax.lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16).reshape(-1)
  return narrow[:size].reshape(shape)


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout(rate)(x, deterministic=...)`, with packed random draws (see above)."""

  rate: float

  @nn.compact
  def __call__(self, inputs, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return inputs
    bits, threshold = keep_threshold(self.rate)
    keep = random_bits(self.make_rng("dropout"), inputs.shape, bits) < threshold
    scale = jnp.asarray(2**bits / threshold, inputs.dtype)
    return jnp.where(keep, inputs * scale, jnp.zeros((), inputs.dtype))
