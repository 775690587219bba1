"""``facecls export``: a trained run's checkpoint -> one ONNX file that needs nothing else.

The model is exported in eval mode, float32, on the CPU, with BatchNorm folded into the layer before it
(speed.fold_batchnorm), through torch's current exporter (``torch.onnx.export(dynamo=True)``, which
traces with torch.export: the TorchScript exporter is deprecated since torch 2.9). The batch dimension
is dynamic. The graph is then simplified with onnxslim (constant folding, dead-node removal and operator
fusions, pure Python on onnx's own IR, released often; onnxsim, the older choice, is a C++ extension whose
wheels have trailed new Python and onnx releases), kept only if onnxruntime gives a probe batch the same
outputs, checked with ``onnx.checker`` (full check, with shape inference) and given the metadata of
`facecls.runtime.onnx_model.OnnxMetadata`. An ``opset`` other than the exporter's 18 goes through onnx's version
converter, or is refused in one line when the graph cannot be expressed at it.

Every export is checked against PyTorch on the run's validation images: the largest absolute logit
difference, whether every predicted label is the same, and top-1 through onnxruntime, written to
``<out stem>.export.json`` beside the model. With ``quantize`` the int8 model (onnxruntime dynamic or
static quantisation, static calibrated on the validation images) becomes ``out``, the float32 graph is
kept as ``<out stem>.fp32.onnx``, and the log gives top-1 before and after.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facecls import __version__
from facecls.core.console import Console
from facecls.core.errors import FaceclsError, first_line
from facecls.core.runs import write_json
from facecls.engine.inference import LoadedRun, load_run, split_dataset
from facecls.runtime.onnx_model import OnnxMetadata, OnnxModel, write_metadata
from facecls.runtime.speed import fold_batchnorm

DEFAULT_OPSET = 18
"""The exporter's own opset (torch 2.9+); others go through onnx's version converter."""
QUANTIZE_MODES = ("dynamic", "static")
CALIBRATION_IMAGES = 256
"""At most this many validation images calibrate static quantisation (MinMax ranges settle well before)."""
PARITY_TOLERANCE = 1e-4
"""Largest absolute difference allowed between onnxruntime's and PyTorch's float32 logits (see the tests)."""


@dataclass
class ExportSummary:
    """What was written and what the checks measured (also the JSON log)."""

    model: Path
    log: Path
    output: str
    opset: int
    simplifier: str
    batchnorm_before: int
    batchnorm_after: int
    float_model: Path | None = None
    quantization: str = "none"
    validation_images: int = 0
    max_abs_diff: float | None = None
    labels_identical: bool | None = None
    top1_pytorch: float | None = None
    top1_onnx_fp32: float | None = None
    top1_onnx_int8: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


class _Embedding(nn.Module):
    """The run's model up to its embedding: the backbone's feature vector (before any head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed = getattr(self.model, "embed", None)
        return embed(x) if callable(embed) else self.model.backbone(x)


def _count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def export_run(
    run: Path,
    *,
    out: Path | None = None,
    fmt: str = "onnx",
    opset: int = DEFAULT_OPSET,
    embedding: bool = False,
    quantize: str | None = None,
    checkpoint: str = "best",
    progress: bool = True,
) -> ExportSummary:
    """Export ``run``'s ``checkpoint`` to ``out`` (default ``RUN/model.onnx``, ``RUN/embedding.onnx``)."""
    start = time.perf_counter()
    console = Console(progress=progress)
    if fmt != "onnx":
        raise FaceclsError(f"unknown export format {fmt!r}; the one format is onnx")
    if quantize not in (None, *QUANTIZE_MODES):
        raise FaceclsError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if opset < 13:
        raise FaceclsError(f"--opset {opset} is too old; use 13 or newer (default {DEFAULT_OPSET})")
    onnx = _import_onnx()
    loaded = load_run(run, checkpoint, device="cpu")
    out = Path(out) if out is not None else Path(run) / ("embedding.onnx" if embedding else "model.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    output = "embedding" if embedding else "logits"

    reference = loaded.model.float().to(memory_format=torch.contiguous_format).eval()
    network = _Embedding(reference).eval() if embedding else reference
    size = loaded.preprocess.input_size
    folded = fold_batchnorm(network, size)
    float_path = out.with_name(out.stem + ".fp32.onnx") if quantize else out
    console.log(f"exporting {loaded.recipe.model.name} ({output}, {size} px, opset {opset}) to {float_path}")
    proto = _torch_export(folded, size, output, opset)
    proto = _convert_opset(proto, onnx, opset)
    simplifier, proto = _simplify(proto, onnx, size)
    embedding_dim = _output_width(proto)
    metadata = _metadata(loaded, output, embedding_dim)
    write_metadata(proto, metadata)
    _check(proto, onnx)
    _save(proto, float_path, onnx)

    summary = ExportSummary(
        model=out,
        log=out.with_name(out.stem + ".export.json"),
        output=output,
        opset=opset,
        simplifier=simplifier,
        batchnorm_before=_count_batchnorm(network),
        batchnorm_after=_count_batchnorm(folded),
        float_model=float_path if quantize else None,
        quantization=quantize or "none",
    )
    val = _validation_loader(loaded, console)
    if val is None:
        summary.notes.append("the run's validation images are not readable here: nothing measured")
        if quantize == "static":
            raise FaceclsError(
                f"static quantisation calibrates on run {run}'s validation images, which are not readable at "
                f"{loaded.info.get('data_dir')}; use --quantize dynamic, or run export where the data is"
            )
    threads = loaded.runtime.threads
    if quantize:
        _quantize(float_path, out, quantize, val, loaded, onnx)
        proto_int8 = onnx.load(str(out))
        write_metadata(proto_int8, OnnxMetadata(**{**asdict(metadata), "quantization": quantize}))
        _save(proto_int8, out, onnx)
    if val is not None:
        _measure(
            summary, val, network, loaded, OnnxModel(float_path, threads), OnnxModel(out, threads) if quantize else None
        )
    summary.seconds = round(time.perf_counter() - start, 2)
    write_json(summary.log, summary.as_dict())
    _report(summary, console)
    return summary


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it; fail here with the install line
    except ImportError:
        raise FaceclsError('export needs onnx, onnxscript and onnxruntime: pip install "facecls[onnx]"') from None
    return onnx


def _torch_export(model: nn.Module, size: int, output: str, opset: int):
    """The ONNX ModelProto of ``model`` on ``N x 3 x size x size`` float32 input, N dynamic."""
    # Two examples: torch.export specialises a dimension of size 1, so the traced batch must be larger.
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    quiet = io.StringIO()
    try:
        # the exporter logs its own fallbacks (e.g. to opset 18) with tracebacks; _convert_opset reports in one line
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_logging(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=[output],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any exporter failure: one line with its first line
        lines = str(exc).strip().splitlines()
        raise FaceclsError(
            f"torch.onnx.export failed: {type(exc).__name__}: {lines[0][:300] if lines else ''}"
        ) from None
    return program.model_proto


def _convert_opset(proto, onnx, opset: int):
    """``proto`` at ``opset`` of the default domain: torch's exporter writes its own (18) whatever it is asked."""
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current == opset:
        return proto
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted, full_check=True)
        return converted
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ConvertError per operator
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise FaceclsError(f"the graph cannot be written at opset {opset} ({first}); try --opset {current}") from None


def _simplify(proto, onnx, size: int):
    """``(name of the tool, simplified model)``; the model unchanged where the tool is missing or changes
    the outputs (checked on a probe batch)."""
    try:
        import onnxslim
    except ImportError:
        return "none (onnxslim not installed)", proto
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(proto)
    except Exception as exc:  # noqa: BLE001 - a simplifier bug must not stop the export
        return f"none (onnxslim failed: {type(exc).__name__})", proto
    probe = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    before, after = _run_proto(proto, probe), _run_proto(slim, probe)
    scale = max(1.0, float(np.abs(before).max()))
    if after.shape != before.shape or float(np.abs(after - before).max()) > 1e-5 * scale:
        return "none (onnxslim changed the outputs; the exporter's graph is kept)", proto
    import onnxslim as slim_module

    return f"onnxslim {getattr(slim_module, '__version__', '')}".strip(), slim


def _run_proto(proto, batch: np.ndarray) -> np.ndarray:
    from facecls.runtime.onnx_model import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def _output_width(proto) -> int:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def _alignment(info: dict) -> dict:
    """How the run's training faces were cropped: the ``facecls prepare`` settings found beside its data."""
    from facecls.data.scan import PREPARE_CONFIG

    data_dir = Path(info.get("data_dir", ""))
    for folder in (data_dir, data_dir / "train", data_dir.parent):
        path = folder / PREPARE_CONFIG
        if path.is_file():
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            return {
                "aligned": True,
                "method": "YuNet 5-point landmarks, similarity transform to the ArcFace 112 x 112 template "
                "(facecls prepare / predict --detect)",
                **settings,
            }
    return {"aligned": False, "method": "none recorded: whole images, resized and centre-cropped"}


def _metadata(loaded: LoadedRun, output: str, width: int) -> OnnxMetadata:
    return OnnxMetadata(
        output=output,
        class_names=list(loaded.class_names),
        input_size=loaded.preprocess.input_size,
        mean=tuple(float(v) for v in loaded.preprocess.mean),
        std=tuple(float(v) for v in loaded.preprocess.std),
        alignment=_alignment(loaded.info),
        model=loaded.recipe.model.name,
        recipe=loaded.recipe.name,
        checkpoint_epoch=int(loaded.checkpoint.get("epoch", 0)),
        embedding_dim=width if output == "embedding" else None,
        facecls_version=__version__,
    )


def _check(proto, onnx) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, InferenceError
        raise FaceclsError(f"the exported graph fails onnx.checker: {first_line(exc, 300)}") from None


def _save(proto, path: Path, onnx) -> None:
    """Write ``proto`` atomically (a temp file in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _validation_loader(loaded: LoadedRun, console: Console):
    """In-order batches of the run's validation images (uint8, labels), or None where they cannot be read."""
    from facecls.data.pipeline import eval_loader
    from facecls.data.split import read_manifest
    from facecls.runtime.distributed import DistEnv

    data_dir = Path(loaded.info.get("data_dir", ""))
    rows = [r for r in read_manifest(loaded.run / "split.csv") if r.split == "val"]
    if not rows or not all((data_dir / r.path).is_file() for r in rows):
        return None
    data = split_dataset(loaded, rows, "val", DistEnv())
    if data.skipped:
        console.warn(f"{len(data.skipped)} validation images are unreadable and left out of the checks")
    dataset = data.datasets.get("val")
    if dataset is None or len(dataset) == 0:
        return None
    return eval_loader(dataset, 32, DistEnv(), workers=loaded.runtime.workers, pin_memory=loaded.runtime.pin_memory)


class _Calibration:
    """onnxruntime's CalibrationDataReader over the validation batches: ``{input: float32 batch}``."""

    def __init__(self, loader, normalize: nn.Module, input_name: str, limit: int):
        self.batches = _normalised(loader, normalize, limit)
        self.input_name = input_name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch[0].numpy()}

    def rewind(self) -> None:  # onnxruntime >= 1.17 calls it before a second pass; one pass is enough here
        return None


def _normalised(loader, normalize: nn.Module, limit: int | None = None):
    """``(float32 NCHW batch, labels)`` in the model's preprocessing, on the CPU."""
    seen = 0
    for images, labels, _ in loader:
        if limit is not None and seen >= limit:
            return
        x = normalize(images).contiguous()
        yield x, labels.numpy()
        seen += len(labels)


def _quantize(float_path: Path, out: Path, mode: str, loader, loaded: LoadedRun, onnx) -> None:
    """int8 ``out`` from ``float_path`` with onnxruntime's quantisation tools."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from facecls.data.transforms import Normalize

    prepared = out.with_name(f".{out.stem}.pre.onnx")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        # onnxruntime's tools print and log (to the root logger) notes that are not the user's to act on
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_logging():
            warnings.simplefilter("ignore")
            # shape inference + onnxruntime's graph optimisations first, as onnxruntime's docs advise. Its
            # symbolic shape inference (meant for transformers' dynamic shapes) stops at the Expand of the
            # heads' L2 normalisation (onnxruntime 1.32); ONNX's own shape inference covers these CNNs.
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            if mode == "dynamic":
                quantize_dynamic(str(prepared), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
            else:
                normalize = Normalize(loaded.preprocess.mean, loaded.preprocess.std)
                name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
                quantize_static(
                    str(prepared),
                    str(tmp),
                    _Calibration(loader, normalize, name, CALIBRATION_IMAGES),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
        os.replace(tmp, out)
    except FaceclsError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise anything on a graph they cannot handle
        raise FaceclsError(f"{mode} int8 quantisation failed: {first_line(exc, 300)}") from None
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        for extra in out.parent.glob(f".{out.stem}.pre.onnx*"):
            extra.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@torch.inference_mode()
def _measure(summary: ExportSummary, loader, network: nn.Module, loaded: LoadedRun, fp32: OnnxModel, int8) -> None:
    """PyTorch (float32, the unfolded model) against onnxruntime on every validation image."""
    from facecls.data.transforms import Normalize

    normalize = Normalize(loaded.preprocess.mean, loaded.preprocess.std)
    labels, torch_pred, fp32_pred, int8_pred, diff = [], [], [], [], 0.0
    for x, y in _normalised(loader, normalize):
        ref = network(x)
        got = fp32(x)
        diff = max(diff, float((got - ref).abs().max()))
        labels.append(y)
        torch_pred.append(ref.argmax(1).numpy())
        fp32_pred.append(got.argmax(1).numpy())
        if int8 is not None:
            int8_pred.append(int8(x).argmax(1).numpy())
    labels = np.concatenate(labels)
    torch_pred, fp32_pred = np.concatenate(torch_pred), np.concatenate(fp32_pred)
    summary.validation_images = int(len(labels))
    summary.max_abs_diff = diff
    if summary.output == "logits":
        summary.labels_identical = bool((torch_pred == fp32_pred).all())
        summary.top1_pytorch = float((torch_pred == labels).mean())
        summary.top1_onnx_fp32 = float((fp32_pred == labels).mean())
        if int8 is not None:
            summary.top1_onnx_int8 = float((np.concatenate(int8_pred) == labels).mean())


def _report(summary: ExportSummary, console: Console) -> None:
    folded = summary.batchnorm_before - summary.batchnorm_after
    console.log(
        f"BatchNorm: {folded} of {summary.batchnorm_before} folded; simplified with {summary.simplifier}; "
        "onnx.checker passed"
    )
    if summary.max_abs_diff is not None:
        ok = summary.max_abs_diff <= PARITY_TOLERANCE
        console.log(
            f"onnxruntime fp32 vs PyTorch on {summary.validation_images} validation images: max |diff| "
            f"{summary.max_abs_diff:.2e}"
            + ("" if ok else f" (above {PARITY_TOLERANCE:g})")
            + ("" if summary.labels_identical is None else f", labels identical: {summary.labels_identical}")
        )
    if summary.top1_onnx_fp32 is not None:
        line = (
            f"validation top-1: PyTorch {100 * summary.top1_pytorch:.2f}%, "
            f"ONNX fp32 {100 * summary.top1_onnx_fp32:.2f}%"
        )
        if summary.top1_onnx_int8 is not None:
            change = 100 * (summary.top1_onnx_int8 - summary.top1_onnx_fp32)
            line += f", ONNX int8 ({summary.quantization}) {100 * summary.top1_onnx_int8:.2f}% ({change:+.2f} points)"
        console.log(line)
    for note in summary.notes:
        console.warn(note)
    size_mb = summary.model.stat().st_size / 1e6
    console.print_result(f"wrote {summary.model} ({size_mb:.1f} MB, {summary.output}); log: {summary.log}")
