"""Pure margin-softmax math (torchmetrics style): no state, float32 in, float32 out.

Every function works on *unscaled cosines*; the heads multiply by ``scale`` afterwards.
Angles are in radians, CosFace-style margins in cosine units.

Numerical policy: ``d acos(x)/dx`` and ``d sqrt(1 - x^2)/dx`` are infinite at ``|x| = 1``,
which is exactly where a well-trained embedding sits on its class centre. Angles below
``ANGLE_EPS`` radians (from either end) are therefore treated as ``ANGLE_EPS``: the value
changes by at most ~1e-3 of a cosine there and the gradient stays finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ANGLE_EPS",
    "adaface_margin",
    "angular_margin",
    "arcface_margin",
    "cosface_margin",
    "curricular_negatives",
    "l2_normalize",
    "normalize_embeddings",
]

ANGLE_EPS = 1e-3
# 1 - cos(ANGLE_EPS) and sin(ANGLE_EPS)^2: the matching clamps for acos and sqrt(1 - cos^2).
_COS_EPS = 1.0 - math.cos(ANGLE_EPS)
_SIN2_EPS = math.sin(ANGLE_EPS) ** 2


def l2_normalize(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Row-wise unit vectors and norms, both float32 whatever ``x``'s dtype."""
    x = x.float()
    norms = torch.linalg.vector_norm(x, dim=-1)
    return x / norms.clamp_min(eps).unsqueeze(-1), norms


def normalize_embeddings(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """Unit rows, norms and finite-row mask ``[B]`` of embeddings ``[B, D]``, all float32.

    A row without a direction (norm <= ``eps``) or with a NaN/Inf value comes back as the
    zero vector with **zero gradient** (its norm as 0): a plain ``x / max(|x|, eps)`` would
    send ``1/eps`` (1e12) times the upstream gradient into it, and a NaN row would put NaN
    into the gradient of every class centre it is compared with. Callers decide what a
    non-finite row means (the heads make the loss NaN, see ``MarginHead.loss``).
    """
    x = x.float()
    finite = torch.isfinite(x).all(dim=-1)
    x = torch.where(finite.unsqueeze(-1), x, 0.0)
    norms = torch.linalg.vector_norm(x, dim=-1)
    has_direction = (norms > eps).unsqueeze(-1)
    unit = x / norms.clamp_min(eps).unsqueeze(-1) * has_direction
    return unit, norms, finite


def cosface_margin(cos: Tensor, margin: float) -> Tensor:
    """CosFace / AM-softmax (Wang et al. 2018): ``cos(theta) - m``."""
    return cos.float() - margin


def _safe_acos(cos: Tensor) -> Tensor:
    return torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))


def angular_margin(
    cos: Tensor,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    easy_margin: bool = False,
) -> Tensor:
    """insightface's combined margin ``cos(m1 * theta + m2) - m3``.

    Where ``m1 * theta + m2`` passes ``pi`` the cosine would turn back up (the target logit
    would *grow* with the angle), so beyond that threshold angle ``theta_t`` the function
    continues as ``cos(theta) - (pi - theta_t) * sin(theta_t) - m3``: the first-order
    extension of the angular shift, which for ``m1 = 1`` is ArcFace's well-known
    ``cos(theta) - m * sin(m)``. ``easy_margin`` instead keeps the plain cosine wherever
    ``cos <= 0`` (Deng et al.'s option; not monotonic at ``theta = pi/2``).
    """
    cos = cos.float()
    if m1 == 1.0:
        # Addition formula: no acos, exact except below ANGLE_EPS.
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(_SIN2_EPS))
        shifted = cos * math.cos(m2) - sin * math.sin(m2)
    else:
        shifted = torch.cos(m1 * _safe_acos(cos) + m2)
    if easy_margin:
        out = torch.where(cos > 0, shifted, cos)
    else:
        theta_t = (math.pi - m2) / m1
        if theta_t < math.pi:
            fallback = cos - (math.pi - theta_t) * math.sin(theta_t)
            out = torch.where(cos > math.cos(theta_t), shifted, fallback)
        else:
            out = shifted
    return out - m3


def arcface_margin(cos: Tensor, margin: float, easy_margin: bool = False) -> Tensor:
    """ArcFace (Deng et al. 2019): ``cos(theta + m)`` with the ``theta + m > pi`` fallback."""
    return angular_margin(cos, 1.0, margin, 0.0, easy_margin)


def curricular_negatives(cos: Tensor, target: Tensor, t: Tensor | float) -> Tensor:
    """CurricularFace (Huang et al. 2020) modulation of the non-target cosines.

    A negative whose cosine exceeds the (margined) target logit of its row is "hard" and
    re-weighted to ``cos * (t + cos)``; ``target`` is ``[B]`` or ``[B, 1]``, detached.
    """
    cos = cos.float()
    target = target.reshape(-1, 1)
    return torch.where(cos > target, cos * (t + cos), cos)


def adaface_margin(
    cos: Tensor,
    norms: Tensor,
    margin: float,
    h: float,
    norm_mean: Tensor | float,
    norm_std: Tensor | float,
    eps: float = 1e-3,
) -> Tensor:
    """AdaFace (Kim et al. 2022): margin adapted to the feature norm (image quality proxy).

    ``norms`` are the embedding norms *before* normalisation; ``norm_mean``/``norm_std`` are
    the running batch statistics. ``g = clip(h * (||z|| - mean) / (std + eps), -1, 1)``,
    target logit ``cos(clip(theta - m g, eps, pi - eps)) - (m + m g)``.
    """
    safe = norms.float().detach().clamp(0.001, 100.0)
    g = ((safe - norm_mean) / (norm_std + eps) * h).clamp(-1.0, 1.0)
    theta = _safe_acos(cos.float())
    theta = (theta - margin * g).clamp(eps, math.pi - eps)
    return torch.cos(theta) - (margin + margin * g)
