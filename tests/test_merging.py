"""Model merging block: linear, task arithmetic, SLERP, MergeKit's Multi-SLERP, and WSM's decay-shape weights."""
import math

import pytest
import torch

from zoo.blocks.merging import (
    DECAY_SHAPES,
    MERGE_METHODS,
    MergeError,
    coefficients_from_decay,
    decay_from_coefficients,
    decay_weights,
    linear,
    merge,
    multislerp,
    slerp,
    task_arithmetic,
    wsm_coefficients,
)


def model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 3, generator=g) * scale, "layer.bias": torch.randn(3, generator=g) * scale,
            "norm.running_mean": torch.randn(3, generator=g), "norm.num_batches_tracked": torch.tensor(seed),
            "position_ids": torch.arange(5) + seed}


def assert_state_equal(a, b, **tol):
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tol)


# -- linear and task arithmetic --------------------------------------------------------------------------
def test_merging_one_model_is_the_identity_bitwise():
    one = model(0)
    for merged in (linear([one]), multislerp([one]), merge("linear", [one], weights=[3.0]),
                   slerp(one, model(1), 0.0), task_arithmetic(one, [model(1)], 0.0)):
        assert_state_equal(merged, one, atol=0, rtol=0)


def test_equal_weight_linear_merge_is_the_plain_mean():
    models = [model(s) for s in range(4)]
    merged = linear(models)
    for key in ("layer.weight", "layer.bias", "norm.running_mean"):
        torch.testing.assert_close(merged[key], torch.stack([m[key] for m in models]).mean(0), atol=1e-6, rtol=0)
    # Integer buffers and counters are copied from the reference model, never averaged.
    assert torch.equal(merged["position_ids"], models[0]["position_ids"])
    assert torch.equal(linear(models, reference=-1)["norm.num_batches_tracked"], torch.tensor(3))


def test_linear_one_hot_weights_return_that_model_exactly_and_merge_is_affine():
    models = [model(s) for s in range(3)]
    assert_state_equal(linear(models, [0.0, 1.0, 0.0], reference=1), models[1], atol=0, rtol=0)
    a, b = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]
    mix = [0.25 * x + 0.75 * y for x, y in zip(a, b)]
    left = linear(models, mix)["layer.weight"]
    right = 0.25 * linear(models, a)["layer.weight"] + 0.75 * linear(models, b)["layer.weight"]
    torch.testing.assert_close(left, right, atol=1e-6, rtol=0)
    # Weights are normalised by default: scaling them changes nothing.
    torch.testing.assert_close(linear(models, [2.0, 5.0, 3.0])["layer.weight"], linear(models, a)["layer.weight"])


def test_task_arithmetic_scale_zero_is_the_base_and_inverse_count_is_the_mean():
    base, tuned = model(10), [model(s) for s in range(3)]
    assert_state_equal(task_arithmetic(base, tuned, 0.0), base, atol=0, rtol=0)
    mean = linear(tuned)
    through_base = task_arithmetic(base, tuned, 1 / 3)
    for key in ("layer.weight", "layer.bias"):
        torch.testing.assert_close(through_base[key], mean[key], atol=1e-6, rtol=0)
    # Per-model scales: theta_0 + sum lambda_m (theta_m - theta_0), integer tensors from the base.
    merged = task_arithmetic(base, tuned, [0.5, -1.0, 2.0])
    expected = base["layer.weight"] + sum(s * (m["layer.weight"] - base["layer.weight"])
                                          for s, m in zip([0.5, -1.0, 2.0], tuned))
    torch.testing.assert_close(merged["layer.weight"], expected, atol=1e-5, rtol=0)
    assert torch.equal(merged["position_ids"], base["position_ids"])


def test_low_precision_inputs_merge_in_float32_and_keep_their_dtype():
    models = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model(s).items()}
              for s in range(3)]
    merged = linear(models)
    assert merged["layer.weight"].dtype == torch.bfloat16 and merged["position_ids"].dtype == torch.int64
    exact = torch.stack([m["layer.weight"].float() for m in models]).mean(0)
    torch.testing.assert_close(merged["layer.weight"], exact.to(torch.bfloat16), atol=0, rtol=0)


def test_mismatched_state_dicts_name_the_key():
    a, b = model(0), model(1)
    b["layer.weight"] = torch.zeros(4, 4)
    with pytest.raises(MergeError, match="key 'layer.weight': shape \\(4, 4\\) in state dict 1"):
        linear([a, b])
    c = model(2)
    del c["layer.bias"]
    c["extra"] = torch.zeros(1)
    with pytest.raises(MergeError, match=r"missing keys \['layer.bias'\], unexpected keys \['extra'\]"):
        linear([a, c])
    with pytest.raises(MergeError, match="2 weights for 3 state dicts"):
        linear([a, a, a], [0.5, 0.5])
    with pytest.raises(MergeError, match="sum to zero"):
        linear([a, a], [1.0, -1.0])
    with pytest.raises(KeyError, match="unknown merge method 'ties'; registered: linear, multislerp"):
        merge("ties", [a])


def test_chunk_wise_merge_equals_full_merge():
    """FSDP shard-local merging: merging each slice of every tensor and concatenating equals merging whole tensors."""
    models = [model(s) for s in range(4)]
    c = wsm_coefficients("1-sqrt", 4).tolist()
    full = linear(models, c, normalize=False)["layer.weight"]
    shards = [linear([{"w": m["layer.weight"].flatten()[i:i + 5]} for m in models], c, normalize=False)["w"]
              for i in range(0, 12, 5)]
    torch.testing.assert_close(torch.cat(shards).view(4, 3), full, atol=1e-7, rtol=0)
    assert set(MERGE_METHODS) == {"linear", "task_arithmetic", "slerp", "multislerp"}


# -- SLERP and Multi-SLERP -------------------------------------------------------------------------------
def unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle), 0.0])


def angle_between(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.acos(min(1.0, max(-1.0, float((a @ b) / (a.norm() * b.norm())))))


def test_slerp_keeps_unit_norm_and_moves_t_of_the_angle():
    a, b = unit(0.0), unit(1.2)
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):
        r = slerp({"w": a}, {"w": b}, t)["w"]
        assert abs(float(r.norm()) - 1) < 1e-6
        assert abs(angle_between(a, r) - t * 1.2) < 1e-5
    near = unit(1e-3)     # nearly parallel: MergeKit's lerp fallback
    torch.testing.assert_close(slerp({"w": a}, {"w": near}, 0.4)["w"], 0.6 * a + 0.4 * near)
    with pytest.raises(MergeError, match="t must lie in"):
        slerp({"w": a}, {"w": b}, 1.5)


def test_multislerp_of_two_models_matches_the_two_model_slerp():
    # Equal weights and equal norms: Multi-SLERP is the SLERP midpoint, whatever the angle.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    b = b / b.norm() * a.norm()
    torch.testing.assert_close(multislerp([{"w": a}, {"w": b}])["w"], slerp({"w": a}, {"w": b}, 0.5)["w"],
                               atol=1e-5, rtol=1e-5)
    # Orthogonal unit vectors: the normalised bisector, unlike the linear mean (norm 1/sqrt 2).
    r = multislerp([{"w": unit(0.0)}, {"w": unit(math.pi / 2)}])["w"]
    torch.testing.assert_close(r, unit(math.pi / 4), atol=1e-6, rtol=0)
    assert abs(float(linear([{"w": unit(0.0)}, {"w": unit(math.pi / 2)}])["w"].norm()) - 2 ** -0.5) < 1e-6


def test_multislerp_is_mergekits_closed_form_and_preserves_the_weighted_norm():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(7, 3, generator=g) * s for s in (0.5, 1.0, 3.0)]
    weights = [0.2, 0.3, 0.5]
    merged = multislerp([{"w": x} for x in xs], weights)["w"]
    directions = sum(w * x / x.norm() for w, x in zip(weights, xs))
    target_norm = sum(w * x.norm() for w, x in zip(weights, xs))
    torch.testing.assert_close(merged, target_norm * directions / directions.norm(), atol=1e-5, rtol=1e-5)
    assert abs(float(merged.norm() - target_norm)) < 1e-5
    # Unequal weights are not SLERP at t: the angle from the first input is not t * Omega.
    a, b = unit(0.0), unit(1.2)
    r = multislerp([{"w": a}, {"w": b}], [0.3, 0.7])["w"]
    assert abs(angle_between(a, r) - 0.7 * 1.2) > 1e-2
    # Weights are normalised; permuting inputs with their weights changes nothing; identical inputs stay.
    torch.testing.assert_close(multislerp([{"w": x} for x in xs], [2, 3, 5])["w"], merged)
    torch.testing.assert_close(multislerp([{"w": x} for x in xs[::-1]], weights[::-1])["w"], merged, atol=1e-6, rtol=0)
    torch.testing.assert_close(multislerp([{"w": xs[0]}] * 3)["w"], xs[0], atol=1e-6, rtol=1e-6)


def test_multislerp_base_mode_antipodal_fallback_and_error():
    base, models = model(5), [model(s) for s in range(3)]
    merged = multislerp(models, [0.5, 0.25, 0.25], base=base)
    deltas = [{k: m[k] - base[k] for k in ("layer.weight", "layer.bias")} for m in models]
    separately = multislerp(deltas, [0.5, 0.25, 0.25])
    for key in separately:
        torch.testing.assert_close(merged[key], base[key] + separately[key], atol=1e-6, rtol=0)
    assert torch.equal(merged["position_ids"], models[0]["position_ids"])
    a = unit(0.3)
    result = multislerp([{"w": a}, {"w": -a}])["w"]
    assert torch.isfinite(result).all() and float(result.abs().max()) < 1e-6
    with pytest.raises(MergeError, match="weighted mean of the unit directions is zero"):
        multislerp([{"w": unit(0.0)}, {"w": unit(2 * math.pi / 3)}, {"w": unit(4 * math.pi / 3)}])



def test_multislerp_of_tensors_no_model_changed_returns_them():
    zeros = [{"bias": torch.zeros(4)} for _ in range(3)]
    assert torch.equal(multislerp(zeros)["bias"], torch.zeros(4))
    base = {"w": torch.arange(4.0)}
    same = [{"w": torch.arange(4.0)} for _ in range(3)]
    assert torch.equal(multislerp(same, base=base)["w"], base["w"])

# -- WSM: decay shapes and merge coefficients ------------------------------------------------------------
def test_linear_decay_weights_give_the_plain_mean_of_the_checkpoints():
    for n in range(1, 12):
        torch.testing.assert_close(wsm_coefficients("linear", n), torch.full((n,), 1 / n, dtype=torch.float64),
                                   atol=1e-15, rtol=0)
    checkpoints = [model(s) for s in range(5)]
    merged = linear(checkpoints, wsm_coefficients("linear", 5).tolist(), normalize=False, reference=-1)
    torch.testing.assert_close(merged["layer.weight"], torch.stack([c["layer.weight"] for c in checkpoints]).mean(0),
                               atol=1e-6, rtol=0)
    assert torch.equal(merged["position_ids"], checkpoints[-1]["position_ids"])


def test_each_shape_matches_hand_computed_weights():
    # k = 3 updates, x = 1/4, 2/4, 3/4.
    s = math.sqrt
    cos_w = [(1 + s(2) / 2) / 2, 0.5, (1 - s(2) / 2) / 2]
    expected = {
        "cosine": [1 - cos_w[0], cos_w[0] - cos_w[1], cos_w[1] - cos_w[2], cos_w[2]],
        "1-sqrt": [s(0.25), s(0.5) - s(0.25), s(0.75) - s(0.5), 1 - s(0.75)],
        "linear": [0.25] * 4,
    }
    for shape, c in expected.items():
        torch.testing.assert_close(wsm_coefficients(shape, 4), torch.tensor(c, dtype=torch.float64), atol=1e-12, rtol=0)
    # EMA m <- (1-a) m + a theta_j from m = theta_0: c_0 = (1-a)^k, c_j = a (1-a)^(k-j).
    a = 0.3
    torch.testing.assert_close(wsm_coefficients("ema", 4, ema_alpha=a),
                               torch.tensor([0.7 ** 3, a * 0.7 ** 2, a * 0.7, a], dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(wsm_coefficients("1-sqrt", 1), torch.tensor([1.0], dtype=torch.float64))


def test_every_shape_gives_valid_coefficients_with_its_signature():
    for k in range(1, 33):
        for shape in DECAY_SHAPES:
            c = wsm_coefficients(shape, k + 1)
            assert (c >= -1e-15).all() and abs(float(c.sum()) - 1) < 1e-12, (shape, k)
        cos = wsm_coefficients("cosine", k + 1)
        torch.testing.assert_close(cos, cos.flip(0), atol=1e-12, rtol=0)            # symmetric
        sqrt = wsm_coefficients("1-sqrt", k + 1)
        assert (sqrt[1:] <= sqrt[:-1] + 1e-15).all()                                # the oldest weighs most
        ema = wsm_coefficients("ema", k + 1)
        assert (ema[2:] >= ema[1:-1] - 1e-15).all()                                 # late decay
    with pytest.raises(MergeError, match="unknown decay shape 'inverse_sqrt'"):
        decay_weights("inverse_sqrt", 3)


def test_decay_and_coefficients_round_trip_and_bad_curves_are_refused():
    g = torch.Generator().manual_seed(0)
    for k in range(1, 33):
        w = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
        torch.testing.assert_close(decay_from_coefficients(coefficients_from_decay(w)), w, atol=1e-12, rtol=0)
    with pytest.raises(MergeError, match="non-increasing: w_3 = 0.6 > w_2 = 0.5"):
        coefficients_from_decay([0.9, 0.5, 0.6])
    with pytest.raises(MergeError, match=r"must lie in \[0, 1\]"):
        coefficients_from_decay([1.2, 0.5])


def test_merge_is_the_trajectory_with_decayed_updates():
    """sum_j c_j theta_j == theta_0 - sum_i w_i u_i for theta_j = theta_{j-1} - u_j."""
    g = torch.Generator().manual_seed(3)
    updates = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(7)]
    thetas = [torch.randn(6, generator=g, dtype=torch.float64)]
    for u in updates:
        thetas.append(thetas[-1] - u)
    for shape in DECAY_SHAPES:
        c = wsm_coefficients(shape, 8)
        w = decay_from_coefficients(c)
        merged = linear([{"p": t} for t in thetas], c.tolist(), normalize=False)["p"]
        torch.testing.assert_close(merged, thetas[0] - sum(wi * u for wi, u in zip(w, updates)), atol=1e-12, rtol=0)


def test_merge_of_a_constant_lr_sgd_run_equals_the_decayed_run_on_a_linear_loss():
    """With a constant gradient, plain SGD at LR eta * w_i on step i lands exactly on the WSM merge."""
    a = torch.tensor([0.5, -1.0, 2.0])
    start = torch.tensor([1.0, 2.0, 3.0])
    eta, k = 0.1, 6

    def run(multipliers):
        theta = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.SGD([theta], lr=eta)
        path = [theta.detach().clone()]
        for m in multipliers:
            optimizer.param_groups[0]["lr"] = eta * m
            optimizer.zero_grad()
            (a @ theta).backward()
            optimizer.step()
            path.append(theta.detach().clone())
        return path

    snapshots = run([1.0] * k)
    for shape in DECAY_SHAPES:
        c = wsm_coefficients(shape, k + 1)
        merged = linear([{"p": s} for s in snapshots], c.tolist(), normalize=False)["p"]
        decayed = run(decay_from_coefficients(c).tolist())[-1]
        torch.testing.assert_close(merged, decayed, atol=1e-6, rtol=0)
