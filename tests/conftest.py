import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

from sgfx.runtime.allocator import enable_huge_pages  # noqa: E402

enable_huge_pages()  # before the first tensor, as the CLI does: the suite runs faster (sgfx.runtime.allocator)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def solved_hessians(monkeypatch):
    """Every Hessian an OBS solve (SparseGPT's blocked one or the exact N:M one) receives during the test:
    (weight shape, float64 copy), in call order (``dict(solved_hessians)[shape]`` is the last one of that shape)."""
    import sgfx.engine.layer_step as engine

    calls = []

    def spying(real):
        def spy(weight, hessian, *args, **kwargs):
            calls.append((tuple(weight.shape), hessian.detach().double().clone()))
            return real(weight, hessian, *args, **kwargs)
        return spy

    for solver in ("sparsegpt_prune", "exact_nm_prune"):
        monkeypatch.setattr(engine, solver, spying(getattr(engine, solver)))
    return calls
