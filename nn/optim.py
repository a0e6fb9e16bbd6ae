"""AdamW over flat buffers, holding float32 master weights for mixed-precision training.

Layout. At construction every trainable parameter is copied into ONE flat master buffer
(float32; float64 for float64 parameters), next to flat moment buffers m and v and a flat
gradient buffer. Decayed parameters come first, so weight decay touches the prefix
`master[:num_decayed]` and needs no mask. Each parameter's `.data` is then re-bound to a view
into a flat "compute" buffer of the parameters' own dtype:

  * float32 (or float64) parameters: the compute buffer IS the master buffer, so the update
    writes the model's weights directly, with no copy;
  * fp16 parameters: the compute buffer is a separate fp16 array, refreshed from the masters
    after every update with one cast-copy. Forward and backward run in fp16; the update runs
    in float32, where a small step `lr * update` is not rounded away against a large weight.
  * mixed fp16 and float32 parameters (mixed precision keeps norm weights and embeddings in
    float32, see nn.Parameter): the float32 ones are views of the master buffer, the fp16 ones
    views of the fp16 compute buffer, which spans the masters from the first fp16 parameter to
    the end of the last (`_compute_span`); float32 parameters outside that span (the embedding
    table, the norm weights after the decayed matrices) take no fp16 memory.

Every step is a handful of whole-buffer operations, whatever the number of parameters. With
the fast path's "adamw" family on and float32 CuPy masters, the clip, the update and the
refresh of the fp16 copy run as one kernel (tinygrad3/kernels/adamw.py), with the same result,
and the parameters' gradients are added into the flat gradient buffer with one launch
(tinygrad3/kernels/flat_grads.py) instead of one copy per parameter.

Gradients reach the flat buffer in three ways. `step` adds in the parameters' `.grad` (which the
engine has summed over the micro-batches). A caller may also add gradients earlier with
`accumulate_grads`. Or, inside `with opt.grads_in_buffer():`, backward itself adds each
parameter's gradient into the parameter's slice of the buffer (its `grad_buffer`): the weight
GEMMs write there in float32 (cuBLAS beta = 1), and no per-parameter gradient array is made at
all (nn/graphed_step.py trains this way). The buffer is float32, so micro-batches added there
accumulate in float32. `step` and `zero_grad` leave the buffer at zero for the next update.

Build the optimizer AFTER loading weights: `Module.load_state_dict` and `Module.to` replace
`.data` with new arrays, which cuts the parameters loose from the flat buffers. If that happens
afterwards, call `opt.sync_params()` to take the new values as masters and re-bind.
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np

from tinygrad3 import backend, kernels
from tinygrad3.kernels import adamw, flat_grads
from .arguments import non_negative_float, positive_float

# The dtype the masters and moments are kept in, for each parameter dtype.
MASTER_DTYPE = {np.dtype(np.float16): np.dtype(np.float32),
                np.dtype(np.float32): np.dtype(np.float32),
                np.dtype(np.float64): np.dtype(np.float64)}


@dataclass(frozen=True)
class StepResult:
    """What one `AdamW.step` did.

    found_inf: the unscaled gradients held an inf/NaN, so nothing was updated (the step is skipped).
    grad_norm: global L2 norm of the unscaled gradients before clipping (inf/NaN when skipped).
    clip_coef: the factor the gradients were multiplied by (1.0 when not clipped or skipped).
    """
    found_inf: bool
    grad_norm: float
    clip_coef: float


class AdamW:
    """AdamW with decoupled weight decay, over one flat buffer of all parameters.

    named_parameters: iterable of (name, Parameter), e.g. `model.named_parameters()`. Parameters
        with requires_grad=False are left alone; a parameter listed twice (tied weights) is kept once.
    lr: the learning rate used when `step` is not given one (a schedule passes its own each step).
    weight_decay: applied to parameters with ndim >= 2, except embeddings (names containing
        "embed_tokens") unless decay_embeddings=True. Norm weights and other 1-D parameters never decay.
    no_decay: optional predicate (name, param) -> True to exempt a parameter; replaces that rule.
    """

    def __init__(self, named_parameters, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 decay_embeddings=False, no_decay=None):
        self.lr = non_negative_float("lr", lr)
        self.betas = _check_betas(betas)
        self.eps = positive_float("eps", eps)  # 0 would divide 0 by 0 where a gradient is always 0
        self.weight_decay = non_negative_float("weight_decay", weight_decay)
        self.decay_embeddings = bool(decay_embeddings)
        self.step_count = 0

        def exempt(name, param):
            if no_decay is not None:
                return bool(no_decay(name, param))
            return param.ndim < 2 or ("embed_tokens" in name and not self.decay_embeddings)

        decayed, undecayed, seen = [], [], set()
        for name, param in named_parameters:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (undecayed if exempt(name, param) else decayed).append((name, param))
        if not decayed and not undecayed:
            raise ValueError("AdamW was given no trainable parameters")
        entries = decayed + undecayed
        self._names = [name for name, _ in entries]
        self._params = [param for _, param in entries]
        self._num_decayed_params = len(decayed)
        self._check_uniform()

        self.master_dtype = MASTER_DTYPE[np.dtype(self._params[0].dtype)]
        self._xp = xp = backend.get_array_module(self._params[0].data)
        self._slices, start = [], 0
        for param in self._params:
            self._slices.append(slice(start, start + param.size))
            start += param.size
        self.num_decayed = sum(p.size for p in self._params[:self._num_decayed_params])

        self.master = xp.empty(start, dtype=self.master_dtype)
        for param, where in zip(self._params, self._slices):
            self.master[where] = param.data.reshape(-1)
        self.m = xp.zeros_like(self.master)      # first moment: running mean of gradients
        self.v = xp.zeros_like(self.master)      # second moment: running mean of squared gradients
        self._grad = xp.zeros_like(self.master)  # the update's gradients, summed (unscaled by step)
        self._adder = flat_grads.FlatAdder()
        narrow = [(p.dtype, where) for p, where in zip(self._params, self._slices) if p.dtype != self.master_dtype]
        if narrow:
            lo, hi = narrow[0][1].start, narrow[-1][1].stop
            self._compute_span = slice(lo, hi)
            self._compute = xp.empty(hi - lo, dtype=narrow[0][0])
        else:
            lo, self._compute_span, self._compute = 0, slice(0, start), self.master
        self._views = [(self.master[where] if param.dtype == self.master_dtype
                        else self._compute[where.start - lo:where.stop - lo]).reshape(param.shape)
                       for param, where in zip(self._params, self._slices)]
        self._refresh_compute()
        self._bind()

    def _check_uniform(self):
        """One device, one master dtype: float16 and float32 mix (float32 masters), float64 stands alone."""
        first = self._params[0]
        for name, param in zip(self._names, self._params):
            if np.dtype(param.dtype) not in MASTER_DTYPE:
                raise TypeError(f"{name}: AdamW supports float16/float32/float64 parameters, got {param.dtype}")
            if MASTER_DTYPE[param.dtype] != MASTER_DTYPE[first.dtype] or param.device != first.device:
                raise ValueError(f"parameters must share one device and be all float64 or all float16/float32: "
                                 f"{self._names[0]} is {first.dtype} on {first.device} but {name} is "
                                 f"{param.dtype} on {param.device} (cast/move the model before building the optimizer)")

    # ----- introspection ---------------------------------------------------------------------
    @property
    def num_params(self):
        """Number of scalar weights the optimizer updates (num_decayed of them decay)."""
        return int(self.master.size)

    def decayed_names(self):
        return self._names[:self._num_decayed_params]

    def undecayed_names(self):
        return self._names[self._num_decayed_params:]

    def master_of(self, name):
        """The master copy of one parameter (a view into the flat master buffer)."""
        i = self._names.index(name)
        return self.master[self._slices[i]].reshape(self._params[i].shape)

    # ----- the update --------------------------------------------------------------------------
    def zero_grad(self):
        """Forget every gradient: the parameters' `.grad` and the flat buffer's sums."""
        for param in self._params:
            param.grad = None
        self._grad.fill(0)

    def accumulate_grads(self, grads):
        """Add gradients into the flat float32 gradient buffer that the next `step` uses.

        grads: arrays (or None) in the order of `self.params` (`step` uses it for the `.grad`s).
        """
        pieces = []
        for name, param, where, g in zip(self._names, self._params, self._slices, grads):
            if g is None:
                continue
            if g.shape != param.shape:
                raise ValueError(f"{name}: gradient shape {g.shape} != parameter shape {param.shape}")
            pieces.append((g, where.start))
        if kernels.use_fast("adamw", self._grad, dtypes=(np.float32,)) and all(
                kernels.use_fast("adamw", g, dtypes=(np.float16, np.float32)) for g, _ in pieces):
            self._adder.add(self._grad, pieces)
        else:
            for g, start in pieces:
                self._grad[start:start + g.size] += g.reshape(-1)

    @contextlib.contextmanager
    def grads_in_buffer(self):
        """Within this block, backward adds the parameters' gradients straight into the flat
        gradient buffer that the next `step` uses (each parameter's `grad_buffer` is its slice of
        it, reshaped), in the buffer's float32 (float64), and leaves `.grad` None."""
        previous = [param.grad_buffer for param in self._params]
        for param, where in zip(self._params, self._slices):
            param.grad_buffer = self._grad[where].reshape(param.shape)
        try:
            yield
        finally:
            for param, buffer in zip(self._params, previous):
                param.grad_buffer = buffer

    @property
    def grad_buffer(self):
        """The flat gradient buffer the next `step` reads (where `grads_in_buffer` makes backward add)."""
        return self._grad

    @property
    def params(self):
        """The parameters this optimizer updates, in the order of its flat buffers."""
        return list(self._params)

    def step(self, lr=None, inv_scale=1.0, clip_norm=None):
        """One AdamW update from the gradients (the parameters' `.grad` plus whatever
        `accumulate_grads` added since the last step); returns a StepResult.

        inv_scale: multiplies the gradients first (1 / loss scale), in float32.
        clip_norm: clip the global L2 norm of the unscaled gradients to this value.
        The order is: unscale -> inf/NaN check (skip) -> clip -> update -> refresh compute copy.
        """
        lr = self.lr if lr is None else non_negative_float("lr", lr)
        inv_scale = positive_float("inv_scale", inv_scale)
        clip_norm = None if clip_norm is None else positive_float("clip_norm", clip_norm)
        backend.raise_deferred()  # no step from gradients of ids that failed a check on the GPU
        self.accumulate_grads([param.grad for param in self._params])
        try:
            return self._step(self._grad, lr, inv_scale, clip_norm)
        finally:
            self._grad.fill(0)  # the next update accumulates from zero

    def _step(self, grad, lr, inv_scale, clip_norm):
        # Unscaling after the float32 sum matters: in fp16, g / scale could underflow to zero again.
        # One reduction answers both questions: sum(g^2) is inf/NaN exactly when some gradient
        # is inf/NaN (or so large that its square overflows, which would put inf into v), and
        # otherwise it is the squared global norm. float() is a host sync (the result feeds the
        # loss scaler and the log); keeping the flag on the GPU would skip the update there instead.
        if kernels.use_fast("adamw", grad, dtypes=(np.float32,)):
            sum_sq = adamw.unscale_sum_squares(grad, inv_scale)  # both in one pass over the buffer
        else:
            if inv_scale != 1.0:
                grad *= inv_scale
            sum_sq = float(self._xp.dot(grad, grad))
        grad_norm = math.sqrt(sum_sq)  # inf or NaN when sum_sq is
        if not math.isfinite(sum_sq):
            # Skip BEFORE any write: one NaN in m or v would poison every later update (NaN
            # survives every decay), so master, m, v, the step count and the params stay untouched.
            return StepResult(found_inf=True, grad_norm=grad_norm, clip_coef=1.0)

        clip_coef = 1.0
        if clip_norm is not None:
            # Clip the UNSCALED gradients: the scaled ones are `scale` times too large, so clipping
            # them would compare the wrong norm with clip_norm. Same rule as clip_grad_norm_.
            clip_coef = min(1.0, clip_norm / (grad_norm + 1e-6))
        if kernels.use_fast("adamw", self.master, grad, dtypes=(np.float32,)):
            self._fused_update(grad, lr, clip_coef)
        else:
            if clip_coef < 1.0:
                grad *= clip_coef
            self._update(grad, lr)
            self._refresh_compute()
        return StepResult(found_inf=False, grad_norm=grad_norm, clip_coef=clip_coef)

    def _update(self, g, lr):
        """torch.optim.AdamW's update, in its order, on the flat buffers."""
        beta1, beta2 = self.betas
        self.step_count += 1
        t = self.step_count
        # Decoupled weight decay (Loshchilov & Hutter): shrink the weights directly instead of
        # adding wd*p to the gradient. Added to the gradient, the decay would be divided by
        # sqrt(v) like everything else, so weights with large gradients would barely decay.
        if self.num_decayed and self.weight_decay:
            self.master[:self.num_decayed] *= 1.0 - lr * self.weight_decay
        # Exponential moving averages of g and g^2.
        self.m *= beta1
        self.m += (1.0 - beta1) * g
        self.v *= beta2
        self.v += (1.0 - beta2) * g * g
        # Bias correction: m and v start at zero, so after t steps m = (1 - beta1^t) * E[g] (a
        # weighted mean whose weights sum to 1 - beta1^t, not 1); dividing by that sum undoes
        # the pull towards zero, which is strong in early steps (v especially, beta2 near 1).
        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2 = 1.0 - beta2 ** t
        # p -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bc1 and v_hat = v / bc2;
        # eps is added after the bias correction, as torch does.
        denom = self._xp.sqrt(self.v) / math.sqrt(bias_correction2) + self.eps
        self.master -= (lr / bias_correction1) * self.m / denom

    def _fused_update(self, g, lr, clip_coef):
        """The clip, `_update` and `_refresh_compute` in one kernel launch, rounding as they do.

        The unscale stays out of this kernel, in the pass that also takes the norm (`_step`,
        adamw.unscale_sum_squares): the norm must be of the UNSCALED gradients, whose squares do
        not overflow float32 where the scaled ones could, and g * inv_scale * clip must round as
        the two separate products do.
        """
        self.step_count += 1
        compute = None if self._compute is self.master else self._compute
        adamw.update(self.master, self.m, self.v, g, compute, coef=clip_coef, lr=lr,
                     weight_decay=self.weight_decay, num_decayed=self.num_decayed, betas=self.betas,
                     eps=self.eps, step=self.step_count, compute_start=self._compute_span.start)

    def _refresh_compute(self):
        """fp16 parameters: write the freshly updated masters into the fp16 copy (one cast-copy)."""
        if self._compute is not self.master:
            self._xp.copyto(self._compute, self.master[self._compute_span], casting="same_kind")

    def _bind(self):
        for param, view in zip(self._params, self._views):
            param.data = view

    def sync_params(self):
        """Take parameters whose `.data` was replaced (load_state_dict, .to) as the new masters.

        Their values are copied into the master buffer and `.data` is re-bound to the flat
        compute buffer; the moments and the step count are kept.
        """
        for name, param, view, where in zip(self._names, self._params, self._views, self._slices):
            if param.data is view:
                continue
            if param.shape != view.shape or param.dtype != view.dtype or param.device != backend.device_of(view):
                raise ValueError(f"{name} is now {param.dtype} {param.shape} on {param.device}, but the "
                                 f"optimizer holds {view.dtype} {view.shape} on {backend.device_of(view)}: "
                                 "build a new optimizer")
            self.master[where] = param.data.reshape(-1)
        self._refresh_compute()
        self._bind()

    def set_masters(self, named_arrays):
        """Take float values (name -> array, e.g. float32 weights from before an fp16 cast) as the
        masters, then refresh the parameters' compute copy. Unknown names are an error."""
        for name, array in named_arrays.items():
            if name not in self._names:
                raise ValueError(f"set_masters: {name} is not a parameter of this optimizer")
            view = self.master_of(name)
            if tuple(array.shape) != view.shape:
                raise ValueError(f"set_masters: {name} has shape {tuple(array.shape)}, expected {view.shape}")
            view[...] = backend.to_device(backend.to_numpy(array), backend.device_of(view))
        self._refresh_compute()

    # ----- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        """NumPy copies of the flat buffers and plain values; load_state_dict restores them exactly."""
        return {"names": list(self._names), "shapes": [tuple(p.shape) for p in self._params],
                "num_decayed_params": self._num_decayed_params, "step": self.step_count,
                "lr": self.lr, "betas": tuple(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "decay_embeddings": self.decay_embeddings,
                "master": backend.to_numpy(self.master).copy(),
                "m": backend.to_numpy(self.m).copy(), "v": backend.to_numpy(self.v).copy()}

    def load_state_dict(self, state):
        """Restore buffers, step count and hyperparameters, then re-bind and refresh the params.

        The decay rule is not restored: it fixed the buffer layout at construction, so a state
        saved under another rule is refused.
        """
        self._check_state(state)
        betas, eps = _check_betas(state["betas"]), positive_float("eps", state["eps"])
        for key, buffer in (("master", self.master), ("m", self.m), ("v", self.v)):
            buffer[...] = backend.to_device(np.asarray(state[key]), backend.device_of(buffer))
        self.step_count = int(state["step"])
        self.lr, self.betas = float(state["lr"]), betas
        self.eps, self.weight_decay = eps, float(state["weight_decay"])
        self._refresh_compute()
        self._bind()
        return self

    def _check_state(self, state):
        shapes = dict(zip(self._names, (tuple(p.shape) for p in self._params)))
        saved = dict(zip(state["names"], (tuple(s) for s in state["shapes"])))
        problems = [f"{n} is not in the saved state" for n in shapes if n not in saved]
        problems += [f"saved {n} is not in this model" for n in saved if n not in shapes]
        problems += [f"{n}: saved shape {saved[n]} != {shapes[n]}"
                     for n in shapes if n in saved and saved[n] != shapes[n]]
        if problems:
            raise ValueError("optimizer state is for a different model: " + "; ".join(problems[:8])
                             + (" ..." if len(problems) > 8 else ""))
        if list(state["names"]) != self._names or state["num_decayed_params"] != self._num_decayed_params:
            raise ValueError("optimizer state was saved with a different weight-decay rule (decayed: "
                             f"{state['names'][:state['num_decayed_params']]}, now: {self.decayed_names()})")
        for key in ("master", "m", "v"):
            array = np.asarray(state[key])
            if array.dtype != self.master_dtype or array.shape != self.master.shape:
                raise ValueError(f"optimizer state {key!r} is {array.dtype} {array.shape}, expected "
                                 f"{self.master_dtype} {self.master.shape} (parameters of another dtype?)")


def _check_betas(betas):
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    return betas
