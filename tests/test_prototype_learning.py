"""PrototypeLearning (mpcl.prototypes.module): the step's losses, Eq. 18 over views, per-loss
pixels, predictions, checkpoints, the constructor's checks, and ``downsample``."""

import math

import pytest
import torch

import mpcl.prototypes
from mpcl.prototypes import (
    CentroidPrototypes,
    GaussianPrototypes,
    PrototypeLearning,
    contrastive_loss,
    downsample,
)
from mpcl.prototypes.losses import consistency_loss
from mpcl.prototypes.updates import InitUpdate, QueueUpdate


def _module(kind="centroid", num_classes=4, K=3, dim=16, **kwargs):
    kwargs.setdefault("feature_bank_size", num_classes * 40)
    kwargs.setdefault("bank_max_per_step", 40)
    prototypes = {"centroid": CentroidPrototypes, "gaussian": GaussianPrototypes}[kind]
    return PrototypeLearning(prototypes, K=K, dim=dim, num_classes=num_classes, **kwargs)


def _batch(num_classes=4, dim=16, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, dim, size, size, generator=gen)
    labels = torch.randint(0, num_classes, (2, size, size), generator=gen)
    labels[:, 0] = 255
    return features, labels


def _initialise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    protos = module.prototypes
    for c in range(module.num_classes):
        mean = torch.randn(module.K, module.dim, generator=gen, dtype=torch.float64) / 2
        var = 0.05 + 0.2 * torch.rand(module.K, module.dim, generator=gen, dtype=torch.float64)
        protos.initialize(c, mean, var)


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_losses_off_until_class_initialised(kind):
    torch.manual_seed(0)
    module = _module(kind).train()
    features, labels = _batch()
    labels[labels == 3] = 2  # class 3 never seen: never initialised
    features.requires_grad_(True)
    out = module(features, labels)
    out["loss"].backward()  # zero, but differentiable
    assert float(out["loss"]) == 0.0 and float(out["num_pixels"]) == 0
    assert module.prototypes.initialized.tolist() == [True, True, True, False]

    out = module(features, labels)
    assert float(out["num_initialized"]) == 3
    assert float(out["num_pixels"]) == int((labels != 255).sum())
    assert float(out["loss"]) > 0
    out["loss"].backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_contrastive_loss_near_log_ck_at_initialisation(kind):
    torch.manual_seed(0)
    num_classes, K, dim = 19, 5, 256
    module = _module(kind, num_classes, K, dim, feature_bank_size=19 * 60)
    module.bank_max_per_step = 60
    module.feature_banks["lr"].max_per_step = 60
    features, labels = _batch(num_classes, dim, size=32, seed=1)
    module.train()(features, labels)
    assert module.prototypes.initialized.all()
    module.eval()
    features, labels = _batch(num_classes, dim, size=32, seed=2)
    out = module(features, labels)
    assert torch.isfinite(module.predict(features)).all()
    assert abs(float(out["loss_contrast"]) - math.log(num_classes * K)) < 0.5
    assert abs(float(out["loss_consistency"]) - math.log(num_classes)) < 0.2


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_state_dict_round_trip_continues_identically(kind):
    torch.manual_seed(0)
    first = _module(kind, momentum=0.9).train()
    for seed in range(3):
        first(*_batch(seed=seed))
    torch.manual_seed(123)
    second = _module(kind, momentum=0.9).train()
    second.load_state_dict(first.state_dict())
    assert "feature_banks.lr.features" in first.state_dict()
    features, labels = _batch(seed=10)
    torch.testing.assert_close(
        second.prototype_similarity(features), first.prototype_similarity(features), rtol=0, atol=0
    )
    out_a, out_b = first(features, labels), second(features, labels)
    torch.testing.assert_close(out_a["loss"], out_b["loss"], rtol=0, atol=0)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_predict_is_max_over_prototypes_over_tau():
    torch.manual_seed(0)
    module = _module().train()
    features, labels = _batch()
    labels[labels == 3] = 255
    module(features, labels)
    scores = module.predict(features)
    assert scores.shape == (2, 4, 16, 16)
    sim = module.prototype_similarity(features)  # (B, C, K, h, w)
    torch.testing.assert_close(scores[:, :3], sim[:, :3].max(2).values / module.temperature)
    assert (scores[:, 3] == torch.finfo(scores.dtype).min).all()


def test_multi_resolution_banks_and_shared_prototypes():
    torch.manual_seed(0)
    module = _module(resolutions=("lr", "hr"), min_init_features=60).train()
    features, labels = _batch()
    module(features, labels, resolution="hr")
    assert module.feature_banks["hr"].count.sum() > 0
    assert module.feature_banks["lr"].count.sum() == 0
    module(features, labels, resolution="lr")  # union of both banks reaches 60
    assert module.prototypes.initialized.all()
    with pytest.raises(ValueError, match="unknown resolution 'mr'"):
        module(features, labels, resolution="mr")


def test_in_class_negatives_flag_changes_the_loss():
    torch.manual_seed(0)
    a = _module(in_class_negatives=True).train()
    b = _module(in_class_negatives=False).train()
    features, labels = _batch()
    a(features, labels)  # initialises the prototypes
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert b(features, labels)["loss_contrast"] < a(features, labels)["loss_contrast"]


def test_downsample_labels_and_weights_nearest():
    labels = torch.arange(16).view(1, 4, 4)
    labels[0, 0, 0] = 255
    weights = labels.float() / 10
    small = downsample(labels, (2, 2))
    assert small.dtype == torch.int64
    assert small.tolist() == [[[255, 2], [8, 10]]]
    torch.testing.assert_close(downsample(weights, (2, 2)), small.float() / 10)
    assert downsample(weights, (2, 2)).dtype == torch.float32
    assert downsample(labels.bool(), 2).dtype == torch.bool  # a square size, any dtype


def test_one_downsample_exported():
    assert "downsample" in mpcl.prototypes.__all__
    for old in ("downsample_labels", "downsample_weights"):
        assert old not in mpcl.prototypes.__all__ and not hasattr(mpcl.prototypes, old)


def test_bad_config_messages():
    def build(**kwargs):
        return PrototypeLearning(CentroidPrototypes, K=3, dim=16, num_classes=4, **kwargs)

    with pytest.raises(ValueError, match=r"prototype.temperature=0.0 must be > 0"):
        build(temperature=0.0)
    with pytest.raises(ValueError, match="prototype.epsilon=-1 must be > 0"):
        build(epsilon=-1)
    with pytest.raises(ValueError, match="prototype.lambda_contrast=-0.1 must be >= 0"):
        build(lambda_contrast=-0.1)
    with pytest.raises(ValueError, match="built a dict"):
        PrototypeLearning(lambda **kw: {"type": "gmm"}, num_classes=4)
    with pytest.raises(ValueError, match="K"):
        GaussianPrototypes(4, 0, 16)
    with pytest.raises(ValueError, match="min_init_features"):
        build(min_init_features=2)
    with pytest.raises(ValueError, match="prototype.bank_mode='fifo' is unknown"):
        _module("gaussian", dim=8, bank_mode="fifo")
    with pytest.raises(ValueError, match="early_start needs min_init_features=40 below"):
        _module("gaussian", dim=8, early_start=True, min_init_features=40)
    module = build()
    with pytest.raises(ValueError, match=r"features must be \(B, 16, h, w\), got \(2, 8, 8, 8\)"):
        module(torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="downsample"):
        module(torch.zeros(2, 16, 8, 8), torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(RuntimeError, match="labels must be in"):  # a device-side assert
        module(torch.zeros(2, 16, 8, 8), torch.full((2, 8, 8), 19))
    module = _module("gaussian", dim=8)
    features, labels = _batch(dim=8, size=8)
    with pytest.raises(ValueError, match=r"unknown prototype losses \['contrastive'\]"):
        module.forward_views(
            [[("lr", features, labels, torch.ones(labels.shape))]], [{"contrastive"}]
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("K", 0),
        ("K", -2),
        ("K", 2.5),
        ("K", True),
        ("temperature", 0.0),
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("lambda_contrast", -0.1),
        ("lambda_contrast", float("inf")),
        ("lambda_contrast", float("nan")),
        ("lambda_consistency", -1.0),
        ("lambda_consistency", float("inf")),
        ("lambda_consistency", float("nan")),
        ("lambda_d", 1.5),
        ("lambda_d", float("nan")),
        ("epsilon", float("nan")),
    ],
)
def test_the_constructor_checks_each_config_value(key, value):
    """The constructor owns these checks (config.validate does not repeat them): a one-line
    ValueError that names the config key."""
    with pytest.raises(ValueError, match=rf"^prototype\.{key}=\S+ must be [^\n]*$"):
        PrototypeLearning(CentroidPrototypes, num_classes=4, dim=16, **{key: value})


def test_valid_edge_values_pass_the_checks():
    module = PrototypeLearning(
        CentroidPrototypes,
        K=1,
        dim=16,
        num_classes=4,
        feature_bank_size=40,
        lambda_contrast=0,
        lambda_consistency=0.0,
        lambda_d=1.0,
        temperature=1e-3,
    )
    assert module.K == 1 and module.lambda_contrast == 0


@pytest.mark.parametrize("bank_mode", ["init", "queue"])
@pytest.mark.parametrize("early_start", [False, True])
def test_state_dict_keys(bank_mode, early_start):
    """The update strategy is a plain object: no state_dict key of its own."""
    module = _module(
        "gaussian",
        resolutions=("lr", "hr"),
        bank_mode=bank_mode,
        early_start=early_start,
        bank_max_per_step=10,
    )
    assert list(module.state_dict()) == [
        "refined",
        "initial_mean",
        "prototypes.mean",
        "prototypes.initialized",
        "prototypes.var",
        "feature_banks.lr.features",
        "feature_banks.lr.count",
        "feature_banks.lr.pointer",
        "feature_banks.hr.features",
        "feature_banks.hr.count",
        "feature_banks.hr.pointer",
    ]
    update = {"init": InitUpdate, "queue": QueueUpdate}[bank_mode]
    assert type(module.bank_update) is update and module.bank_mode == bank_mode
    assert not isinstance(module.bank_update, torch.nn.Module)
    assert f"bank_mode={bank_mode}" in repr(module)


def test_per_loss_pixels_match_the_losses_on_their_domains():
    torch.manual_seed(0)
    module = _module("gaussian", dim=8).train()
    _initialise(module)
    module.eval()  # no update: the reference sees the same prototypes
    (f_a, y_a), (f_b, y_b) = _batch(dim=8, size=8, seed=1), _batch(dim=8, size=8, seed=2)
    ones = torch.ones(y_a.shape)
    domains = [[("lr", f_a, y_a, ones)], [("lr", f_b, y_b, 0.5 * ones)]]
    out = module.forward_views(domains, [{"contrast"}, {"consistency"}])

    x = torch.nn.functional.normalize(torch.cat([f_a, f_b]).permute(0, 2, 3, 1).flatten(0, 2))
    y = torch.cat([y_a, y_b]).flatten()
    w = torch.cat([ones, 0.5 * ones]).flatten()
    keep = y != 255
    x, y, w = x[keep], y[keep], w[keep]
    from_a = torch.arange(len(keep))[keep] < y_a.numel()
    sim = module.prototypes.similarity(x)
    _, positive = module._assign(sim, y)  # clustering over both domains at once
    tau, valid = module.temperature, module.prototypes.initialized
    expected_c = contrastive_loss(sim[from_a], positive[from_a], w[from_a], tau, valid)
    expected_s = consistency_loss(sim[~from_a], positive[~from_a], w[~from_a], tau, valid)
    torch.testing.assert_close(out["loss_contrast"], expected_c)
    torch.testing.assert_close(out["loss_consistency"], expected_s)
    both = module.forward_views(domains)
    assert not torch.isclose(both["loss_contrast"], expected_c)
    assert torch.equal(module.forward_views(domains, [LOSSES, LOSSES])["loss"], both["loss"])


LOSSES = {"contrast", "consistency"}


def test_checkpoints_without_refined_flags_still_load():
    torch.manual_seed(0)
    module = _module("gaussian", dim=8).train()
    module(*_batch(dim=8, size=8))
    state = module.state_dict()
    del state["refined"]  # a checkpoint written before early_start existed
    del state["initial_mean"]  # ... and before the drift diagnostic
    fresh = _module("gaussian", dim=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.refined, module.prototypes.initialized)
    assert torch.equal(fresh.initial_mean, module.prototypes.mean)  # drift counted from here


def test_drift_is_zero_at_the_kmeans_start_and_grows_with_the_updates():
    torch.manual_seed(0)
    module = _module("gaussian", dim=8).train()
    drifts = [float(module(*_batch(dim=8, size=8))["drift"]) for _ in range(6)]
    started = module.prototypes.initialized
    assert started.any()
    assert torch.equal(
        module.initial_mean[~started], torch.zeros_like(module.initial_mean[~started])
    )
    assert drifts[0] == 0.0 and drifts[-1] > 0.0
