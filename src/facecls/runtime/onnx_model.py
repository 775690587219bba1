"""A facecls model as an ONNX file: the metadata an export carries, and prediction through onnxruntime.

The graph takes what the PyTorch model takes, an ``N x 3 x S x S`` float32 batch (N free) of RGB images
normalised as ``(pixel / 255 - mean) / std``, and returns ``N x classes`` logits (or ``N x D`` embeddings
with ``--embedding``). Everything else a user needs is in the file's metadata (``metadata_props``, string
values, JSON where structured; ``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``
reads it): see `OnnxMetadata`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from facecls.core.errors import FaceclsError, first_line

FORMAT = "facecls-onnx-1"
"""Value of the ``format`` metadata key; a file without it is not a facecls export."""

RESIZE_RULE = (
    "decode, apply EXIF rotation, convert to RGB; resize the shorter side to input_size (PIL bilinear) "
    "and centre-crop input_size x input_size"
)


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported graph needs around it: preprocessing, class names, provenance."""

    output: str
    """``logits`` (one score per class) or ``embedding`` (the backbone's feature vector)."""
    class_names: list[str]
    """Class names in logit order (also written for embedding exports: the identities it was trained on)."""
    input_size: int
    mean: tuple[float, float, float]
    """Per-channel mean on [0, 1] RGB pixels."""
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    layout: str = "NCHW"
    normalisation: str = "(pixel / 255 - mean) / std, float32"
    resize: str = RESIZE_RULE
    alignment: dict = field(default_factory=dict)
    """How the training faces were cropped: ``{"aligned": false}`` or the ``facecls prepare`` settings."""
    model: str = ""
    recipe: str = ""
    checkpoint_epoch: int = 0
    quantization: str = "none"
    """``none`` (float32), ``dynamic`` or ``static`` (int8, onnxruntime quantisation)."""
    embedding_dim: int | None = None
    facecls_version: str = ""

    def to_props(self) -> dict[str, str]:
        """``metadata_props`` entries: plain strings, JSON for lists and mappings."""
        props = {"format": FORMAT}
        for key, value in asdict(self).items():
            if value is None:
                continue
            props[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: Path | str) -> OnnxMetadata:
        if props.get("format") != FORMAT:
            raise FaceclsError(
                f"{source} carries no facecls metadata (format {props.get('format')!r}, expected {FORMAT!r}); "
                "predict takes models written by `facecls export RUN`"
            )
        try:
            values = {}
            for key, kind in cls.__annotations__.items():
                if key not in props:
                    continue
                text = props[key]
                values[key] = text if kind == "str" else json.loads(text)
            values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise FaceclsError(f"{source} has damaged facecls metadata ({type(exc).__name__}: {exc})") from None


def write_metadata(model_proto, metadata: OnnxMetadata) -> None:
    """Replace the facecls entries of an ``onnx.ModelProto``'s ``metadata_props`` with ``metadata``."""
    props = metadata.to_props()
    kept = [(p.key, p.value) for p in model_proto.metadata_props if p.key not in props]
    del model_proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise FaceclsError('the ONNX backend needs onnxruntime: pip install "facecls[onnx]"') from None
    return onnxruntime


def open_session(path: Path, threads: int | None = None):
    """An onnxruntime session on ``path`` (CPU, or a GPU provider when the installed onnxruntime has one)."""
    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(f"ONNX model {path} not found; write one with `facecls export RUN --out {path}`")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    from facecls.runtime.speed import openmp_threads_sleep

    if openmp_threads_sleep():  # the same policy as torch's OpenMP threads (speed.resolve_runtime): no spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. about unused initializers) are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... for bad files
        raise FaceclsError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


class OnnxModel(nn.Module):
    """An exported model behind the ``nn.Module`` call of the PyTorch one: a float batch in, a tensor out.

    The metadata is checked against the graph when opened, so a file whose class list or input size does
    not match its own graph is refused before any image is read."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.input_name = self.session.get_inputs()[0].name
        self._check_graph()

    def _check_graph(self) -> None:
        meta, shape = self.metadata, self.session.get_inputs()[0].shape
        if len(shape) != 4 or list(shape[1:]) != [3, meta.input_size, meta.input_size]:
            raise FaceclsError(
                f"{self.path}: its metadata says {meta.input_size} x {meta.input_size} RGB input, its graph takes "
                f"{shape}; the file was altered after export, export it again"
            )
        outputs = self.session.get_outputs()[0].shape
        expected = len(meta.class_names) if meta.output == "logits" else meta.embedding_dim
        if len(outputs) != 2 or (isinstance(outputs[1], int) and outputs[1] != expected):
            raise FaceclsError(
                f"{self.path}: its metadata lists {expected} {'classes' if meta.output == 'logits' else 'features'}"
                f", its graph outputs {outputs}; the file was altered after export, export it again"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])


@dataclass
class OnnxPredictor:
    """What predict needs from an exported model, in the shape of evaluation.LoadedRun."""

    path: Path
    metadata: OnnxMetadata
    model: OnnxModel
    class_names: list[str]
    preprocess: object
    runtime: object
    normalize: nn.Module


def load_onnx_predictor(path: Path, run: Path | None = None) -> OnnxPredictor:
    """Open ``path`` for prediction; with ``run``, also refuse a model exported from another run's classes
    or preprocessing."""
    from facecls.config import Preprocess, SpeedConfig
    from facecls.data.transforms import Normalize
    from facecls.runtime.speed import resolve_runtime

    # onnxruntime computes in float32 on the CPU; the loader settings come from the machine as for a run.
    runtime = resolve_runtime(SpeedConfig(precision="fp32", channels_last=False, compile_inference=False), "cpu")
    model = OnnxModel(path, runtime.threads)
    meta = model.metadata
    if meta.output != "logits":
        raise FaceclsError(
            f"{path} was exported with --embedding: it outputs {meta.embedding_dim}-d embeddings, not class "
            "scores; export the run without --embedding to predict labels"
        )
    preprocess = Preprocess(meta.input_size, meta.input_size, tuple(meta.mean), tuple(meta.std))
    if run is not None:
        check_matches_run(meta, path, run)
    normalize = Normalize(preprocess.mean, preprocess.std, channels_last=False)
    return OnnxPredictor(Path(path), meta, model, list(meta.class_names), preprocess, runtime, normalize)


def check_matches_run(meta: OnnxMetadata, path: Path, run: Path) -> None:
    """One line if the exported model does not predict ``run``'s classes from ``run``'s preprocessing."""
    from facecls.core.run_folder import RunFolder

    folder = RunFolder(run)
    class_names = folder.read_class_names()
    preprocess = folder.read_preprocess()
    if list(meta.class_names) != list(class_names):
        raise FaceclsError(
            f"{path} predicts another class list than run {run} ({len(meta.class_names)} vs {len(class_names)} "
            "classes, or other names/order); export this run again"
        )
    if meta.input_size != preprocess.input_size:
        raise FaceclsError(
            f"{path} takes {meta.input_size} px inputs, run {run} was trained at {preprocess.input_size} px; "
            "export this run again"
        )
    if tuple(meta.mean) != tuple(preprocess.mean) or tuple(meta.std) != tuple(preprocess.std):
        raise FaceclsError(f"{path} normalises its inputs differently from run {run}; export this run again")
