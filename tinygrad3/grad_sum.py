"""The engine's accumulator: the plain GradSums of tensor.py with the speed machinery.

Tensor.backward's loop is the textbook algorithm over an accumulator (tensor.GradSums). The
engine runs this subclass, `InPlaceSums`. It adds the same terms in the same order as the plain
one; what differs is where the additions happen and who is told. With no grad_buffer set, on
NumPy, every gradient is the plain loop's bit for bit (tests/test_backward_loops.py): t += p
rounds as t + p (when a Linear's input and weight share a dtype; otherwise its product, in the
wider dtype, is added into the target unrounded).

Summing in place. When a value has several uses (a layer input read by the q, k and v
projections), its gradient is a sum. The plain accumulator makes a new array for each addition.
Here a backward may add its contribution into the sum so far itself, when it is offered one
(`Function.grad_target(i)`), and return `ADDED` in that input's slot: a GEMM then adds its
product into the sum (cuBLAS beta = 1) rather than writing a new array that a separate pass adds.
(A GPU kernel that adds into a target rounds once where a separate addition rounds the product
first, so on the fast path the last bits may differ from the plain sum.) An array is offered only
when nothing else can see it ("owned"):
  * a sum made here: a second contribution added to the first, or a cast to the value's dtype;
  * a gradient that a `fresh_grads` Function returned, in one slot only (a new array);
  * the gradient a Function received, passed on unchanged to exactly one input, when that
    gradient was itself owned.
Never an array returned in two slots (an Add hands one array to both its inputs: summing into
it for one would change the other's), nor the caller's upstream gradient.

Gradient buffers. A leaf whose `grad_buffer` is set (e.g. a float32 slice of the optimizer's flat
buffer, nn/optim.py) gets its gradients added into the buffer, in the buffer's dtype, and keeps
`.grad` None; the buffer is the array offered for that leaf.

Final leaves. With a `leaf_hook`, each leaf is reported as soon as every Function that uses it
has run: its gradient for this pass is then final (data parallelism starts its all-reduce).

Deferred checks. At the end, checks the GPU deferred (ids out of range) raise, unless the
caller takes them over (check_deferred=False, a backward inside another backward).
"""
from collections import Counter

from . import backend
from .tensor import GradSums, Tensor


class _Added:
    """The type of ADDED (one instance)."""

    def __repr__(self):
        return "ADDED"


# A backward returns ADDED for input i when it has added input i's gradient into
# grad_target(i) itself, instead of returning the gradient.
ADDED = _Added()


class InPlaceSums(GradSums):
    """GradSums with in-place sums, gradient buffers, a leaf hook and deferred checks (see above).

    order: the Functions the walk will visit (to count each leaf's uses for leaf_hook).
    """

    def __init__(self, order, leaf_hook=None, check_deferred=True):
        super().__init__()
        self.owned = set()       # Functions whose output gradient (in out_grads) may be added into
        self.ownable = set()     # ids of the arrays the running backward returned that its inputs may own
        self.gy_owned = False    # was the running Function's own gradient owned?
        self.leaf_hook, self.check_deferred = leaf_hook, check_deferred
        self.uses = None if leaf_hook is None else _leaf_uses(order)

    def add(self, parent, g):
        if parent is None or g is None or g is ADDED:  # ADDED: the backward added g itself
            return
        if isinstance(parent, Tensor):
            if parent.grad_buffer is None:
                super().add(parent, g)
            else:
                xp = backend.get_array_module(parent.grad_buffer)
                xp.add(parent.grad_buffer, g, out=parent.grad_buffer)
            return
        made_here = parent in self.out_grads or g.dtype != parent._out_dtype  # a sum or a cast
        super().add(parent, g)
        if made_here or id(g) in self.ownable:
            self.owned.add(parent)

    def pop(self, fn):
        self.gy_owned = fn in self.owned
        self.owned.discard(fn)
        return super().pop(fn)

    def target(self, parent):
        """A leaf's grad_buffer, or a Function's output gradient when owned; else None."""
        if isinstance(parent, Tensor):
            return parent.grad_buffer
        return self.out_grads[parent] if parent in self.owned else None

    def returned(self, fn, gy, grads):
        """Check the ADDED slots, and note which returned arrays the inputs may own."""
        for parent, g, target in zip(fn._parents, grads, fn._targets):
            if parent is not None and g is ADDED and target is None:
                raise RuntimeError(f"{type(fn).__name__}.backward returned ADDED for an input that had no "
                                   "grad_target")
        slots = Counter(id(g) for g in grads)
        self.ownable = {id(g) for g in grads
                        if slots[id(g)] == 1 and (fn.fresh_grads or (g is gy and self.gy_owned))}

    def done(self, fn):
        """One use fewer for each of fn's leaf inputs; the leaves with none left are final."""
        if self.uses is None:
            return
        for parent in fn._parents:
            if isinstance(parent, Tensor):
                self.uses[id(parent)] -= 1
                if self.uses[id(parent)] == 0:
                    self.finish_leaf(parent)

    def finish_leaf(self, leaf):
        if self.leaf_hook is not None:
            self.leaf_hook(leaf)

    def close(self):
        if self.check_deferred:
            backend.raise_deferred()


def _leaf_uses(order):
    """id(leaf) -> how many input slots of the graph's Functions take that leaf."""
    uses = {}
    for fn in order:
        for parent in fn._parents:
            if isinstance(parent, Tensor):
                uses[id(parent)] = uses.get(id(parent), 0) + 1
    return uses
