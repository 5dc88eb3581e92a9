"""One device rule for every job: auto picks the GPU when there is one; a wrong name is a clear error."""

import pytest
import torch

from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError


def test_auto_and_none_pick_the_gpu_only_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_an_unknown_device_names_the_choices():
    with pytest.raises(LmaddaError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
