"""Untrusted files: checkpoints and weights load with weights_only=True; a pickle that would run code is
refused with one clear line, and its code never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from facecls.core.errors import FaceclsError
from facecls.models.weights import read_state_dict

from .conftest import assert_one_line_error, copy_identities, copy_run, tiny_args


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: the classic pickle attack, with a harmless effect."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def craft(path: Path, marker: Path, wrap_as_checkpoint: bool) -> Path:
    """A torch.save file whose unpickling would create ``marker``; proven armed, then disarmed."""
    payload = {"weight": _Payload(marker)}
    state = {"model": payload, "class_names": ["a", "b"], "epoch": 1} if wrap_as_checkpoint else payload
    torch.save(state, path)
    torch.load(path, weights_only=False)  # the control: an unsafe load really runs the code
    assert marker.exists(), "the crafted file must be armed for this test to mean anything"
    marker.unlink()
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


def test_evaluate_refuses_a_crafted_best_checkpoint(run_cli, trained_run, tmp_path, marker):
    run = copy_run(trained_run.run, tmp_path / "run")
    craft(run / "best.ckpt", marker, wrap_as_checkpoint=True)
    result = run_cli("evaluate", run)
    assert_one_line_error(result, "refusing to load", str(run / "best.ckpt"), "could run code")
    assert not marker.exists()


def test_predict_and_resume_refuse_crafted_checkpoints(run_cli, trained_run, tmp_path, marker):
    run = copy_run(trained_run.run, tmp_path / "run", unfinished=True)
    crafted = craft(tmp_path / "crafted.ckpt", marker, wrap_as_checkpoint=True)
    images = trained_run.data.root / "train" / "s1"
    assert_one_line_error(run_cli("predict", run, "--images", images, "--checkpoint", crafted), "refusing to load")
    craft(run / "last.ckpt", marker, wrap_as_checkpoint=True)
    assert_one_line_error(run_cli("train", "--resume", run), "refusing to load", "last.ckpt")
    assert not marker.exists()


def test_training_refuses_crafted_weights(run_cli, faces_data, tmp_path, marker, one_core):
    data = copy_identities(faces_data, tmp_path / "data", identities=2, images=3)
    weights = craft(tmp_path / "crafted.pt", marker, wrap_as_checkpoint=False)
    result = run_cli("train", "--data", data, "--out", tmp_path / "run", "--weights", weights, *tiny_args())
    errors = [line for line in result.error_lines if line.startswith("facecls: error:")]
    assert result.code == 2 and "Traceback" not in result.err and len(errors) == 1, result.err
    assert "refusing to load" in errors[0] and str(weights) in errors[0] and "could run code" in errors[0]
    assert "safetensors" in errors[0]
    assert not marker.exists()


def test_read_state_dict_refuses_pickles_and_reads_plain_tensors(tmp_path, marker):
    crafted = craft(tmp_path / "crafted.pth", marker, wrap_as_checkpoint=False)
    with pytest.raises(FaceclsError, match="refusing to load"):
        read_state_dict(crafted)
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as handle:  # a plain pickle (not torch.save) with the payload
        pickle.dump({"w": _Payload(marker)}, handle)
    with pytest.raises(FaceclsError, match="refusing to load"):
        read_state_dict(tmp_path / "raw.pkl")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(read_state_dict(tmp_path / "plain.pt")["w"], torch.ones(2))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "plain.safetensors")["w"], torch.ones(2))
