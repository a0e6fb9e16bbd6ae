"""Activation recomputation ("gradient checkpointing"): trade one more forward for memory.

The problem. Every Function the forward records keeps what its backward will read (inputs,
softmax probabilities, normalisation statistics, ...) until backward reaches it. For a deep
model those saved arrays, all layers' worth of them, are most of the memory of a training step.

The idea. `y = recompute(fn, x)` runs `fn(x)` with graph recording off, so nothing inside fn is
saved, and records a single node in its place that keeps only the input array x (and fn). When
backward reaches the node with the gradient gy = dL/dy, the node runs fn(x) again, this time
recording, on a detached copy x' of x (a fresh leaf, requires_grad as x had), back-propagates gy
through that fresh graph with an ordinary `Tensor.backward`, and hands x'.grad = dL/dx back to the
outer backward as the gradient of its input. So at any moment only one checkpointed segment's
activations exist: the one whose backward is running.

Why the gradients are the same. Reverse mode needs two things at the node: the vector-Jacobian
products
    dL/dx = gy . df/dx(x; theta)        and        dL/dtheta += gy . df/dtheta(x; theta)
for fn's input x and for the leaves theta that fn reads from its closure (a layer's parameters).
Without checkpointing the engine gets them by walking fn's recorded subgraph backwards, using the
arrays saved by the forward. With it, fn is re-run on the same array x and reads the same
parameters theta. fn is deterministic (the same ops on the same arrays give the same arrays), so
every Function of the re-run computes and saves exactly what the original forward would have
saved: the recomputed graph IS the graph the forward would have recorded, only built later.
Walking it back from the same gy then performs the same backward computations and gives the same
dL/dx and the same contributions to theta's gradients:
  * dL/dx: the inner leaf x' sums the contributions of x's uses inside fn, which is what the
    outer backward would have summed into x's gradient from those same uses;
  * theta: the inner backward accumulates into `theta.grad` itself, as the outer one would have.
Equal as numbers, not merely close, on NumPy: the only freedom is the order of floating-point
additions where a gradient has several contributions (x' sums fn's uses before the outer backward
adds anything else, and the inner walk visits fn's Functions in its own order). With two
contributions a + b = b + a exactly; with three or more the last bits may differ. In Gemma 3 every
checkpointed layer input has two uses (norm and residual) and every parameter one use per layer,
so on NumPy training with recompute gives the same bits (tests/test_recompute.py and
tests/test_train.py check to 1e-12 in float64 and 1e-6 in float32).
What fn must therefore be: a pure function of its inputs and closure. No side effects (it runs
twice: a KV cache would be appended to twice), no randomness that differs between the runs
(dropout would need its seed replayed), the same parameter values and the same kernel settings
(fast path on or off) at backward time as at forward time. The forwards are deterministic in this
sense: NumPy and CuPy array code, and on the fast path fused kernels (no atomic additions in any
forward) and cuBLAS GEMMs (same call, same GPU, same bits), so the recomputed activations are the
original ones, bit for bit. The ops compute the same values with recording on or off; recording
only decides what they keep.
On the GPU, the gradients are not bit-reproducible in two places, with or without recompute:
  * scatter-adds run on atomic additions, whose order varies from run to run: the embedding's
    weight gradient (the fast path's kernel in kernels/embedding.py, float32 atomicAdd; otherwise
    cupy.add.at) and the backward of indexing with integer arrays (cupy.add.at). With repeated
    ids their sums differ in the last bits between any two backward passes, so two GPU runs, or
    a run with recompute and one without, agree only that closely where such a sum is involved
    (in Gemma 3 the embedding lies outside the checkpointed layers, but its gradient and every
    update after it are affected all the same);
  * inside fn the segment's input x' is a leaf, which is offered no in-place target
    (grad_sum.py), so a sum that a fast-path kernel would add into the outer graph's target
    (rounding once) is made by a separate addition instead (rounding the kernel's result first):
    the last bits of x's gradient can differ.
So tests/test_recompute.py's GPU test compares the fp16 fast path with and without recompute to
a tolerance (1e-3 of each gradient's largest entry), not bit for bit.

Cost: one more forward of fn per backward (about a third more arithmetic for a transformer
layer, whose backward costs about two forwards), for not keeping fn's activations between the
forward and the backward.

Decisions, case by case:
  * Inputs that do not require grad (and integer tensors) are recomputed from detached copies
    without requires_grad; their gradient slot is None, as for any Function.
  * Non-Tensor arguments (ints, None, raw arrays, ...) are passed through unchanged to both runs and
    receive no gradient. fn must not mutate them.
  * `params`: the leaves fn reads through its closure (e.g. `layer.parameters()`). fn gets them
    from its closure as always; listing them makes them inputs of the node in the outer graph
    (with a None gradient slot: the inner backward accumulates into their `.grad` directly). Why:
    `Tensor.backward(leaf_hook=...)` calls the hook on every leaf of the graph it walks once that
    leaf's gradient is final, and leaves used only inside fn are not in the outer graph. As inputs
    of the node they are: the outer backward counts the node as one of their uses and calls the
    hook right after the node's backward, or later if another part of the graph (another
    recomputed segment, or an ordinary op) also uses them. That is what data parallelism needs to start a
    bucket's all-reduce during backward (tinygrad3/distributed). A Function's backward never sees
    the hook itself, so reporting the leaves is how they reach it without a change to the engine.
    A closure leaf left out of `params` still gets exactly its gradient, but the hook is not
    called for it in that pass (DataParallel then reduces it in finish(), with no overlap).
  * No input and no listed param requires grad: there is no gradient to send upstream through the
    node, so no node is recorded and fn simply runs, recording as usual (an unlisted closure leaf
    that needs a gradient then still gets it; no memory is saved in that case).
  * no_grad mode: no graph is built anyway, so `recompute` just returns fn(*inputs).
  * A backward called inside no_grad() still records the recompute (the inner graph is needed).
  * A second backward through the node raises, as everywhere in the engine: its first backward
    freed its links and saved input like any Function's; the inner graph is freed by its own walk.
  * No host synchronisation: the recompute runs the same ops on arrays already on the device, the
    gradient gy stays on the device, and the GPU's deferred id checks (backend.defer_check) that
    the inner `Tensor.backward` would wait on at its end are left for the outer backward, which
    raises them at its own end as it does without checkpointing.
"""
from .tensor import Function, Tensor, enable_grad, is_grad_enabled, no_grad


def recompute(fn, *inputs, params=()):
    """fn(*inputs) without keeping fn's activations; fn is re-run during backward (module docstring).

    fn: Tensors (and other arguments) -> one Tensor; deterministic and free of side effects.
    params: leaf tensors fn reads through its closure, reported to backward's leaf_hook.
    """
    params = tuple(params)
    for p in params:
        if not isinstance(p, Tensor) or not p.is_leaf:
            raise TypeError("recompute params must be leaf Tensors (the parameters fn reads from its closure)")
    if not is_grad_enabled():
        return fn(*inputs)
    wanted = any(isinstance(x, Tensor) and x.requires_grad for x in inputs) or any(p.requires_grad for p in params)
    if not wanted:
        return fn(*inputs)
    return Recompute(fn, inputs)(*inputs, *params)


class Recompute(Function):
    """The node that stands for fn in the outer graph: inputs (*args, *params), output fn(*args)."""

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args  # the original arguments, for the forward call only (replaced there)
        self.is_tensor = tuple(isinstance(a, Tensor) for a in args)

    def forward(self, *arrays):
        with no_grad():  # nothing inside fn is recorded, so nothing inside fn is kept
            out = self.fn(*self.args)
        if not isinstance(out, Tensor):
            raise TypeError(f"recompute: fn must return one Tensor, got {type(out).__name__}")
        # What is kept until backward: the arrays of the Tensor arguments (no copies) and the others
        # as they are; the params are read again from fn's closure.
        self.args = arrays[:len(self.is_tensor)]
        self.out_meta = out.shape, out.dtype
        return out.data

    def backward(self, gy):
        """Re-run fn recording on detached copies of the inputs, back-propagate gy through it."""
        args = [Tensor(a, requires_grad=need) if is_tensor else a
                for a, is_tensor, need in zip(self.args, self.is_tensor, self.needs_grad)]
        with enable_grad():  # recording on even when backward runs inside no_grad()
            out = self.fn(*args)
        if not isinstance(out, Tensor) or (out.shape, out.dtype) != self.out_meta:
            got = (out.shape, out.dtype) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"recompute: fn's recomputation gave {got}, its forward gave {self.out_meta}: "
                               "fn must compute the same thing both times")
        if out.requires_grad:  # False: nothing in fn depends on anything that wants a gradient
            out.backward(gy, check_deferred=False)  # the outer backward raises them at its end
        grads = tuple(a.grad if is_tensor else None for a, is_tensor in zip(args, self.is_tensor))
        return grads + (None,) * (len(self.needs_grad) - len(grads))  # params: accumulated in place

