"""Checks the estimators against exact gradients computed by enumerating every labelling of a toy problem."""

import itertools
import math

import numpy as np
import pytest
import torch

from joint_inference.methods.estimators import ESTIMATORS, batch_entropy, surrogate_loss

N = 3
SAMPLES = 200_000


def rewards_at(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """R(y)[s, n, k] = table[n, code of y_<n, k]: position n's reward depends on exactly the earlier labels."""
    k = table.shape[-1]
    place = labels * k ** torch.arange(labels.shape[-1])
    prefix_code = place.cumsum(-1) - place
    return table[torch.arange(labels.shape[-1]), prefix_code]


def exact_gradient(theta: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gradient of J = sum_y q(y) sum_n R(y)[n, y_n], summed over all K^N labellings."""
    theta = theta.clone().requires_grad_()
    k = theta.shape[-1]
    ys = torch.tensor(list(itertools.product(range(k), repeat=N)))
    log_q = theta.log_softmax(-1)[torch.arange(N), ys].sum(-1)
    total_reward = rewards_at(table, ys).gather(-1, ys.unsqueeze(-1)).sum((-1, -2))
    (grad,) = torch.autograd.grad((log_q.exp() * total_reward).sum(), theta)
    return grad


@pytest.fixture(scope="module", params=[2, 3], ids=lambda k: f"K={k}")
def problem(request):
    """One sequence's logits, a prefix-dependent log-prob-like reward table, samples and the exact gradient."""
    k = request.param
    gen = torch.Generator().manual_seed(k)
    theta = torch.randn(N, k, generator=gen, dtype=torch.float64)
    table = (2 * torch.randn(N, k ** (N - 1), k, generator=gen, dtype=torch.float64)).log_softmax(-1) / N
    labels = torch.multinomial(theta.softmax(-1), SAMPLES, replacement=True, generator=gen).T
    reward_argmax = rewards_at(table, theta.argmax(-1)).expand(SAMPLES, N, k)
    return theta, labels, rewards_at(table, labels), reward_argmax, exact_gradient(theta, table)


def per_sample_gradients(loss_fn, theta: torch.Tensor) -> torch.Tensor:
    """Each sample gets its own copy of the logits, so the gradient w.r.t. a copy is that sample's term (x S)."""
    logits = theta.expand(SAMPLES, *theta.shape).clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(logits), logits)
    return -grad * SAMPLES  # the loss is minus the objective, averaged over samples


def matches(grads: torch.Tensor, exact: torch.Tensor) -> bool:
    """Every coordinate of the sample mean lies within 5 standard errors of the exact gradient."""
    error = (grads.mean(0) - exact).abs()
    standard_error = grads.std(0) / math.sqrt(grads.shape[0])
    return bool((error < 5 * standard_error + 1e-9).all())


@pytest.mark.parametrize("baseline", [False, True], ids=["plain", "baseline"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_is_unbiased(problem, estimator, baseline):
    theta, labels, reward_sample, reward_argmax, exact = problem
    baseline_rewards = reward_argmax if baseline else None
    grads = per_sample_gradients(
        lambda logits: surrogate_loss(estimator, logits, labels, reward_sample, baseline_rewards), theta
    )
    assert matches(grads, exact)


def test_check_has_power_against_a_biased_estimator(problem):
    """Dropping rao_marginalized's first term ignores how earlier labels change later rewards: biased."""
    theta, labels, reward_sample, _, exact = problem

    def second_term_only(logits):
        log_p = logits.log_softmax(-1)
        return -((reward_sample * log_p.exp()).detach() * log_p).sum() / logits.shape[0]

    assert not matches(per_sample_gradients(second_term_only, theta), exact)


def test_rao_marginalized_has_lower_variance_than_naive(problem):
    theta, labels, reward_sample, reward_argmax, _ = problem

    def total_variance(estimator, baseline_rewards):
        loss = lambda logits: surrogate_loss(estimator, logits, labels, reward_sample, baseline_rewards)  # noqa: E731
        return per_sample_gradients(loss, theta).var(0).sum()

    assert total_variance("rao_marginalized", reward_argmax) < total_variance("naive", None)


def test_batch_entropy_matches_numpy():
    logits = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = np.exp(logits.numpy())
    probs /= probs.sum(-1, keepdims=True)
    p_mean = probs.reshape(-1, 6).mean(0)
    assert batch_entropy(logits).item() == pytest.approx(-(p_mean * np.log(p_mean)).sum(), rel=1e-10)


def test_batch_entropy_is_maximal_for_a_uniform_average():
    k = 4
    one_hots = 8.0 * torch.eye(k, dtype=torch.float64)[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    assert batch_entropy(one_hots.reshape(2, 2, k)).item() == pytest.approx(math.log(k), rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        assert batch_entropy(torch.randn(2, 3, k, generator=gen)).item() < math.log(k)


def test_batch_entropy_survives_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]], requires_grad=True)
    entropy = batch_entropy(logits)
    entropy.backward()
    assert entropy.item() == pytest.approx(math.log(2))
    assert torch.isfinite(logits.grad).all()


def valid_inputs(b=2, n=3, k=4):
    logits = torch.randn(b, n, k)
    return logits, torch.zeros(b, n, dtype=torch.long), torch.randn(b, n, k)


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(ValueError, match="rao_marginalized, rao, naive"):
        surrogate_loss("reinforce", *valid_inputs())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_example_sequences_are_rejected(estimator):
    with pytest.raises(ValueError, match="at least 2 examples"):
        surrogate_loss(estimator, *valid_inputs(n=1))


def test_mismatched_shapes_are_rejected():
    logits, labels, reward = valid_inputs()
    with pytest.raises(ValueError, match="logits must have shape"):
        surrogate_loss("rao", logits[0], labels, reward)
    with pytest.raises(ValueError, match="labels must have shape"):
        surrogate_loss("rao", logits, labels[:, :2], reward)
    with pytest.raises(ValueError, match="reward_sample must have"):
        surrogate_loss("rao", logits, labels, reward[..., :3])
    with pytest.raises(ValueError, match="reward_argmax must have"):
        surrogate_loss("rao", logits, labels, reward, reward[:1])
