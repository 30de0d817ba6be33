"""Tolerances for comparing float results computed on different CPUs, thread counts or kernels.

Two correct float computations of the same model can differ: AVX2 and AVX-512 kernels (and
different thread counts) sum dot products in different orders. A sum of ``n`` products has a
worst-case error of ``n * u * sum(|x_i * y_i|)`` (Higham, eq. 3.4; ``u = eps / 2``), but rounding
errors are independent enough that the error grows like ``sqrt(n)``: ``lambda * sqrt(n) * u *
sum(|x_i * y_i|)`` holds with probability ``1 - 2 exp(-lambda^2 / 2)`` (Higham and Mary, "A New
Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019). Two orders
then differ by at most ``lambda * sqrt(n) * eps * sum(|x_i * y_i|)``. The tolerance applies that
at the output with ``lambda = 1`` per reduction, the output's largest magnitude (at least 1)
standing in for the sum of absolute products, and one term per reduction in series (they add up
to far more than ``lambda = 6`` for one). For the fixtures this is ~7e-6: 200 times what a
different summation order produces (3e-8 seen on AVX-512 against AVX2 logits of magnitude ~1),
and 3 to 1000 times smaller than what a wrong load does (one tensor off by 0.1%, a wrong norm
epsilon, one int4 code off by one: tests/unit/test_numerics.py).
"""

from __future__ import annotations

import math

import torch


def summation_order_tol(expected: torch.Tensor, longest_reduction: int, stages: int) -> float:
    """Absolute tolerance for `expected` recomputed with another summation order.

    Args:
        expected: the stored result (its dtype's epsilon and its largest magnitude are used).
        longest_reduction: the longest dot product in the computation (e.g. the MLP width).
        stages: reductions in series between input and output (each can add its own error).

    Returns:
        ``stages * sqrt(longest_reduction) * eps * max(1, max|expected|)``.
    """
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, float(expected.abs().max()))
    return stages * math.sqrt(longest_reduction) * eps * scale


def assert_close_across_cpus(got: torch.Tensor, expected: torch.Tensor, longest_reduction: int, stages: int) -> None:
    """`got` equals `expected` up to the summation-order bound (see module docstring)."""
    tol = summation_order_tol(expected, longest_reduction, stages)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=tol)


def model_reductions(shape: dict) -> dict[str, int]:
    """`longest_reduction` and `stages` of a qtrain GPT's forward, from its manifest shape.

    Per block, six reductions run in series (qkv, scores, weighted values, output projection,
    MLP up, MLP down); the head adds one. The longest is the widest of the model width, the MLP
    width and the context (softmax-weighted sums run over positions).
    """
    longest = max(int(shape["n_embd"]), int(shape["mlp_hidden"]), int(shape["block_size"]))
    return {"longest_reduction": longest, "stages": 6 * int(shape["n_layer"]) + 1}
