"""Per-split transforms: train is augmented, val/test/predict never are (the seed notebook's bug)."""

import numpy as np
import torch
from PIL import Image

from facecls.config import AugmentConfig
from facecls.data.datasets import FaceImages, ImageFiles, sample_seed
from facecls.data.images import load_image
from facecls.data.pipeline import build_datasets
from facecls.data.split import ManifestRow
from facecls.distributed import DistEnv
from facecls.runs import Preprocess


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
        data = build_datasets(tmp_path, rows, pre, AugmentConfig(), use_cache=use_cache,
                              cache_root=tmp_path / "cache", workers=1, env=DistEnv())
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
    ds: FaceImages = build_datasets(tmp_path, rows, pre, AugmentConfig(), use_cache=False,
                                    cache_root=tmp_path, workers=1, env=DistEnv()).datasets["train"]
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)
