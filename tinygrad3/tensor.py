"""Tensor and Function: the whole reverse-mode autograd.

A `Function` computes its forward on raw arrays (NumPy or CuPy) and knows how to
turn the gradient of its output into gradients of its inputs. Calling a Function
on Tensors runs the forward and, when a gradient is wanted, records the call in
a graph.

The graph holds Functions and leaf tensors only: an intermediate Tensor is
represented by the Function that made it (every Function has one output), so
its array is freed as soon as user code drops it, unless a backward saved it.

`Tensor.backward` is the textbook algorithm (read it at the end of this file):
  1. order the Functions so that each comes after every Function it consumes;
  2. walk them in reverse, handing each the gradient of its output, summed over all its uses;
  3. call its backward: the chain rule gives one gradient per input;
  4. add each input's gradient to that input's sum (a leaf's is its `.grad`);
  5. free what the Function saved, so activation memory shrinks as the pass proceeds.
The sums live in an accumulator. `GradSums`, below the loop, is the plain one: every addition
makes a new array. The engine runs its subclass `InPlaceSums` (grad_sum.py): the same sums of
the same terms in the same order, with the speed machinery (sums made in place by the backwards
themselves, gradient buffers, a hook on final leaf gradients, deferred GPU checks).
"""
import contextlib
import threading

import numpy as np

from . import backend

# Grad mode is per thread (as in PyTorch): one thread's no_grad() must not switch off graph
# recording in another, e.g. when the in-process stand-in for data parallelism runs ranks as threads.
_mode = threading.local()


def is_grad_enabled():
    return getattr(_mode, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Inside this block, calls build no graph (inference, optimizer updates); per thread."""
    previous, _mode.grad_enabled = is_grad_enabled(), False
    try:
        yield
    finally:
        _mode.grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    """Inside this block, calls record a graph again, even within no_grad() (per thread)."""
    previous, _mode.grad_enabled = is_grad_enabled(), True
    try:
        yield
    finally:
        _mode.grad_enabled = previous


class Function:
    """One differentiable operation: `forward(*arrays) -> array`, `backward(gy) -> grads`.

    Subclasses keep what their backward needs as plain attributes; everything
    not starting with an underscore is dropped once the backward has run.
    `self.needs_grad[i]` says whether input i wants a gradient, so a forward can
    skip saving what no backward will read and a backward can return None.

    `fresh_grads = True` declares that backward returns new arrays that nothing else
    refers to (not views of one another), so the engine may later add other contributions
    into them in place (grad_sum.py).
    """

    fresh_grads = False

    def __call__(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        self.needs_grad = tuple(t is not None and t.requires_grad for t in tensors)
        record = is_grad_enabled() and any(self.needs_grad)
        if not record:
            self.needs_grad = (False,) * len(inputs)
        out = Tensor(self.forward(*arrays), requires_grad=record)
        if record:
            # A parent is the leaf tensor itself or the Function that produced a non-leaf input.
            self._parents = tuple(
                None if not need else (t if t._creator is None else t._creator)
                for t, need in zip(tensors, self.needs_grad))
            self._out_dtype = out.dtype  # the dtype its output's gradient is summed in
            out._creator = self
        else:
            self._release()
        return out

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    def grad_target(self, i):
        """During backward: an array that input i's gradient may be ADDED into in place, or None.

        It has the shape of input i and holds the gradient summed so far (other uses of the
        input, or earlier backward passes into a leaf's grad_buffer); its dtype may be wider
        than the gradient's (a float32 buffer for float16 weights). A backward that adds its
        gradient into it returns ADDED for that input (grad_sum.py says which arrays are offered).
        """
        targets = getattr(self, "_targets", None)
        return None if targets is None else targets[i]

    def _release(self):
        for name in [k for k in vars(self) if not k.startswith("_")]:
            delattr(self, name)


class Tensor:
    """An n-dimensional array with an optional gradient.

    `data` is the raw NumPy/CuPy array; `grad` is a raw array of the same shape and
    dtype once `backward` has reached this tensor (leaf tensors only).

    `grad_buffer`: None, or an array of the leaf's shape (e.g. float32 for a float16
    weight, a view into an optimizer's flat gradient buffer). When set, backward adds
    the leaf's gradients into it, in its dtype, and leaves `grad` None.
    """

    __array_priority__ = 1000  # make `ndarray + Tensor` defer to Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        if device is not None:
            data = backend.to_device(data, device)
        elif not hasattr(data, "__array_interface__") and not hasattr(data, "__cuda_array_interface__"):
            # Python scalars and lists land on the default device, floats as float32.
            arr = np.asarray(data)
            if dtype is None and arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            data = backend.to_device(arr, backend.default_device())
        if not hasattr(data, "dtype") or not hasattr(data, "shape"):
            data = np.asarray(data)
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got {data.dtype}")
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self.grad_buffer = None
        self._creator = None

    # ----- properties -------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._creator is None)

    @property
    def T(self):
        return self.transpose()

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({backend.to_numpy(self.data)!r}, device={self.device}{grad})"

    def numpy(self):
        """A host (NumPy) copy of the data."""
        return backend.to_numpy(self.data).copy()

    def item(self):
        return backend.to_numpy(self.data).item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """A copy on another device, itself a leaf (use on parameters before building graphs)."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    # ----- operators (implemented in ops.py) -----------------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __pow__(self, other): return ops.pow(self, other)
    def __rpow__(self, other): return ops.pow(other, self)
    def __neg__(self): return ops.neg(self)
    def __getitem__(self, index): return ops.getitem(self, index)

    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def reshape(self, *shape): return ops.reshape(self, *shape)
    def transpose(self, *axes): return ops.transpose(self, *axes)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def astype(self, dtype): return ops.astype(self, dtype)

    # ----- backward (the algorithm; the accumulator GradSums follows) -----------------
    def backward(self, grad=None, leaf_hook=None, check_deferred=True):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad`.

        `grad` is the upstream gradient; for a one-element tensor it defaults to 1.
        The graph is freed as it is walked, so a second backward over it raises.

        `leaf_hook(leaf)`, if given, is called once for every leaf tensor this graph reaches, as
        soon as this pass can add nothing more to `leaf.grad` (its `.grad` may still be None when
        every path to it carried no gradient). Data-parallel training uses it to start reducing a
        gradient across processes while the rest of the backward pass still runs.

        At the end, a failed check that was deferred on the GPU (ids out of range) raises
        (backend.raise_deferred), so no optimizer step takes gradients computed from bad ids.
        check_deferred=False leaves that to the caller: a backward run inside another backward
        (tinygrad3.recompute) must not make the host wait for the GPU half-way.
        """
        grad = _upstream(self, grad)
        root = self._creator
        if root is not None and not hasattr(root, "_parents"):
            raise RuntimeError("this graph was already freed by an earlier backward()")
        order = [] if root is None else _topological_order(root)  # each after all it consumes
        sums = InPlaceSums(order, leaf_hook, check_deferred)
        if root is None:  # self is a leaf: its gradient is grad itself
            sums.add(self, grad)
            sums.finish_leaf(self)
            return
        sums.add(root, grad)
        for fn in reversed(order):           # so fn runs after every Function that consumes it
            gy = sums.pop(fn)                # dL/d(fn's output), summed over all its uses
            if gy is not None:               # None: no path from the root passes through fn
                fn._targets = tuple(sums.target(parent) for parent in fn._parents)  # (in place: grad_target)
                grads = fn.backward(gy)      # the chain rule: dL/d(each input of fn)
                grads = grads if isinstance(grads, tuple) else (grads,)
                sums.returned(fn, gy, grads)  # (in place: which of grads may be summed into later)
                for parent, g in zip(fn._parents, grads):
                    sums.add(parent, g)      # summed per input
            sums.done(fn)                    # (leaf_hook: the leaves whose last use was fn are final)
            _free(fn)                        # what fn saved for its backward, and its links
        sums.close()                         # (deferred GPU checks)


class GradSums:
    """The accumulator of the backward loop, plain: the sums of the gradients received so far.

    Per Function, the gradient of its output (a dict, emptied as the walk proceeds); per leaf,
    its `.grad`. Each contribution is first cast to the dtype of the value it is the gradient of
    (a float16 branch of a float32 sum gets a float16 gradient), then added to the sum so far as
    a new array (the first one is kept as it is). The other methods are the loop's extension
    points, which do nothing here; grad_sum.InPlaceSums, the engine's accumulator, uses them.
    """

    def __init__(self):
        self.out_grads = {}

    def add(self, parent, g):
        """Add g to the gradient of parent: a leaf Tensor, a Function (its output) or None (a constant)."""
        if parent is None or g is None:
            return
        if isinstance(parent, Tensor):
            g = _cast(g, parent.dtype)
            parent.grad = g if parent.grad is None else parent.grad + g
        else:
            g = _cast(g, parent._out_dtype)
            self.out_grads[parent] = g if parent not in self.out_grads else self.out_grads[parent] + g

    def pop(self, fn):
        """The gradient of fn's output, summed over all its uses (None when nothing reached it)."""
        return self.out_grads.pop(fn, None)

    def target(self, parent):
        """Extension point: an array a backward may add parent's gradient into (Function.grad_target)."""
        return None

    def returned(self, fn, gy, grads):
        """Extension point: fn's backward turned gy into grads, which are about to be added."""

    def done(self, fn):
        """Extension point: fn's backward is over (and with it every use of fn's inputs by fn)."""

    def finish_leaf(self, leaf):
        """Extension point: nothing more will be added to leaf's gradient in this pass."""

    def close(self):
        """Extension point: the walk is over."""


def _cast(g, dtype):
    """A gradient has the dtype of its value."""
    return g if g.dtype == dtype else g.astype(dtype)


def _upstream(tensor, grad):
    """The raw gradient backward starts from: grad, or 1 for a one-element tensor."""
    if not tensor.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require grad "
                           "(no input had requires_grad=True, or it was built under no_grad())")
    xp = backend.get_array_module(tensor.data)
    if grad is None:
        if tensor.size != 1:
            raise RuntimeError(f"backward() needs an explicit gradient for a tensor of shape {tensor.shape}")
        grad = xp.ones_like(tensor.data)
    grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=tensor.dtype)
    if grad.shape != tensor.shape:
        raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {tensor.shape}")
    return grad


def _topological_order(root):
    """Functions reachable from root in post-order: each after every Function it consumes."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        fn, finished = stack.pop()
        if finished:
            order.append(fn)
            continue
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        stack.append((fn, True))
        for parent in fn._parents:
            if isinstance(parent, Function) and id(parent) not in visited:
                if not hasattr(parent, "_parents"):
                    raise RuntimeError("part of this graph was already freed by an earlier backward()")
                stack.append((parent, False))
    return order


def _free(fn):
    """Free a Function's saved arrays and its links once its backward has run."""
    fn._release()
    del fn._parents
    fn.__dict__.pop("_targets", None)


from .grad_sum import ADDED, InPlaceSums  # noqa: E402,F401  (the engine's accumulator, a GradSums)
from . import ops  # noqa: E402  (ops needs Tensor and Function defined above)
