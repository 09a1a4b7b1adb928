"""Model merging over state dicts, and WSM's map from a learning-rate decay shape to merge weights.

Merge methods (MergeKit's, as pure functions; ``MERGE_METHODS`` selects one by name):
- ``linear``: sum_m w_m theta_m (weights normalised to sum 1 unless ``normalize=False``);
- ``task_arithmetic``: theta_0 + sum_m lambda_m (theta_m - theta_0);
- ``slerp``: two-model spherical interpolation, MergeKit's ``slerp`` (lerp for near-parallel tensors);
- ``multislerp``: MergeKit's Multi-SLERP, computed as MergeKit computes it. Its tangent point is the
  normalised weighted mean of the unit directions, so the tangent-space average is zero and the result
  is (sum_m w_m |x_m|) * normalise(sum_m w_m x_m / |x_m|); for two tensors of equal norm with equal
  weights that is the two-model SLERP midpoint, for unequal weights it is not SLERP at t.

Every method takes state dicts (any mapping of name -> tensor: ``module.state_dict()``, a loaded
checkpoint, or a lazily read safetensors file, since tensors are read one key at a time) and returns a
new dict with the same keys, shapes and dtypes. Floating-point tensors are combined in float32 (float64
stays float64) and cast back to the reference input's dtype; other tensors (integer buffers, step
counters) are copied from the reference input, since averaging them has no meaning.

WSM (arXiv 2507.17634, Theorem 3.1): merging checkpoints theta_0..theta_k with coefficients c_j equals
re-applying the recorded updates u_i = theta_{i-1} - theta_i scaled by w_i = sum_{j>=i} c_j, so a decay
curve w (non-increasing, in [0, 1]) maps to c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k. Shapes are
sampled at x_i = i / (k + 1), which makes linear decay the plain mean.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from zoo.registry import Registry

StateDict = Mapping[str, Tensor]

DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "ema")
MERGE_METHODS = Registry("merge method")
_TOLERANCE = 1e-12


class MergeError(ValueError):
    """State dicts that cannot be merged (different keys or shapes), or invalid merge weights."""


# --------------------------------------------------------------------------- state-dict plumbing


def check_compatible(state_dicts: Sequence[StateDict]) -> list[str]:
    """The common keys, in the first input's order, after checking every input has the same keys and shapes."""
    if not state_dicts:
        raise MergeError("nothing to merge: no state dicts given")
    first = state_dicts[0]
    keys = list(first.keys())
    for index, other in enumerate(state_dicts[1:], start=1):
        missing, extra = set(keys) - set(other.keys()), set(other.keys()) - set(keys)
        if missing or extra:
            raise MergeError(f"state dict {index} does not match state dict 0: missing keys "
                             f"{sorted(missing)[:5]}, unexpected keys {sorted(extra)[:5]}")
        for key in keys:
            a, b = first[key], other[key]
            if a.shape != b.shape:
                raise MergeError(f"key '{key}': shape {tuple(b.shape)} in state dict {index} "
                                 f"but {tuple(a.shape)} in state dict 0")
            if a.is_floating_point() != b.is_floating_point():
                raise MergeError(f"key '{key}': {b.dtype} in state dict {index} but {a.dtype} in state dict 0")
    return keys


def merge_state_dicts(state_dicts: Sequence[StateDict], combine: Callable[[list[Tensor]], Tensor],
                      reference: int = 0) -> dict[str, Tensor]:
    """Apply ``combine`` (a function of the inputs' tensors, in float32) key by key.

    The result takes each key's dtype and device from ``state_dicts[reference]``; non-float tensors are
    copied from it.
    """
    keys = check_compatible(state_dicts)
    ref = state_dicts[reference]
    merged = {}
    for key in keys:
        target = ref[key]
        if not target.is_floating_point():
            merged[key] = target.detach().clone()
            continue
        work = torch.float64 if target.dtype == torch.float64 else torch.float32
        tensors = [sd[key].detach().to(device=target.device, dtype=work) for sd in state_dicts]
        merged[key] = combine(tensors).to(target.dtype)
    return merged


def _weights(weights: Sequence[float] | None, count: int, normalize: bool, what: str) -> list[float]:
    values = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(values) != count:
        raise MergeError(f"{what}: {len(values)} weights for {count} state dicts")
    if any(not math.isfinite(w) for w in values):
        raise MergeError(f"{what}: weights must be finite, got {values}")
    if normalize:
        total = sum(values)
        if abs(total) < _TOLERANCE:
            raise MergeError(f"{what}: weights sum to zero and cannot be normalised: {values}")
        values = [w / total for w in values]
    return values


# --------------------------------------------------------------------------- tensor maths


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_m w_m t_m, accumulated in place (one extra tensor of memory)."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


def slerp_tensors(first: Tensor, second: Tensor, t: float, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> Tensor:
    """MergeKit's SLERP: sin((1-t)O)/sin(O) a + sin(tO)/sin(O) b with cos O the cosine of a and b; lerp when
    |cos O| > ``dot_threshold``. Norms are not rescaled: inputs of equal norm keep it."""
    a, b = first.flatten(), second.flatten()
    a_norm, b_norm = a.norm(), b.norm()
    unit_a = a / a_norm if a_norm > eps else a
    unit_b = b / b_norm if b_norm > eps else b
    dot = float((unit_a * unit_b).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * first + t * second
    omega = math.acos(dot)
    return (math.sin((1 - t) * omega) * first + math.sin(t * omega) * second) / math.sin(omega)


def multislerp_tensors(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None,
                       eps: float = 1e-8) -> Tensor:
    """MergeKit's Multi-SLERP of one tensor (``weights`` already normalised)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    shape = tensors[0].shape
    flat = torch.stack([t.flatten() for t in tensors])
    if base is not None:
        flat = flat - base.flatten()
    w = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        # Every input equal to the base (e.g. a tensor no sub-model trained) merges to itself.
        if len(tensors) != 2 and not bool((norms < eps).all()):
            raise MergeError("multislerp: the weighted mean of the unit directions is zero (antipodal inputs with "
                             "balancing weights); change the weights")
        result = (flat * w[:, None]).sum(0)
    else:
        mean = mean / mean_norm
        tangents = units - (units @ mean)[:, None] * mean
        tangent = (tangents * w[:, None]).sum(0)
        angle = tangent.norm() + eps
        result = (mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)) * (norms[:, 0] * w).sum()
    if base is not None:
        result = result + base.flatten()
    return result.view(shape)


# --------------------------------------------------------------------------- merge methods


@MERGE_METHODS.register("linear")
def linear(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None, normalize: bool = True,
           reference: int = 0) -> dict[str, Tensor]:
    """sum_m w_m theta_m; equal weights by default (the plain mean)."""
    w = _weights(weights, len(state_dicts), normalize, "linear merge")
    return merge_state_dicts(state_dicts, lambda ts: weighted_sum(ts, w), reference)


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic(base: StateDict, state_dicts: Sequence[StateDict],
                    weights: float | Sequence[float] = 1.0) -> dict[str, Tensor]:
    """theta_0 + sum_m lambda_m (theta_m - theta_0); one float scales every task vector alike. Unnormalised,
    so it also serves affine merges (with weights on the simplex it equals the linear merge)."""
    scales = [float(weights)] * len(state_dicts) if isinstance(weights, (int, float)) else weights
    scales = _weights(scales, len(state_dicts), False, "task arithmetic")

    def combine(tensors: list[Tensor]) -> Tensor:
        origin, models = tensors[0], tensors[1:]
        return origin + weighted_sum([m - origin for m in models], scales) if models else origin

    return merge_state_dicts([base, *state_dicts], combine, reference=0)


@MERGE_METHODS.register("slerp")
def slerp(first: StateDict, second: StateDict, t: float) -> dict[str, Tensor]:
    """Two-model SLERP, tensor by tensor: t = 0 gives ``first``, t = 1 gives ``second``."""
    if not 0.0 <= t <= 1.0:
        raise MergeError(f"slerp: t must lie in [0, 1], got {t}")
    return merge_state_dicts([first, second], lambda ts: slerp_tensors(ts[0], ts[1], t))


@MERGE_METHODS.register("multislerp")
def multislerp(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None,
               base: StateDict | None = None, normalize: bool = True, eps: float = 1e-8,
               reference: int = 0) -> dict[str, Tensor]:
    """MergeKit's Multi-SLERP, tensor by tensor; with ``base`` it interpolates the task vectors theta_m - base."""
    w = _weights(weights, len(state_dicts), normalize, "multislerp")
    inputs = list(state_dicts) if base is None else [*state_dicts, base]

    def combine(tensors: list[Tensor]) -> Tensor:
        if base is None:
            return multislerp_tensors(tensors, w, eps=eps)
        return multislerp_tensors(tensors[:-1], w, base=tensors[-1], eps=eps)

    return merge_state_dicts(inputs, combine, reference)


def merge(method: str, *args, **kwargs) -> dict[str, Tensor]:
    """Any merge method by name (``linear``, ``task_arithmetic``, ``slerp``, ``multislerp``)."""
    return MERGE_METHODS.lookup(method)(*args, **kwargs)


# --------------------------------------------------------------------------- WSM: decay shape <-> merge weights


def decay_weights(shape: str, k: int, ema_alpha: float = 0.3) -> Tensor:
    """w_1..w_k: the LR multiplier each of the k updates in a window of k + 1 checkpoints is re-applied with."""
    if k < 0:
        raise MergeError(f"a window of {k + 1} checkpoints is empty")
    x = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
    if shape == "linear":
        return 1 - x
    if shape == "cosine":
        return (1 + torch.cos(math.pi * x)) / 2
    if shape == "1-sqrt":
        return 1 - x.sqrt()
    if shape == "ema":
        if not 0.0 < ema_alpha <= 1.0:
            raise MergeError(f"ema_alpha must lie in (0, 1], got {ema_alpha}")
        exponent = torch.arange(k, 0, -1, dtype=torch.float64)    # k - i + 1 for i = 1..k
        return 1 - (1 - ema_alpha) ** exponent
    raise MergeError(f"unknown decay shape '{shape}'; choose one of {', '.join(DECAY_SHAPES)}")


def coefficients_from_decay(w: Sequence[float] | Tensor) -> Tensor:
    """Theorem 3.1: the merge coefficients c_0..c_k of a non-increasing decay curve w_1..w_k in [0, 1]."""
    w = torch.as_tensor(w, dtype=torch.float64).flatten()
    if len(w) and (w.min() < -_TOLERANCE or w.max() > 1 + _TOLERANCE):
        raise MergeError(f"decay weights must lie in [0, 1], got {w.tolist()}")
    if len(w) > 1 and (w[1:] - w[:-1]).max() > _TOLERANCE:
        step = int((w[1:] - w[:-1]).argmax()) + 1
        raise MergeError(f"decay weights must be non-increasing: w_{step + 1} = {w[step].item()} > "
                         f"w_{step} = {w[step - 1].item()}")
    padded = torch.cat([torch.ones(1, dtype=torch.float64), w, torch.zeros(1, dtype=torch.float64)])
    return padded[:-1] - padded[1:]


def decay_from_coefficients(c: Sequence[float] | Tensor) -> Tensor:
    """The inverse map: w_i = sum_{j >= i} c_j for i = 1..k."""
    c = torch.as_tensor(c, dtype=torch.float64).flatten()
    return c.flip(0).cumsum(0).flip(0)[1:]


def wsm_coefficients(shape: str, n: int, ema_alpha: float = 0.3) -> Tensor:
    """Merge coefficients (oldest checkpoint first) that emulate ``shape`` decay over a window of n checkpoints."""
    return coefficients_from_decay(decay_weights(shape, n - 1, ema_alpha))
