"""The Tensor operators: arithmetic with broadcasting, reductions, shape ops, exp/log, indexing.

Each class is one Function: a forward on raw arrays and a backward whose docstring
derives it. Broadcasting in a forward means an input was (virtually) repeated, so
the backward sums the gradient over the repeated axes (`unbroadcast`).
"""
from . import backend
from .tensor import Function, Tensor


def unbroadcast(g, shape):
    """Sum g down to `shape`: the adjoint of NumPy broadcasting.

    Broadcasting copies an input along new leading axes and along axes of size 1;
    a copied value receives the sum of the gradients of all its copies.
    """
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        """d(a+b)/da = d(a+b)/db = 1 (a constant operand gets nothing: no reduction is wasted on it)."""
        return (unbroadcast(gy, self.shapes[0]) if self.needs_grad[0] else None,
                unbroadcast(gy, self.shapes[1]) if self.needs_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        """d(a-b)/da = 1, d(a-b)/db = -1."""
        return (unbroadcast(gy, self.shapes[0]) if self.needs_grad[0] else None,
                unbroadcast(-gy, self.shapes[1]) if self.needs_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, gy):
        """d(ab)/da = b, d(ab)/db = a."""
        ga = unbroadcast(gy * self.b, self.shapes[0]) if self.needs_grad[0] else None
        gb = unbroadcast(gy * self.a, self.shapes[1]) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        """d(a/b)/da = 1/b, d(a/b)/db = -a/b^2."""
        ga = unbroadcast(gy / self.b, self.a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(-gy * self.a / (self.b * self.b), self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, gy):
        """d(a^b)/da = b a^(b-1), d(a^b)/db = a^b log(a) (defined for a > 0)."""
        xp = backend.get_array_module(self.a)
        ga = unbroadcast(gy * self.b * self.a ** (self.b - 1), self.a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(gy * self.y * xp.log(self.a), self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        """d(-a)/da = -1."""
        return -gy


class MatMul(Function):
    """NumPy matmul semantics: the last two axes multiply, leading axes broadcast."""

    def forward(self, a, b):
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        self.shapes = a.shape, b.shape
        return a @ b

    def backward(self, gy):
        """For Y = A B: dL/dA = dL/dY B^T and dL/dB = A^T dL/dY.

        Element-wise, Y[i,j] = sum_k A[i,k] B[k,j], so dY[i,j]/dA[i,k] = B[k,j]; summing over j gives
        (G B^T)[i,k]. Vectors are treated as a row (for A) or a column (for B) and squeezed back.
        """
        (sa, sb), xp = self.shapes, backend.get_array_module(gy)
        a_vec, b_vec = len(sa) == 1, len(sb) == 1
        if b_vec:
            gy = xp.expand_dims(gy, -1)
        if a_vec:
            gy = xp.expand_dims(gy, -2)
        ga = gb = None
        if self.needs_grad[0]:
            b = self.b[:, None] if b_vec else self.b
            ga = gy @ xp.swapaxes(b, -1, -2)
            ga = unbroadcast(ga[..., 0, :] if a_vec else ga, sa)
        if self.needs_grad[1]:
            a = self.a[None, :] if a_vec else self.a
            gb = xp.swapaxes(a, -1, -2) @ gy
            gb = unbroadcast(gb[..., 0] if b_vec else gb, sb)
        return ga, gb


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _expand_reduced(g, shape, axes):
    """Reinsert reduced axes as size 1 so g broadcasts against the input shape."""
    xp = backend.get_array_module(g)
    for a in axes:
        if g.ndim < len(shape):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, shape)


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.shape = a.shape
        self.axes = _axes(self.axis, a.ndim)
        return a.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        """Each summed element contributes with weight 1: broadcast gy back over the reduced axes."""
        return _expand_reduced(gy, self.shape, () if self.keepdims else self.axes)


class Mean(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.shape = a.shape
        self.axes = _axes(self.axis, a.ndim)
        return a.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        """mean = sum / n over the reduced axes: each element gets gy / n."""
        n = 1
        for a in self.axes:
            n *= self.shape[a]
        g = _expand_reduced(gy, self.shape, () if self.keepdims else self.axes)
        return g / gy.dtype.type(n)


class Max(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.a = a
        self.axes = _axes(self.axis, a.ndim)
        self.y = a.max(axis=self.axes, keepdims=True)
        return self.y if self.keepdims else self.y.reshape(
            tuple(n for i, n in enumerate(a.shape) if i not in self.axes))

    def backward(self, gy):
        """y = max_i a_i over the reduced axes. With one maximum a_j, dy/da = e_j. Where k >= 2
        entries tie for the maximum, y is not differentiable: raising a tied a_i moves y at rate 1,
        lowering it moves y at rate 0. The subgradients there are the convex combinations of the
        tied e_i (weights >= 0 summing to 1); this backward takes the even one, gy / k to each
        tied maximum (mask / count) and 0 elsewhere: symmetric in the ties, the subgradient of
        least norm, and exact along moves that shift all tied entries together (y moves with
        them). torch.amax and the full torch.max() split the same way; torch.max(dim) gives all of
        gy to the one index it returns."""
        mask = (self.a == self.y).astype(gy.dtype)
        count = mask.sum(axis=self.axes, keepdims=True)
        g = gy if self.keepdims else _expand_reduced(gy, self.y.shape, self.axes)
        return mask * (g / count)


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, a):
        self.in_shape = a.shape
        return a.reshape(self.shape)

    def backward(self, gy):
        """A reshape only renames positions: reshape the gradient back."""
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, a):
        self.axes = self.axes or tuple(reversed(range(a.ndim)))
        return a.transpose(self.axes)

    def backward(self, gy):
        """A permutation of axes is undone by the inverse permutation (computed on the host:
        an argsort on the GPU would cost a device sync)."""
        inverse = [0] * len(self.axes)
        for position, axis in enumerate(self.axes):
            inverse[axis] = position
        return gy.transpose(inverse)


class Exp(Function):
    def forward(self, a):
        self.y = backend.get_array_module(a).exp(a)
        return self.y

    def backward(self, gy):
        """d exp(a)/da = exp(a), which is the output itself."""
        return gy * self.y


class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.get_array_module(a).log(a)

    def backward(self, gy):
        """d log(a)/da = 1/a."""
        return gy / self.a


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, gy):
        """Indexing picks elements; each picked element's gradient goes back to where it came from.
        An index may pick one element several times, so the scatter adds."""
        xp = backend.get_array_module(gy)
        g = xp.zeros(self.shape, dtype=gy.dtype)
        return backend.scatter_add(g, self.index, gy)


class AsType(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, a):
        self.in_dtype = a.dtype
        return a.astype(self.dtype)

    def backward(self, gy):
        """A cast is the identity on values: cast the gradient back to the input's dtype."""
        return gy.astype(self.in_dtype)


# ----- the functions Tensor's operators call ------------------------------------------------

def as_operand(x, like):
    """Turn a Python number or array into a constant array that matches tensor `like`.

    A number becomes a 0-d array made by `full` (on the GPU a fill kernel that carries the value
    as an argument) rather than copied from the host: a host-to-device copy captured into a CUDA
    graph would read its host buffer again at every replay, long after that buffer was reused.
    """
    if isinstance(x, Tensor):
        return x
    xp = backend.get_array_module(like.data)
    if type(x) in (bool, int, float):  # not NumPy scalars: those keep their own dtype below
        return xp.full((), x, dtype=like.dtype)
    return xp.asarray(x, dtype=like.dtype if not hasattr(x, "dtype") else x.dtype)


def _binary(fn_class, a, b):
    if not isinstance(a, Tensor):
        a = as_operand(a, b)
    if not isinstance(b, Tensor):
        b = as_operand(b, a)
    return fn_class()(a, b)


def add(a, b): return _binary(Add, a, b)
def sub(a, b): return _binary(Sub, a, b)
def mul(a, b): return _binary(Mul, a, b)
def div(a, b): return _binary(Div, a, b)
def pow(a, b): return _binary(Pow, a, b)
def matmul(a, b): return _binary(MatMul, a, b)
def neg(a): return Neg()(a)
def sum(a, axis=None, keepdims=False): return Sum(axis, keepdims)(a)
def mean(a, axis=None, keepdims=False): return Mean(axis, keepdims)(a)
def max(a, axis=None, keepdims=False): return Max(axis, keepdims)(a)
def exp(a): return Exp()(a)
def log(a): return Log()(a)
def astype(a, dtype): return AsType(dtype)(a)


def reshape(a, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(shape)(a)


def transpose(a, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose(axes or None)(a)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem(index)(a)
