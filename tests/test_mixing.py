"""ClassMix and the strong augmentation against direct computations and torchvision."""

from __future__ import annotations

import functools
import math

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mpcl.data.labels import IGNORE_INDEX
from mpcl.uda.mixing import StrongAugment, class_mix_mask, gaussian_blur, mix, shift_hue


def test_class_mix_picks_half_of_present_classes_per_image_never_ignore():
    gen = torch.Generator().manual_seed(0)
    labels = torch.full((3, 8, 8), IGNORE_INDEX)
    labels[0, :4] = 1
    labels[0, 4:6] = 2
    labels[0, 6:, :4] = 7  # 3 classes + ignore -> 2 picked
    labels[1, :, :] = 5  # 1 class -> 1 picked
    labels[2, :, :4] = 3
    labels[2, :, 4:] = 4  # 2 classes -> 1 picked
    for _ in range(20):
        mask = class_mix_mask(labels, 19, gen)
        assert mask.dtype == torch.bool
        for b, expected in zip(range(3), (2, 1, 1), strict=True):
            picked = torch.unique(labels[b][mask[b]])
            assert IGNORE_INDEX not in picked.tolist()
            assert len(picked) == expected
            # Whole classes are pasted: every pixel of a picked class is in the mask.
            assert torch.equal(mask[b], torch.isin(labels[b], picked))


def test_mix_images_labels_and_weights():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    src, tgt = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    mixed = mix(mask, src, tgt)
    assert torch.all(mixed[:, :, :2] == 1) and torch.all(mixed[:, :, 2:] == 0)
    w = mix(mask, torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.3))
    expected = 0.3 * (1 - mask.float()) + mask.float()  # w_M = w_T (1 - M) + M
    torch.testing.assert_close(w, expected)


def _class_mix_mask_loop(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The previous implementation (torch.unique per image, a host sync on a GPU)."""
    masks = []
    for label in labels:
        classes = torch.unique(label)
        classes = classes[classes != IGNORE_INDEX]
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=generator)[: (n + n % 2) // 2]]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)


def test_class_mix_draws_uniform_subsets_like_the_per_image_loop():
    """Each subset of ceil(n/2) present classes is equally likely, as with the old loop."""
    labels = torch.full((2, 4, 6), IGNORE_INDEX)
    labels[0, :, :2], labels[0, :, 2:4], labels[0, :2, 4:] = 0, 9, 18  # 3 classes -> 3 pairs
    labels[1, :2, :3], labels[1, 2:, :3], labels[1, :2, 3:], labels[1, 2:, 3:] = 1, 2, 3, 4
    n_draws = 1200
    for draw in (functools.partial(class_mix_mask, num_classes=19), _class_mix_mask_loop):
        gen = torch.Generator().manual_seed(1)
        counts = [{}, {}]
        for _ in range(n_draws):
            mask = draw(labels, generator=gen)
            for b in range(2):
                key = tuple(sorted(set(labels[b][mask[b]].tolist())))
                counts[b][key] = counts[b].get(key, 0) + 1
        # image 0: C(3, 2) = 3 subsets; image 1 (4 classes -> 2): C(4, 2) = 6 subsets.
        for b, num_subsets in ((0, 3), (1, 6)):
            assert len(counts[b]) == num_subsets
            expected = n_draws / num_subsets
            sd = math.sqrt(n_draws * (1 / num_subsets) * (1 - 1 / num_subsets))
            assert all(abs(c - expected) < 4 * sd for c in counts[b].values()), counts[b]


def test_class_mix_empty_and_out_of_range_labels_are_never_pasted():
    labels = torch.full((2, 4, 4), IGNORE_INDEX)
    labels[1, :2] = 19  # outside the 19-class space: treated like ignore
    labels[1, 2:] = 6
    mask = class_mix_mask(labels, 19)
    assert not mask[0].any()  # nothing labelled: nothing pasted
    assert torch.equal(mask[1], labels[1] == 6)  # one class: ceil(1/2) = 1 picked


def _jitter_reference(images: torch.Tensor, params: dict, kernel: int) -> torch.Tensor:
    """torchvision's own kernels, image by image, with the sampled parameters."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for b, img in enumerate(images):
        if params["jitter"][b]:
            for op in params["order"][b].tolist():
                img = ops[op](img, float(params["factors"][b, op]))
        if params["blur"][b]:
            sigma = float(params["sigma"][b])
            img = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])
        out.append(img.clamp(0.0, 1.0))
    return torch.stack(out)


def test_strong_augment_matches_torchvision_image_by_image():
    torch.manual_seed(0)
    x = torch.rand(24, 3, 20, 30)
    x[:3] = x[:3].round()  # saturated colours and black / white
    x[3, :, :5] = 0.4  # grey pixels: no hue
    aug = StrongAugment()
    params = aug.sample(24)
    assert params["jitter"].any() and not params["jitter"].all()  # both branches are tested
    assert params["blur"].any() and not params["blur"].all()
    y = aug.apply(x, params)
    kernel = int(round(0.1 * 30)) // 2 * 2 + 1
    torch.testing.assert_close(y, _jitter_reference(x, params, kernel), atol=2e-6, rtol=0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # Nothing drawn: the images come back unchanged.
    none = dict(params, jitter=torch.zeros(24, dtype=torch.bool), blur=torch.zeros(24).bool())
    torch.testing.assert_close(aug.apply(x, none), x, atol=0, rtol=0)


def test_hue_shift_and_separable_blur_match_torchvision():
    torch.manual_seed(1)
    x = torch.rand(6, 3, 33, 17)
    shift = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.37, 0.5])
    sigma = torch.tensor([0.15, 0.5, 1.0, 1.15, 2.0, 3.0])
    hued, blurred = shift_hue(x, shift), gaussian_blur(x, 7, sigma)
    for b in range(6):
        torch.testing.assert_close(hued[b], TF.adjust_hue(x[b], float(shift[b])), atol=2e-6, rtol=0)
        s = float(sigma[b])
        expected = TF.gaussian_blur(x[b], [7, 7], [s, s])  # the 2-D kernel, reflect padding
        torch.testing.assert_close(blurred[b], expected, atol=2e-6, rtol=0)


def test_strong_augment_parameters_follow_torchvision_distribution():
    """The rates and ranges of DACS's augmentation: ColorJitter(0.2, 0.2, 0.2, 0.2) with
    p = 0.8 in a uniformly random order, blur with p = 0.5 and sigma ~ U(0.15, 1.15)."""
    n = 24_000
    params = StrongAugment().sample(n, torch.Generator().manual_seed(0))
    jitter = v2.ColorJitter(0.2, 0.2, 0.2, 0.2)
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    sd = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    assert abs(params["jitter"].float().mean().item() - 0.8) < sd(0.8)
    assert abs(params["blur"].float().mean().item() - 0.5) < sd(0.5)
    for i, (low, high) in enumerate(ranges):
        f = params["factors"][:, i]
        assert low <= f.min().item() and f.max().item() <= high
        # Uniform: mean (low + high) / 2 and each quarter of the range holds a quarter.
        assert abs(f.mean().item() - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * n)
        quarter = ((f - low) / (high - low) * 4).long().clamp(max=3)
        assert torch.all((torch.bincount(quarter, minlength=4) / n - 0.25).abs() < sd(0.25))
    sigma = params["sigma"]
    assert 0.15 <= sigma.min().item() and sigma.max().item() <= 1.15
    assert abs(sigma.mean().item() - 0.65) < 0.01
    # Every order of the four operations is a permutation, and the 24 are equally likely.
    order = params["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    freq = torch.unique(codes, return_counts=True)[1].float() / n
    assert len(freq) == 24 and torch.all((freq - 1 / 24).abs() < sd(1 / 24))


def test_strong_augment_is_reproducible_from_the_global_rng():
    x = torch.rand(4, 3, 16, 16)
    aug = StrongAugment(color_jitter_p=1.0, blur_p=1.0)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = aug(x)
    torch.set_rng_state(state)  # as an exact resume restores it
    torch.testing.assert_close(aug(x), first, atol=0, rtol=0)
    assert not torch.allclose(aug(x), first)  # the next draw differs
    assert not torch.allclose(x, first)
