"""Tensor and Function: the whole reverse-mode autograd in one file.

A `Function` computes its forward on raw arrays (NumPy or CuPy) and knows how to
turn the gradient of its output into gradients of its inputs. Calling a Function
on Tensors runs the forward and, when a gradient is wanted, records the call in
a graph.

The graph holds Functions and leaf tensors only: an intermediate Tensor is
represented by the Function that made it (every Function has one output), so
its array is freed as soon as user code drops it, unless a backward saved it.
`Tensor.backward` visits the Functions in reverse topological order, hands each
one the gradient summed over all uses of its output, and then releases what the
Function saved, so activation memory shrinks as the backward pass proceeds.

Summing in place. When a value has several uses (a layer input read by the q, k and v
projections), its gradient is a sum. By default the engine adds each new contribution to
the sum so far. A backward may instead add its contribution into that sum itself, when the
engine offers it (`Function.grad_target(i)`), and return `ADDED` in that input's slot: a GEMM
then adds its product into the sum (cuBLAS beta = 1) rather than writing a new array that a
separate pass adds. The engine offers only arrays that nothing else can see: sums it made
itself, gradients a Function declares new (`fresh_grads`), and a leaf's `grad_buffer`.
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


class _Added:
    """The type of ADDED (one instance)."""

    def __repr__(self):
        return "ADDED"


# A backward returns ADDED for input i when it has added input i's gradient into
# grad_target(i) itself, instead of returning the gradient.
ADDED = _Added()


class Function:
    """One differentiable operation: `forward(*arrays) -> array`, `backward(gy) -> grads`.

    Subclasses keep what their backward needs as plain attributes; everything
    not starting with an underscore is dropped once the backward has run.
    `self.needs_grad[i]` says whether input i wants a gradient, so a forward can
    skip saving what no backward will read and a backward can return None.

    `fresh_grads = True` declares that backward returns new arrays that nothing else
    refers to (not views of one another), so the engine may later add other contributions
    into them in place.
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
            self._out_grad = None
            self._out_grad_owned = False  # may _out_grad be summed into in place?
            self._out_dtype = out.dtype
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
        gradient into it returns ADDED for that input.
        """
        targets = getattr(self, "_targets", None)
        return None if targets is None else targets[i]

    def _release(self):
        for name in [k for k in vars(self) if not k.startswith("_")]:
            delattr(self, name)


def _accumulate(current, g):
    return g if current is None else current + g


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

    # ----- backward -----------------------------------------------------------------
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
        (tinygrad3.checkpoint) must not make the host wait for the GPU half-way.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was built under no_grad())")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() needs an explicit gradient for a tensor of shape {self.shape}")
            grad = xp.ones_like(self.data)
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {self.shape}")
        if self._creator is None:
            _give_leaf(self, grad)
            if leaf_hook is not None:
                leaf_hook(self)
            return
        root = self._creator
        if not hasattr(root, "_parents"):
            raise RuntimeError("this graph was already freed by an earlier backward()")
        root._out_grad = grad
        order = _topological_order(root)
        # A leaf's gradient is final once every Function that consumes it has run; counting those
        # uses up front lets the walk tell the moment without a second pass over the graph.
        uses = _leaf_uses(order) if leaf_hook is not None else None
        for fn in reversed(order):
            gy, fn._out_grad = fn._out_grad, None
            if gy is not None:  # None: no path from the root passes through this output
                _backward_one(fn, gy, fn._out_grad_owned)
            if uses is not None:
                _count_down(fn, uses, leaf_hook)
            _drop(fn)
        if check_deferred:
            backend.raise_deferred()

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


def _match(g, like):
    """Cast a gradient to the leaf's dtype (a leaf's grad always has the leaf's dtype)."""
    return g if g.dtype == like.dtype else g.astype(like.dtype)


def _backward_one(fn, gy, gy_owned):
    """Run one Function's backward and hand each gradient to its parent.

    Before the call the Function learns, per input, where it may add its gradient in place
    (grad_target): a leaf's grad_buffer, or a non-leaf's sum so far when the engine owns it.
    After it, ownership of each handed-on gradient is decided: new arrays of a `fresh_grads`
    Function, sums and casts the engine made, and gy itself passed through to exactly one input
    (nothing else holds it once this backward is done) may be summed into later.
    """
    fn._targets = tuple(_target(parent) for parent in fn._parents)
    grads = fn.backward(gy)
    if not isinstance(grads, tuple):
        grads = (grads,)
    slots = {}
    for g in grads:
        slots[id(g)] = slots.get(id(g), 0) + 1
    for parent, g, target in zip(fn._parents, grads, fn._targets):
        if parent is None or g is None:
            continue
        if g is ADDED:
            if target is None:
                raise RuntimeError(f"{type(fn).__name__}.backward returned ADDED for an input that had no "
                                   "grad_target")
            continue
        if isinstance(parent, Tensor):
            _give_leaf(parent, g)
            continue
        owned = slots[id(g)] == 1 and (fn.fresh_grads or (g is gy and gy_owned))
        if g.dtype != parent._out_dtype:  # a gradient has its tensor's dtype (fp16 branch of an fp32 sum)
            g, owned = g.astype(parent._out_dtype), True
        if parent._out_grad is None:
            parent._out_grad, parent._out_grad_owned = g, owned
        else:
            parent._out_grad, parent._out_grad_owned = parent._out_grad + g, True


def _target(parent):
    """The array a backward may add parent's gradient into, or None."""
    if isinstance(parent, Tensor):
        return parent.grad_buffer
    if parent is not None and parent._out_grad_owned:
        return parent._out_grad
    return None


def _give_leaf(leaf, g):
    """Add g to a leaf's gradient: into its grad_buffer when it has one, else into `.grad`."""
    if leaf.grad_buffer is None:
        leaf.grad = _accumulate(leaf.grad, _match(g, leaf.data))
    else:
        xp = backend.get_array_module(leaf.grad_buffer)
        xp.add(leaf.grad_buffer, g, out=leaf.grad_buffer)


def _leaf_uses(order):
    """id(leaf) -> how many input slots of the graph's Functions take that leaf."""
    uses = {}
    for fn in order:
        for parent in fn._parents:
            if isinstance(parent, Tensor):
                uses[id(parent)] = uses.get(id(parent), 0) + 1
    return uses


def _count_down(fn, uses, leaf_hook):
    """fn has run: one use fewer for each of its leaf parents; call the hook on those now final."""
    for parent in fn._parents:
        if isinstance(parent, Tensor):
            uses[id(parent)] -= 1
            if uses[id(parent)] == 0:
                leaf_hook(parent)


def _drop(fn):
    """Free a Function's saved arrays and its links once its backward has run."""
    fn._release()
    del fn._parents
    fn.__dict__.pop("_targets", None)


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


from . import ops  # noqa: E402  (ops needs Tensor and Function defined above)
