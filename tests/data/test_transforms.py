"""Per-split transforms: train is augmented, val/test/predict never are (the seed notebook's bug)."""

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from facecls.config import AugmentConfig, Preprocess
from facecls.data.datasets import FaceImages, ImageFiles, sample_seed
from facecls.data.images import load_image
from facecls.data.pipeline import build_datasets
from facecls.data.split import ManifestRow
from facecls.data.transforms import color_jitter_uint8, rotate_uint8, train_transform
from facecls.runtime.distributed import DistEnv


def _data(tmp_path, n=4):
    rng = np.random.default_rng(0)
    rows = []
    for ident in ("a", "b"):
        (tmp_path / "train" / ident).mkdir(parents=True)
        for i in range(n):
            path = tmp_path / "train" / ident / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
            split = "train" if i < 2 else ("val" if i == 2 else "test")
            rows.append(ManifestRow(f"train/{ident}/{i}.png", ident, split))
    return rows


def test_each_split_owns_its_transform(tmp_path):
    rows = _data(tmp_path)
    pre = Preprocess(32, 36, (0.5,) * 3, (0.5,) * 3)
    for use_cache in (True, False):
        data = build_datasets(
            tmp_path,
            rows,
            pre,
            AugmentConfig(),
            use_cache=use_cache,
            cache_root=tmp_path / "cache",
            workers=1,
            env=DistEnv(),
        )
        train, val, test = data.datasets["train"], data.datasets["val"], data.datasets["test"]
        assert train.transform is not None and val.transform is None and test.transform is None
        # train: different augmentation seeds give different crops of the same image
        a, _, _ = train[(0, sample_seed(0, 0, 0))]
        b, _, _ = train[(0, sample_seed(0, 1, 0))]
        assert a.shape == (3, 32, 32) and not torch.equal(a, b)
        # ... and the same seed gives the same result (resume depends on it)
        assert torch.equal(a, train[(0, sample_seed(0, 0, 0))][0])
        # val/test: exactly the resized file, every time
        for ds in (val, test):
            img, _, _ = ds[0]
            expected = torch.from_numpy(load_image(ds.paths[0], 32)).permute(2, 0, 1)
            assert torch.equal(img, expected) and torch.equal(img, ds[0][0])
        # prediction images are likewise untouched
        pred = ImageFiles(val.paths, 32)
        assert torch.equal(pred[0][0], val[0][0])


def test_augmentation_does_not_disturb_global_rng(tmp_path):
    rows = _data(tmp_path)
    pre = Preprocess(32, 36, (0.5,) * 3, (0.5,) * 3)
    ds: FaceImages = build_datasets(
        tmp_path, rows, pre, AugmentConfig(), use_cache=False, cache_root=tmp_path, workers=1, env=DistEnv()
    ).datasets["train"]
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)


def test_fast_hue_and_rotation_match_torchvision():
    """The faster kernels in train_transform agree with torchvision's: hue to +-1 grey level, rotation
    exactly with torchvision's PIL path (and on 99%+ of the pixels with its tensor path)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=gen)
    image[:, :4] = 128  # grey pixels (no hue) too
    for hue in (-0.1, -0.03, 0.0, 0.05, 0.1, 0.5):
        hue_only = color_jitter_uint8(image, [3], None, None, None, hue)
        diff = (hue_only.int() - F.adjust_hue(image, hue).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    pil = F.to_pil_image(image)
    for angle in (-15.0, -3.3, 0.0, 7.5, 15.0):
        ours = rotate_uint8(image, angle)
        assert torch.equal(ours, F.pil_to_tensor(F.rotate(pil, angle)))
        assert (ours != F.rotate(image, angle)).any(0).float().mean() < 0.01


def test_train_transform_keeps_torchvisions_random_draws():
    """Same seed -> same crop, flip, angle, jitter factors as plain torchvision v2 (output differs only
    by the kernels' rounding), so the augmentation distribution is unchanged."""
    augment = AugmentConfig()
    b, c, s, h = augment.color_jitter
    plain = v2.Compose(
        [
            v2.RandomResizedCrop(32, scale=augment.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(augment.hflip),
            v2.RandomRotation(augment.rotation),
            v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h),
            v2.RandomGrayscale(augment.grayscale),
        ]
    )
    ours = train_transform(32, augment)
    image = torch.randint(0, 256, (3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = plain(image)
        after_plain = torch.rand(1)
        torch.manual_seed(seed)
        got = ours(image)
        assert torch.equal(torch.rand(1), after_plain)  # the same number of random draws
        assert (got.int() - expected.int()).abs().float().mean() < 1.0


def test_one_pass_color_jitter_matches_torchvisions_steps():
    """color_jitter_uint8 does torchvision's four uint8 adjustments in one float tensor: the same values up
    to float rounding, for every order and with steps left out."""
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    image[:, :3] = 77  # grey pixels too
    steps = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    draws = torch.Generator().manual_seed(3)
    for _ in range(30):
        order = torch.randperm(4, generator=draws).tolist()
        factors = [0.8 + 0.4 * float(torch.rand(1, generator=draws)) for _ in range(3)]
        factors.append(0.2 * float(torch.rand(1, generator=draws)) - 0.1)
        if order[0] == 2:
            factors[1] = None  # a step left out (v2.ColorJitter passes None for a zero range)
        expected = image
        for fn_id in order:
            if factors[fn_id] is not None:
                expected = steps[fn_id](expected, factors[fn_id])
        got = color_jitter_uint8(image, order, *factors)
        diff = (got.int() - expected.int()).abs()
        assert got.dtype == torch.uint8 and got.shape == image.shape
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (order, factors, diff.max())
