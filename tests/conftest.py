import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
