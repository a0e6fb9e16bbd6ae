"""Shared fixtures: the array backend under test, the torch reference, a small prepared dataset."""
import numpy as np
import pytest

from data.synthetic import prepare_synthetic
from tinygrad3 import backend


def _cupy_or_skip():
    if not backend.cuda_available():
        pytest.skip("CUDA GPU with CuPy not available (GPU tests run on the device machine)")
    return backend.cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: numpy always, cupy when a GPU is present."""
    return np if request.param == "numpy" else _cupy_or_skip()


@pytest.fixture
def gpu_xp():
    """cupy, or a skip with the reason when no GPU is present (for GPU-only tests)."""
    return _cupy_or_skip()


@pytest.fixture
def torch():
    """torch for reference comparisons; CI installs it, so this skips only on bare machines."""
    return pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[test]'")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """A prepared directory of 400 generated stories (train and validation), one per test module."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    prepare_synthetic(str(out), n_stories=400, seed=0)
    return str(out)
