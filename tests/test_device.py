"""emtile.device: where a model runs and its autocast (one home for predict, train and bench)."""

import pytest
import torch

from emtile import EmtileError
from emtile.device import AMPS, amp_dtype, autocast, default_amp, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == auto
    with pytest.raises(EmtileError, match="device='tpu' is not a device: choose auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(EmtileError, match="device='meta' is not supported: choose auto, cpu or cuda"):
        resolve_device("meta")


def test_auto_keeps_the_models_device():
    net = torch.nn.Conv2d(1, 1, 1).to("meta")
    assert resolve_device("auto", net) == torch.device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda():
    with pytest.raises(EmtileError, match="device='cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")


def test_amp_modes_and_autocast():
    assert [amp_dtype(a) for a in AMPS] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(EmtileError, match="amp='fp8' is not supported: choose one of None, bf16, fp16"):
        amp_dtype("fp8")
    cpu = torch.device("cpu")
    assert default_amp(cpu) == "bf16"
    layer = torch.nn.Linear(4, 4)
    x = torch.ones(2, 4)
    with autocast(cpu, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert layer(x).dtype == torch.float32
