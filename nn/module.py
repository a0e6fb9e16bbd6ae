"""Module and Parameter: named trees of parameters, as in PyTorch.

A Module registers every Parameter and sub-Module assigned to one of its attributes,
so `named_parameters()` walks the tree and yields dotted names ("layers.0.mlp.up_proj.weight")
in the order they were assigned. `state_dict()` / `load_state_dict()` save and restore
by those names.
"""
import numpy as np

from tinygrad3 import Tensor, backend


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates.

    keep_float32: the parameter stays float32 when its module is cast to float16 for
    mixed-precision training (`Module.to(dtype=np.float16)`). Layers set it where autocast
    would never round: norm weights (used as 1 + w, and their gradient is a sum over every
    token of the batch) and embedding tables (the gradient of a row sums every occurrence of
    its token). Both are small next to the GEMM weights, which do go to float16.
    """

    def __init__(self, data, requires_grad=True, keep_float32=False):
        super().__init__(data, requires_grad=requires_grad)
        self.keep_float32 = bool(keep_float32)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def parameter_dtype(param, dtype):
    """The dtype `param` takes when its module is cast to `dtype`."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 and param.keep_float32 else dtype


class StateDictError(KeyError):
    """load_state_dict was given keys or shapes that do not fit the model."""

    def __str__(self):
        return str(self.args[0])


class Module:
    """Base class of every layer and model: subclasses assign Parameters and Modules in __init__."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ----- traversal -----------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        for prefix, module in self.named_modules():
            for name, param in module._parameters.items():
                yield prefix + name, param

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(int(p.size) for p in self.parameters())

    # ----- state ---------------------------------------------------------------------------------
    def state_dict(self):
        """name -> NumPy array (a host copy of every parameter)."""
        return {name: p.numpy() for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, keeping each parameter's device and dtype.

        With strict=True, missing and unexpected keys are an error; a shape mismatch always is.
        Nothing is written unless every key checks out.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        for name in sorted(set(params) & set(state)):
            if tuple(state[name].shape) != params[name].shape:
                problems.append(f"{name}: checkpoint shape {tuple(state[name].shape)} != model shape "
                                f"{params[name].shape}")
        if problems:
            raise StateDictError("state dict does not fit the model (was it saved from a different config?): "
                                 + "; ".join(problems))
        for name in set(params) & set(state):
            p = params[name]
            array = backend.to_device(np.asarray(backend.to_numpy(state[name])), p.device)
            p.data = array.astype(p.dtype, copy=True)
        return self

    # ----- modes and placement -----------------------------------------------------------------
    def train(self, mode=True):
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move (and/or cast) every parameter in place; gradients are dropped.

        Casting to float16 means mixed precision: parameters marked keep_float32 become
        float32 instead (see Parameter)."""
        for p in self.parameters():
            data = p.data if device is None else backend.to_device(p.data, device)
            p.data = data if dtype is None else data.astype(parameter_dtype(p, dtype))
            p.grad = None
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None


class ModuleList(Module):
    """A list of sub-modules registered under the names "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        self._items = []
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._items)), module)
        self._items.append(module)

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]
