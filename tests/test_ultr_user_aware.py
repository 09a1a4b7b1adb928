"""User-aware ULTR: the estimators' statistical properties on simulated clicks, loss linearity, the
simulated-session datamodule and the module end to end."""
import logging
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from scipy import stats

from datamodules.ltr import ClickLTRDataModule
from zoo.blocks.clicks import (
    ETA,
    UserPBMSimulator,
    click_weights,
    estimate_relevance,
    examination,
    session_propensity,
)
from zoo.blocks.ltr import listwise_softmax_loss
from zoo.ultr_user_aware.module import UserAwareULTRModule

THETA = examination(ETA[10])
GRADES = torch.tensor([4, 0, 2, 1, 3, 4, 0, 1, 2, 3])
GAMMA = 0.1 + 0.9 * GRADES.double() / 4
REPLICATES = 10_000


def replicate_estimates(users: torch.Tensor, queries: torch.Tensor, n_queries: int, methods: tuple[str, ...],
                        seed: int, theta: torch.Tensor = THETA, gamma: torch.Tensor = GAMMA,
                        replicates: int = REPLICATES) -> dict[str, torch.Tensor]:
    """Estimated labels [R, n_queries, K] per method over R independent click replicates of one fixed
    session table (users, queries); each replicate's queries are distinct query ids to the estimators."""
    g = torch.Generator().manual_seed(seed)
    sim = UserPBMSimulator(theta)
    out = {m: [] for m in methods}
    chunk = 2000
    for start in range(0, replicates, chunk):
        r = min(chunk, replicates - start)
        user = users.repeat(r)
        query = (queries[None, :] + n_queries * torch.arange(r)[:, None]).reshape(-1)
        clicks = sim.simulate(gamma.expand(len(user), -1), user, g)
        for m in methods:
            labels, _ = estimate_relevance(clicks, query, user, theta, r * n_queries, m)
            out[m].append(labels.view(r, n_queries, -1))
    return {m: torch.cat(v) for m, v in out.items()}


def within_two_se(samples: torch.Tensor, truth: torch.Tensor) -> bool:
    """The replicate mean matches the truth: pooled over positions within 2 standard errors, and at
    every position within 2 standard errors Bonferroni-widened for the K positions (family-wise 5%,
    about 2.8 SE for K = 10), so a correct estimator fails this by chance at most 1 time in 10."""
    se = samples.std(0) / samples.shape[0] ** 0.5
    k = samples.shape[1]
    per_position = stats.norm.ppf(1 - 0.05 / (2 * k))
    pooled = samples.mean(1)
    pooled_ok = abs(float(pooled.mean() - truth.mean())) <= 2 * float(pooled.std()) / samples.shape[0] ** 0.5
    # 1e-12 for positions that never vary (position 1 with γ = 1 is always clicked).
    return pooled_ok and bool(((samples.mean(0) - truth).abs() <= per_position * se + 1e-12).all())


def test_user_aware_and_straightforward_are_unbiased_and_naive_is_biased_low():
    # One query, a fixed mix of four users with different examination curves, 200 sessions.
    users = torch.tensor([0, 3, 6, 9]).repeat_interleave(torch.tensor([80, 60, 40, 20]))
    est = replicate_estimates(users, torch.zeros(200, dtype=torch.long), 1,
                              ("user_aware", "straightforward", "naive"), seed=0)
    assert within_two_se(est["user_aware"][:, 0], GAMMA)
    assert within_two_se(est["straightforward"][:, 0], GAMMA)
    theta_q = THETA[users].mean(0)
    assert within_two_se(est["naive"][:, 0], GAMMA * theta_q)
    assert bool((est["naive"][:, 0].mean(0)[1:] < 0.8 * GAMMA[1:]).all())   # clearly biased low past position 1


def test_ips_pbm_is_biased_under_confounding_and_user_aware_is_not():
    # Query A issued only by user 0 (η = 2.5), query B only by user 9 (η = 0), equal activity.
    users = torch.tensor([0] * 100 + [9] * 100)
    queries = torch.tensor([0] * 100 + [1] * 100)
    est = replicate_estimates(users, queries, 2, ("ips_pbm", "user_aware"), seed=1)
    theta_bar = 0.5 * (THETA[0] + THETA[9])
    for q, u in ((0, 0), (1, 9)):
        factor = THETA[u] / theta_bar
        assert within_two_se(est["ips_pbm"][:, q], GAMMA * factor)
        assert within_two_se(est["user_aware"][:, q], GAMMA)
    assert float((est["ips_pbm"][:, 0].mean(0) / GAMMA)[-1]) < 0.1   # query A's deep labels nearly vanish


def test_user_aware_is_exactly_unbiased_given_the_user_sequence():
    g = torch.Generator().manual_seed(2)
    users = torch.randint(0, 10, (137,), generator=g)
    query = torch.zeros(137, dtype=torch.long)
    gamma = torch.rand(10, generator=g, dtype=torch.float64) * 0.9 + 0.1
    theta_hat = session_propensity("user_aware", query, users, THETA, 1)[0]
    expected_ctr = (THETA[users] * gamma).mean(0)      # analytic E[ĉ_{q,k} | users]
    assert (expected_ctr / theta_hat - gamma).abs().max() < 1e-12


def analytic_variances(theta_s: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Var[UA | users] and Var[SF | users] per position, from the spec's derivation."""
    n = theta_s.shape[0]
    var_ua = (gamma * theta_s.sum(0) - gamma ** 2 * (theta_s ** 2).sum(0)) / theta_s.sum(0) ** 2
    var_sf = (gamma * (1 / theta_s).sum(0) - n * gamma ** 2) / n ** 2
    return var_ua, var_sf


def test_user_aware_variance_is_below_the_per_user_estimators():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        users = torch.randint(0, 10, (int(torch.randint(2, 300, (1,), generator=g)),), generator=g)
        gamma = float(torch.rand(1, generator=g)) * 0.999 + 0.001
        var_ua, var_sf = analytic_variances(THETA[users], gamma)
        assert bool((var_ua <= var_sf + 1e-15).all())
    same = THETA[torch.full((50,), 4)]
    var_ua, var_sf = analytic_variances(same, 0.7)
    assert (var_ua - var_sf).abs().max() < 1e-12

    # Empirically, over 10,000 replicates of one user mix: Var[UA] < Var[SF] (one-sided F test at 1%)
    # at every position past the first, and both agree with the analytic values.
    users = torch.tensor([0, 3, 6, 9]).repeat_interleave(torch.tensor([80, 60, 40, 20]))
    est = replicate_estimates(users, torch.zeros(200, dtype=torch.long), 1, ("user_aware", "straightforward"),
                              seed=4, gamma=torch.full((10,), 0.6, dtype=torch.float64))
    emp_ua, emp_sf = est["user_aware"][:, 0].var(0), est["straightforward"][:, 0].var(0)
    critical = stats.f.ppf(0.99, REPLICATES - 1, REPLICATES - 1)
    assert bool((emp_ua[1:] / emp_sf[1:] < 1 / critical).all())
    var_ua, var_sf = analytic_variances(THETA[users], 0.6)
    torch.testing.assert_close(emp_ua[1:], var_ua[1:], rtol=0.08, atol=0)
    torch.testing.assert_close(emp_sf[1:], var_sf[1:], rtol=0.08, atol=0)


def test_estimators_coincide_when_users_share_one_curve():
    g = torch.Generator().manual_seed(5)
    theta = examination([1.2] * 10)
    users = torch.randint(0, 10, (3000,), generator=g)
    query = torch.randint(0, 7, (3000,), generator=g)
    clicks = UserPBMSimulator(theta).simulate(GAMMA.expand(3000, -1), users, g)
    labels = {m: estimate_relevance(clicks, query, users, theta, 7, m)[0]
              for m in ("naive", "ips_pbm", "straightforward", "user_aware")}
    for m in ("ips_pbm", "straightforward", "user_aware"):
        assert (labels[m] - labels["naive"] / theta[0]).abs().max() < 1e-12


def test_smoothing_shrinks_user_mix_toward_the_global_one():
    users = torch.tensor([0] * 10 + [9] * 990)
    query = torch.tensor([0] * 10 + [1] * 990)
    exact = session_propensity("user_aware", query, users, THETA, 2)
    smoothed = session_propensity("user_aware", query, users, THETA, 2, smoothing=1e9)
    global_ = session_propensity("ips_pbm", query, users, THETA, 2)
    torch.testing.assert_close(exact[0], THETA[0])
    torch.testing.assert_close(smoothed, global_, rtol=1e-6, atol=1e-9)


def test_label_loss_equals_the_ips_weighted_per_click_loss():
    g = torch.Generator().manual_seed(6)
    n_sessions, n_queries = 400, 3
    users = torch.randint(0, 10, (n_sessions,), generator=g)
    query = torch.randint(0, n_queries, (n_sessions,), generator=g)
    clicks = UserPBMSimulator(THETA).simulate(GAMMA.expand(n_sessions, -1), users, g)
    scores = torch.randn(n_queries, 10, generator=g, dtype=torch.float64)
    mask = torch.ones(n_queries, 10, dtype=torch.bool)
    labels, _ = estimate_relevance(clicks, query, users, THETA, n_queries, "user_aware")
    weights = click_weights(clicks, query, users, THETA, n_queries, "user_aware")
    by_labels = listwise_softmax_loss(scores, labels, mask, eps=0.0)
    by_clicks = listwise_softmax_loss(scores[query], weights, mask[query], eps=0.0)
    assert abs(float(by_labels) - float(by_clicks)) < 1e-6
    # With the reference's ε = 1e-7 the two still agree after normalisation.
    assert abs(float(listwise_softmax_loss(scores, labels, mask)) - float(by_clicks)) < 1e-5


# -- datamodule and module ---------------------------------------------------------------------------
def quiet_trainer(**overrides) -> L.Trainer:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = {"max_steps": 300, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "check_val_every_n_epoch": 2,
            "num_sanity_val_steps": 0}
    return L.Trainer(**{**args, **overrides})


@pytest.fixture(scope="module")
def demo() -> ClickLTRDataModule:
    dm = ClickLTRDataModule(split=[0.6667, 0.1667, 0.1666])
    dm.setup("fit")
    return dm


def test_datamodule_logs_top_k_of_the_logging_ranker(demo):
    log = demo.click_log
    assert log.shown.shape == (200, 10) and len(log.query) == 20_000
    weights_scores = demo.logger_scores
    for i, q in enumerate(demo.splits["train"][:5]):
        rows = demo.data.rows(q)
        top = np.argsort(-weights_scores[rows], kind="stable")[:10]
        assert log.shown[i].tolist() == top.tolist()
        item = demo.list_item(q, i)
        assert item["position"][top].tolist() == list(range(10)) and int((item["position"] >= 0).sum()) == 10
        torch.testing.assert_close(log.gamma[i], 0.1 + 0.9 * item["labels"][top].double() / 4)
    assert not set(demo.splits["train"]) & set(demo.splits["test"])


def train(dm: ClickLTRDataModule, estimator: str, steps: int = 150) -> UserAwareULTRModule:
    L.seed_everything(0, verbose=False)
    module = UserAwareULTRModule(n_features=16, estimator=estimator, optimizer={"name": "Adagrad", "lr": 0.05})
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return module


def test_embedded_demo_user_aware_beats_ips_labels_and_naive_ranking(demo):
    ua, ips, naive = (train(demo, e) for e in ("user_aware", "ips_pbm", "naive"))
    assert ua.label_mae < ips.label_mae < naive.label_mae
    assert ua.test_metrics["test/ndcg@5"] >= naive.test_metrics["test/ndcg@5"]
    # keep_best restores the best validated weights before testing
    assert "val/best_ndcg@5" in ua.test_metrics


def test_click_level_training_uses_weights_that_sum_to_the_labels(demo):
    module = UserAwareULTRModule(n_features=16)
    module.trainer = quiet_trainer()
    module.trainer.datamodule = demo   # what Lightning wires before setup
    module.setup("fit")
    log = demo.click_log
    summed = torch.zeros_like(module.position_labels).index_add_(0, log.query, module.click_level_weights)
    torch.testing.assert_close(summed, module.position_labels)
    sessions = ClickLTRDataModule(split=[0.6667, 0.1667, 0.1666], train_unit="sessions", sessions=2000)
    trained = train(sessions, "user_aware", steps=30)
    assert trained.test_metrics["test/ndcg@10"] > 0.5


def test_checkpoints_and_save_pretrained_roundtrip(tmp_path, demo):
    module = UserAwareULTRModule(n_features=16, scorer={"kind": "linear"})
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_steps=20, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, datamodule=demo)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert "ultr_best" in state
    folder = module.save_pretrained(tmp_path / "saved", metrics={"test/ndcg@10": 0.5})
    loaded = UserAwareULTRModule.from_pretrained(folder)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(loaded.score(x), module.eval().score(x))
    assert "ultr_user_aware" in (folder / "README.md").read_text()


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown estimator"):
        UserAwareULTRModule(estimator="dla")
    with pytest.raises(ValueError, match="no reference eta list"):
        ClickLTRDataModule(users=7)
    with pytest.raises(ValueError, match="noisy_linear"):
        ClickLTRDataModule(source="svmlight", path="x")
