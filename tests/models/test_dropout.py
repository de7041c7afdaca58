"""The packed-bits dropout: its realised rate, unbiasedness, determinism and key dependence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.models import dropout


@pytest.mark.parametrize(
  "rate, bits, threshold",
  [
    (0.5, 8, 128),  # A multiple of 1/256: exact with 8-bit draws.
    (0.75, 8, 64),
    (0.8, 16, 13107),  # Keep 0.2 is no multiple of 1/256: the nearest multiple of 1/65536.
    (0.4, 16, 39322),
    (1e-7, 16, 65535),  # Keeps nearly all, without overflowing the 16-bit comparison.
  ],
)
def test_keep_threshold(rate, bits, threshold):
  assert dropout.keep_threshold(rate) == (bits, threshold)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rates_outside_zero_one_are_refused(rate):
  with pytest.raises(ValueError, match="dropout rate"):
    dropout.keep_threshold(rate)


@pytest.mark.parametrize("bits", [8, 16])
def test_random_bits_are_uniform_over_their_range_for_odd_sizes(bits):
  draws = np.asarray(
    dropout.random_bits(jax.random.key(0), (7, 1001), bits)
  )  # Not a multiple of 4.
  assert draws.shape == (7, 1001) and draws.dtype == (np.uint8 if bits == 8 else np.uint16)
  assert abs(draws.mean() / (2**bits - 1) - 0.5) < 0.01
  # Each byte of a word is used: the four (two) lanes of a word are not equal.
  assert np.mean(draws[:, :-1] == draws[:, 1:]) < 0.05


@pytest.mark.parametrize("rate", [0.5, 0.8])
def test_dropout_keeps_the_requested_fraction_and_is_unbiased(rate):
  x = jnp.ones((200, 1000))
  y = np.asarray(
    dropout.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  )
  kept = y != 0
  assert abs(kept.mean() - (1 - rate)) < 0.005  # 200k draws: the binomial s.d. is < 0.001.
  bits, threshold = dropout.keep_threshold(rate)
  np.testing.assert_allclose(
    y[kept], 2**bits / threshold, rtol=1e-6
  )  # Scaled by the realised rate.
  assert abs(y.mean() - 1.0) < 0.03


def test_dropout_is_the_identity_when_deterministic_or_rate_zero():
  x = jax.random.normal(jax.random.key(0), (4, 5))
  np.testing.assert_array_equal(dropout.Dropout(0.5).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(
    dropout.Dropout(0.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}), x
  )


def test_dropout_masks_follow_the_key_and_keep_the_dtype():
  x = jnp.ones((64, 64), jnp.bfloat16)
  apply = lambda key: dropout.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": key})
  a, b, c = apply(jax.random.key(1)), apply(jax.random.key(1)), apply(jax.random.key(2))
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.3


def test_gradient_flows_through_kept_elements_only():
  x = jnp.arange(1.0, 101.0)
  key = jax.random.key(3)
  apply = lambda v: dropout.Dropout(0.5).apply({}, v, deterministic=False, rngs={"dropout": key})
  grad = np.asarray(jax.grad(lambda v: apply(v).sum())(x))
  kept = np.asarray(apply(x)) != 0
  np.testing.assert_array_equal(grad, np.where(kept, 2.0, 0.0))
