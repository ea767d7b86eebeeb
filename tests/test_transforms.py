"""Input transforms as torch ops: resize, channel statistics, normalisation and training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data.common import ImageConfig, episode_transforms
from metalearn.data.episodes import ClassStore
from metalearn.data.transforms import AugmentConfig, EpisodeTransform, channel_stats, resize

OFF = AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.0)


def images(n=6, c=3, size=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_resize_is_close_to_pillow_bilinear():
    x = images(n=2, size=84)
    ours = resize(x, 28).numpy().astype(int)
    for i in range(2):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((28, 28), Image.Resampling.BILINEAR)
        ref = np.asarray(pil).transpose(2, 0, 1).astype(int)
        assert np.abs(ours[i] - ref).mean() < 1.5
    assert resize(x, 84) is x


def test_channel_stats_match_numpy():
    x = images(n=50)
    mean, std = channel_stats(x, chunk=7)
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-9)


def test_normalisation_uses_the_given_statistics():
    x = images()
    out = EpisodeTransform((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))(x, torch.Generator())
    ref = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(EpisodeTransform()(x, torch.Generator()), x.float() / 255)


def test_random_crop_is_a_shift_of_the_zero_padded_image():
    x = images(n=40)
    cfg = AugmentConfig(enabled=True, crop_padding=3, flip=False, color_jitter=0.0)
    out = EpisodeTransform(augment=cfg)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x.float() / 255, (3, 3, 3, 3))
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(7) for dx in range(7) if torch.equal(padded[i, :, dy:dy + 12, dx:dx + 12], out[i])]
        assert found, f"image {i} is not a crop of its padded original"
        shifts.add(found[0])
    assert len(shifts) > 10  # offsets differ per image


def test_flip_mirrors_about_half_the_images():
    x = images(n=200)
    out = EpisodeTransform(augment=AugmentConfig(enabled=True, crop_padding=0, flip=True, color_jitter=0.0))(
        x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1).float() / 255) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i].float() / 255) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and 70 < sum(flipped) < 130


def test_colour_jitter_stays_in_range_and_varies_per_image():
    x = images(n=50)
    out = EpisodeTransform(augment=AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.4))(
        x, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    ratio = out.mean(dim=(1, 2, 3)) / (x.float() / 255).mean(dim=(1, 2, 3))
    assert ratio.std() > 0.05
    disabled = EpisodeTransform(augment=OFF)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(disabled, x.float() / 255)


def test_augmentation_is_fixed_by_the_generator_and_keeps_shapes():
    x = images(n=24).view(2, 3, 4, 3, 12, 12)  # any leading dims: [B, N, K, C, H, W]
    cfg = AugmentConfig(enabled=True)
    a = EpisodeTransform(augment=cfg)(x, torch.Generator().manual_seed(5))
    b = EpisodeTransform(augment=cfg)(x, torch.Generator().manual_seed(5))
    c = EpisodeTransform(augment=cfg)(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_training_episodes_are_augmented_and_evaluation_episodes_never():
    x, labels = images(n=40), torch.arange(4).repeat_interleave(10)
    store = ClassStore(x, labels, list("abcd"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cfg = ImageConfig(name="test", normalize=True, augment=AugmentConfig(enabled=True))
    store.train_transform, store.eval_transform = episode_transforms(cfg, store)
    train = store.sampler(4, 2, 3, 2, seed=0, training=True).sample()
    evaluation = store.sampler(4, 2, 3, 2, seed=0).sample()
    plain = ClassStore(x, labels, list("abcd")).sampler(4, 2, 3, 2, seed=0).sample()
    torch.testing.assert_close(evaluation.support_x, (plain.support_x - 0.5) / 0.25)  # same episode, normalised
    assert not torch.allclose(train.support_x, evaluation.support_x)
    no_norm = ImageConfig(name="test", normalize=False)
    assert episode_transforms(no_norm, store) == (None, None)


@pytest.mark.parametrize("key, value, message", [("crop_padding", -1, "crop_padding must be >= 0"),
                                                 ("color_jitter", 1.5, r"color_jitter must be in \[0, 1\)")])
def test_bad_augment_values(key, value, message):
    from metalearn.data.transforms import check_augment
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_augment(AugmentConfig(**{key: value}))
