"""tinygrad3: a small reverse-mode autograd engine over NumPy (CPU) and CuPy (GPU) arrays."""
from . import backend
from .backend import cuda_available, default_device, get_array_module
from .tensor import ADDED, Function, Tensor, enable_grad, is_grad_enabled, no_grad
from .gradcheck import gradcheck
from . import functional

__all__ = ["Tensor", "Function", "ADDED", "no_grad", "enable_grad", "is_grad_enabled", "gradcheck", "functional",
           "backend", "get_array_module", "default_device", "cuda_available"]
