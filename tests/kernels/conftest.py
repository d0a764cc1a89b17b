"""Kernel tests run the Triton kernels on CUDA when present, else under TRITON_INTERPRET=1.

The variable must be set before any Triton kernel is defined (decorated), so it is set here,
before the test modules import kernels.triton_lora.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
