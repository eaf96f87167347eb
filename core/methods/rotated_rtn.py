"""A random orthogonal rotation of a linear's input dimension (the idea of QuaRot / SpinQuant).

``y = X W^T = (X R)(W R)^T`` for any orthogonal ``R [in, in]``: quantizing ``W R`` instead of ``W`` spreads an
outlier input channel over all channels, so no group's range is set by it. At run time the activations must be
rotated too (``X R``, or ``R`` folded into the previous layer where the architecture allows): this module only
measures what the rotation does to the weight quantization error.

Construction (seeded, exactly orthogonal up to float rounding): ``in = 2^k * m`` with ``m`` odd;
``R = D (Q_m kron H_{2^k}) / sqrt(2^k)`` with ``D`` random +-1 signs, ``H`` the Sylvester Hadamard matrix and
``Q_m`` a random orthogonal ``m x m`` matrix (QR of a Gaussian, signs fixed); ``m == 1`` gives the plain
randomized Hadamard. Kronecker products of orthogonal matrices are orthogonal, and every output coordinate
mixes all ``in`` inputs, as a full Hadamard would (QuaRot uses a known Hadamard of size ``m`` such as 12 or 20
where one exists; for 576 = 64 * 9, 1536 = 512 * 3, 896 = 128 * 7 or 4864 = 256 * 19 we use a random one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import quant
from ..grids.spec import Options, QuantSpec
from .base import LayerInputs, data_free


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of size ``n`` (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``m x m`` matrix (QR of a Gaussian with the diagonal signs fixed), float64."""
    a = torch.randn(m, m, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(m, dtype=torch.float64))


def rotation(n: int, seed: int = 0) -> torch.Tensor:
    """The seeded orthogonal rotation ``R [n, n]`` (float32) described in the module docstring."""
    if int(n) < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    n = int(n)
    p2 = n & -n  # the largest power of two dividing n
    m = n // p2
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).double() * 2 - 1
    core = hadamard(p2) / p2**0.5
    if m > 1:
        core = torch.kron(random_orthogonal(m, g).contiguous(), core.contiguous())
    return (signs.unsqueeze(1) * core).float()


def rotated_rtn(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, *,
                seed: int = 0, r: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(W R) R^T`` for ``w [out, in]``: the weights that, fed the *unrotated* input, give ``(X R) Q(W R)^T``."""
    bits = quant.check_bits(bits)
    if w.dim() != 2:
        raise ValueError("rotated_rtn needs a 2-D weight [out, in]")
    quant.effective_group_size(w.shape[1], group_size)
    r = rotation(w.shape[1], seed) if r is None else r
    wr = w.float() @ r
    # the rotation is computed in float64 and stored as float32: undo it with R^T (its inverse up to rounding)
    return quant.pseudo_quantize(wr, bits, group_size, zero_point) @ r.T


@dataclass(frozen=True)
class RotatedRTNOptions(Options):
    """``seed``: the seed of the random orthogonal (Hadamard-based) rotation ``R``."""

    seed: int = 0


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: RotatedRTNOptions) -> torch.Tensor:
    return rotated_rtn(w, spec.bits, spec.group_size, spec.zero_point, seed=options.seed)



METHOD = data_free("rotated-rtn", "Rotated RTN", RotatedRTNOptions, layer,
                   "RTN of W R with R a seeded random orthogonal (Hadamard-based) rotation, returned as Q(W R) R^T; "
                   "deploying it needs the activations rotated at run time (X R)",
                   "every block linear as Q(W R) R^T with its own rotation (the activations rotated at run time)")
