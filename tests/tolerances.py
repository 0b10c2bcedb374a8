"""The suite's tolerance policy: every numeric comparison of the tests goes through this module.

Policy
------
A float comparison is relative to the magnitude of what is compared, with a bound that follows from the operation
that produced the value, never from the value one machine happened to print:

* ``EPS32`` is float32's machine epsilon (2**-23 = 1.19e-7); one rounding costs at most ``EPS32 / 2`` relative.
* A reduction over ``K`` terms (a matmul's inner dimension, a mean over a batch, a gradient accumulated over ``N``
  elements) in float32 carries a round-off that grows like ``sqrt(K) * EPS32`` relative to the sum of the terms'
  magnitudes when the summation order changes (other CPU kernels, thread counts, batch shapes, library versions).
  :func:`accumulation_rtol` turns an accumulation length into a relative bound with a safety factor of 16 and a floor
  of :data:`FORWARD_RTOL`.
* A whole forward pass through a tiny network (a few blocks of matmuls, norms and softmaxes) is bounded by
  ``FORWARD_RTOL = 1e-5`` relative to the largest entry of the compared tensor. The official fixtures measured their
  float32 floor at <= 7.2e-7 (other kernels) and <= 3.2e-6 against float64 (see their READMEs): 1e-5 covers both.
* A value learned or sampled over many steps (training losses, Monte Carlo statistics) is not a round-off question:
  its test states its own statistical bound and says why.
* The absolute part of every bound is the relative bound times a *scale*: by default the largest ``|value|`` of the
  expected tensor, or, for a value that is small because of cancellation (a gradient of a bias that is zero in exact
  arithmetic, a difference of two scores, a loss of 1.6e-3 made of scores of size 3), the magnitude of the operands
  that produced it, passed as ``scale=``. So there is never a bare absolute epsilon on values that may exceed 1, and
  never a relative bound on a tiny scalar without an absolute floor.
* Exact equality (``torch.equal``, ``==``) is kept only where the code promises bit-identity (resume, the same
  computation twice, lookups in a table, integer results), and each such assertion says why it can be exact.

Bounds per operation (use the named helper, so a bound is changed in one place):

===============================================  ============================================================
operation                                        bound
===============================================  ============================================================
forward pass of a tiny model, float32            ``FORWARD_RTOL`` x max|expected|          (:func:`assert_close`)
same model, another batch shape / composition    ``FORWARD_RTOL`` x max|expected|          (batching reorders sums)
reduction / matmul over K terms, float32         ``accumulation_rtol(K)`` x scale
gradient accumulated over N elements, float32    ``accumulation_rtol(N)`` x max|expected gradient set|
float64 arithmetic on a handful of terms         ``F64_RTOL`` (1e-12) x scale
a value printed or rounded to d decimals         half the last place + FORWARD_RTOL         (:func:`printed_as`)
weights after a few Adam steps (cached vs raw)   ``TRAINING_RTOL`` (1e-4) x max|expected|
a probability (in [0, 1]) from float32 scores   ``FORWARD_RTOL`` x 1, its range            (``close_to(p, scale=1)``)
===============================================  ============================================================
"""

import math

import pytest
import torch


EPS32 = torch.finfo(torch.float32).eps
FORWARD_RTOL = 1e-5
F64_RTOL = 1e-12
# Weights after a few optimizer steps from inputs that differ by round-off (cached vs raw features): Adam divides each
# update by the root of its second moment, which amplifies a round-off difference in a small gradient entry.
TRAINING_RTOL = 1e-4
# Safety factor over the sqrt(K) round-off growth: different summation trees can add their errors coherently.
ACCUMULATION_SAFETY = 16


def accumulation_rtol(terms: int) -> float:
    """Relative bound for a float32 value accumulated over `terms` products/elements (at least FORWARD_RTOL)."""
    return max(FORWARD_RTOL, ACCUMULATION_SAFETY * math.sqrt(max(terms, 1)) * EPS32)


def _magnitude(value) -> float:
    if isinstance(value, torch.Tensor):
        return value.detach().double().abs().max().item() if value.numel() else 0.0
    if isinstance(value, (list, tuple)):
        return max((_magnitude(v) for v in value), default=0.0)
    return abs(float(value))


def close_to(expected, rtol: float = FORWARD_RTOL, scale: float | None = None):
    """`pytest.approx(expected)` with this policy's bound: `rtol` relative, floored at `rtol * scale`.

    `scale` defaults to the largest |expected| (the magnitude of what is compared); pass the operands' magnitude
    when the expected value is small through cancellation.
    """
    floor = rtol * (_magnitude(expected) if scale is None else scale)
    return pytest.approx(expected, rtol, floor)


def assert_close(actual, expected, rtol: float = FORWARD_RTOL, scale: float | None = None, msg: str = "") -> None:
    """Max |actual - expected| <= rtol * max(scale, max|expected|) over the whole tensor (shapes must match).

    The absolute part is scaled to the compared tensor, so an entry near zero in a tensor of size-3 values is held to
    the round-off of size-3 values, not to its own tiny magnitude.
    """
    actual_t = torch.as_tensor(actual).detach().double()
    expected_t = torch.as_tensor(expected).detach().double()
    assert actual_t.shape == expected_t.shape, f"{msg}: shape {tuple(actual_t.shape)} vs {tuple(expected_t.shape)}"
    magnitude = _magnitude(expected_t)
    if scale is not None:
        magnitude = max(magnitude, scale)
    if actual_t.numel() == 0:
        return
    error = (actual_t - expected_t).abs().max().item()
    bound = rtol * magnitude + torch.finfo(torch.float64).tiny
    assert error <= bound, (
        f"{msg}: max |error| {error:.3g} > {bound:.3g} (rtol {rtol:.2g} x magnitude {magnitude:.3g})"
    )


def assert_allclose_elementwise(actual, expected, rtol: float = FORWARD_RTOL, scale: float | None = None, msg=""):
    """`torch.testing.assert_close` entry by entry: rtol relative to each entry, atol = rtol * scale of the tensor."""
    expected_t = torch.as_tensor(expected)
    atol = rtol * (_magnitude(expected_t) if scale is None else scale)
    torch.testing.assert_close(
        torch.as_tensor(actual).to(expected_t.dtype), expected_t, rtol=rtol, atol=atol, msg=msg or None
    )


def printed_as(expected, decimals: int):
    """`pytest.approx` for a value printed or rounded to `decimals` places: off by at most half the last place,
    plus FORWARD_RTOL of the value for the computation that produced it."""
    resolution = 0.5 * 10.0**-decimals
    return pytest.approx(expected, FORWARD_RTOL, resolution + FORWARD_RTOL * _magnitude(expected))
