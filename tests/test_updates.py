"""mpcl.prototypes.updates: the K-Means start from the feature bank (and the early start), the
EMA update of each bank mode ("init": from the batch; "queue": from the bank as the update
memory), checked against direct float64 computations."""

import copy

import pytest
import torch

from mpcl.prototypes import CentroidPrototypes, GaussianPrototypes, PrototypeLearning

KINDS = {"centroid": CentroidPrototypes, "gaussian": GaussianPrototypes}


def _module(kind="gaussian", num_classes=4, K=3, dim=8, slots=40, **kwargs):
    kwargs.setdefault("bank_max_per_step", slots)
    return PrototypeLearning(
        KINDS[kind],
        K=K,
        dim=dim,
        num_classes=num_classes,
        feature_bank_size=num_classes * slots,
        **kwargs,
    )


def _initialise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    protos = module.prototypes
    for c in range(module.num_classes):
        mean = torch.randn(module.K, module.dim, generator=gen, dtype=torch.float64) / 2
        var = 0.05 + 0.2 * torch.rand(module.K, module.dim, generator=gen, dtype=torch.float64)
        protos.initialize(c, mean, var)


def _batch(num_classes=4, dim=8, size=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, dim, size, size, generator=gen, dtype=dtype)
    labels = torch.randint(0, num_classes, (2, size, size), generator=gen)
    labels[:, 0] = 255
    return features, labels


def _reference_sinkhorn(sim: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """One class, plain matrix scaling in float64: columns to L / K, then rows to 1."""
    num_rows, K = sim.shape
    q = torch.exp((sim - sim.max()) / epsilon)  # a global shift cancels in the scaling
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True) * (num_rows / K)
        q = q / q.sum(1, keepdim=True)
    return q


def test_initialisation_uses_kmeans_of_the_bank():
    torch.manual_seed(0)
    module = _module("gaussian", num_classes=2, K=2, dim=4, normalize_features=False)
    module.train()
    centres = torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]])
    which = torch.arange(64) % 2
    x = centres[which] + 0.1 * torch.randn(64, 4)
    features = x.T.reshape(1, 4, 8, 8)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)  # all class 0; class 1 stays off
    module(features, labels)
    assert module.prototypes.initialized.tolist() == [True, False]
    found = module.prototypes.mean[0, :, 0].sort().values
    torch.testing.assert_close(found, torch.tensor([-5.0, 5.0]), atol=0.1, rtol=0)
    assert (module.prototypes.var[0] < 0.05).all()


def test_training_updates_prototypes_and_eval_does_not():
    torch.manual_seed(0)
    module = _module("centroid", dim=16, momentum=0.5).train()
    features, labels = _batch(dim=16, size=16)
    module(features, labels)
    before = module.prototypes.mean.clone()
    module.eval()(features, labels)
    assert torch.equal(module.prototypes.mean, before)
    module.train()(features, labels)
    assert not torch.equal(module.prototypes.mean, before)
    # Weight-0 pixels do not update: prototypes stay put.
    after = module.prototypes.mean.clone()
    module(features, labels, torch.zeros(labels.shape))
    assert torch.equal(module.prototypes.mean, after)


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_queue_update_matches_a_direct_computation(kind):
    torch.manual_seed(0)
    momentum = 0.5
    module = _module(kind, bank_mode="queue", momentum=momentum).double().train()
    _initialise(module)
    # Three steps of about 32 pixels per class fill the 40-feature class slots and wrap.
    for seed in range(3):
        module(*_batch(seed=seed, dtype=torch.float64))
    before = copy.deepcopy(module.prototypes)
    module(*_batch(seed=3, dtype=torch.float64))

    bank = module.feature_banks["lr"]
    assert (bank.count == 40).all()
    for c in range(module.num_classes):
        x = bank.get(c)  # (S, D) the queue of class c after this step's features
        if kind == "centroid":
            sim = -((x[:, None, :] - before.mean[c][None]) ** 2).sum(-1)
        else:
            var = before.var[c].clamp_min(before.var_floor)
            log_n = -0.5 * (
                ((x[:, None, :] - before.mean[c][None]) ** 2 / var[None]).sum(-1)
                + torch.log(var).sum(-1)[None]
                + module.dim * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
            )
            sim = log_n / module.dim
        q = _reference_sinkhorn(sim, module.epsilon, module.sinkhorn_iters)
        assign = q.argmax(1)
        for k in range(module.K):
            members = x[assign == k]
            expected_mean = before.mean[c, k]
            if len(members):
                expected_mean = momentum * before.mean[c, k] + (1 - momentum) * members.mean(0)
            torch.testing.assert_close(
                module.prototypes.mean[c, k], expected_mean, rtol=0, atol=1e-10
            )
            if kind == "gaussian" and len(members):
                batch_var = members.var(0, unbiased=False)
                expected_var = (momentum * before.var[c, k] + (1 - momentum) * batch_var).clamp_min(
                    before.var_floor
                )
                torch.testing.assert_close(
                    module.prototypes.var[c, k], expected_var, rtol=0, atol=1e-10
                )


def test_queue_holds_the_most_recent_features_of_each_class():
    module = _module(num_classes=2, dim=2, slots=40, bank_mode="queue").train()
    module.normalize_features = False  # stored rows stay (step, index): readable tags
    _initialise(module)
    for step in range(3):  # 16 pixels of class 0 per step, each feature tagged by its step
        features = torch.zeros(1, 2, 4, 4)
        features[0, 0] = step
        features[0, 1] = torch.arange(16.0).view(4, 4)
        module(features, torch.zeros(1, 4, 4, dtype=torch.long), None)
    held = {tuple(row.tolist()) for row in module.feature_banks["lr"].get(0)}
    assert len(held) == 40
    for step in (1, 2):  # the last two steps are kept in full ...
        assert {(float(step), float(i)) for i in range(16)} <= held
    assert sum(row[0] == 0 for row in held) == 8  # ... and 8 features of the first step
    assert module.feature_banks["lr"].count[1] == 0


def test_queue_size_sets_how_fast_the_prototypes_follow():
    """With alpha = 0 a prototype is the mean of its queue: a small queue forgets old features
    at once, a large one still averages them in."""

    def shift_after(slots):
        torch.manual_seed(0)
        module = _module(
            "centroid", num_classes=1, K=1, dim=2, slots=slots, bank_mode="queue", momentum=0.0
        )
        module.normalize_features = False
        _initialise(module.train())
        labels = torch.zeros(1, 4, 4, dtype=torch.long)
        for value in (1.0, 1.0, 1.0, -1.0):  # the features jump at the last step
            features = torch.zeros(1, 2, 4, 4)
            features[0, 0] = value
            module(features, labels)
        return float(module.prototypes.mean[0, 0, 0])

    assert shift_after(16) == pytest.approx(-1.0)  # only the newest 16 features
    assert shift_after(64) == pytest.approx(0.5)  # 48 old (+1) and 16 new (-1) features


def test_init_mode_stops_filling_and_updates_from_the_batch():
    torch.manual_seed(0)
    module = _module(momentum=0.5).train()
    for seed in range(2):
        module(*_batch(seed=seed))
    assert module.prototypes.initialized.all()
    counts = module.feature_banks["lr"].count.clone()
    module(*_batch(seed=5))
    assert torch.equal(module.feature_banks["lr"].count, counts)  # filling stopped


@pytest.mark.parametrize("bank_mode", ["init", "queue"])
def test_both_bank_modes_train(bank_mode):
    torch.manual_seed(0)
    module = _module(bank_mode=bank_mode, momentum=0.9, slots=60).train()
    means = []
    for seed in range(4):
        features, labels = _batch(seed=seed)
        features.requires_grad_(True)
        out = module(features, labels)
        out["loss"].backward()
        means.append(module.prototypes.mean.clone())
        if seed >= 2:  # initialised by then; losses flow and the prototypes move
            assert float(out["loss"]) > 0 and features.grad.abs().sum() > 0
            assert not torch.equal(means[-1], means[-2])
    assert module.prototypes.initialized.all()


def test_early_start_initialises_from_the_first_batch_then_refines():
    torch.manual_seed(0)
    # alpha = 1: the prototypes only change through K-Means.
    module = _module(slots=80, bank_max_per_step=20, early_start=True, momentum=1.0).train()
    assert module.min_init_features == 20  # one step's features of a class
    features, labels = _batch(size=12)  # about 36 pixels per class per image pair
    module(features, labels)
    assert module.prototypes.initialized.all() and not module.refined.any()
    first = module.prototypes.mean.clone()
    out = module(*_batch(size=12, seed=1))
    assert float(out["loss"]) > 0  # losses from the second step on
    assert torch.equal(module.prototypes.mean, first)  # no K-Means until the slot is full
    for seed in range(2, 4):  # 20 per step: the 80-feature slot is full after 4 steps
        module(*_batch(size=12, seed=seed))
    assert module.refined.all()
    assert not torch.equal(module.prototypes.mean, first)  # the refined K-Means ran
    refined = module.prototypes.mean.clone()
    counts = module.feature_banks["lr"].count.clone()
    module(*_batch(size=12, seed=9))
    assert torch.equal(module.prototypes.mean, refined)  # once only
    assert torch.equal(module.feature_banks["lr"].count, counts)  # and filling stopped


def test_default_start_waits_for_a_full_slot():
    torch.manual_seed(0)
    module = _module(slots=80, bank_max_per_step=20).train()
    assert module.min_init_features == 80
    module(*_batch(size=12))
    assert not module.prototypes.initialized.any()


@pytest.mark.parametrize("early_start", [False, True])
def test_loading_started_prototypes_ends_the_start(early_start):
    """The host-side "no class waits" flag follows a loaded checkpoint, so that the steady
    state reads no device flag."""
    torch.manual_seed(0)
    module = _module(slots=80, bank_max_per_step=20, early_start=early_start).train()
    assert not module.bank_update.start.done
    _initialise(module)
    module.refined.fill_(True)
    fresh = _module(slots=80, bank_max_per_step=20, early_start=early_start)
    fresh.load_state_dict(module.state_dict())
    assert fresh.bank_update.start.done
    fresh.refined.fill_(False)
    fresh.load_state_dict(fresh.state_dict())
    assert fresh.bank_update.start.done is not early_start  # early start: refined K-Means waits
