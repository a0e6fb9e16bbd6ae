"""Neural-network functions with hand-written backward passes (import as F).

Each function is a thin wrapper: it checks its arguments and calls one Function class.
The reference Functions live in tinygrad3/nn_ops/<op>.py, with the forward and the derivation
of the backward; the fast path's (fused kernels) in tinygrad3/kernels/<op>.py. Which of them
runs is decided here and only here, in the `_*_class` functions below: the kernel's when its
family is on (kernels.use_fast) and it takes the arrays, else the reference.
Half-precision inputs are computed in float32 and returned in their own dtype;
float64 inputs stay float64 (that is what gradcheck uses).
"""
import numpy as np

from .kernels import attention as attention_k, cross_entropy as cross_entropy_k, embedding as embedding_k
from .kernels import flash_attention as flash_k, geglu as geglu_k, gemm as gemm_k, qk_norm_rope as qk_norm_rope_k
from .kernels import linear_cross_entropy as linear_cross_entropy_k, rmsnorm as rmsnorm_k, rope as rope_k, use_fast
from .nn_ops.attention import Attention
from .nn_ops.common import as_index_array
from .nn_ops.cross_entropy import CrossEntropy
from .nn_ops.embedding import Embedding
from .nn_ops.geglu import GeGLU, GeluTanh
from .nn_ops.linear import Linear
from .nn_ops.linear_cross_entropy import LinearCrossEntropy
from .nn_ops.rmsnorm import ResidualRMSNorm, RMSNorm
from .nn_ops.rope import RoPE
from .nn_ops.softmax import LogSoftmax, Softmax
from .tensor import Tensor

__all__ = ["linear", "embedding", "rms_norm", "rope", "qk_norm_rope", "attention", "gelu_tanh", "geglu", "softmax",
           "log_softmax", "cross_entropy", "linear_cross_entropy"]


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def linear(x, weight):
    """x @ weight.T for x (..., in) and weight (out, in), as torch.nn.functional.linear (no bias).

    weight may be a sequence of weights (out_i, in) of one dtype: the result is then their
    outputs side by side, (..., sum of out_i), from one GEMM against them stacked by rows.
    """
    weights = tuple(weight) if isinstance(weight, (tuple, list)) else (weight,)
    for w in weights:
        if x.shape[-1] != w.shape[-1]:
            raise ValueError(f"linear: x has {x.shape[-1]} input features, weight {tuple(w.shape)} expects "
                             f"{w.shape[-1]}")
    if not weights or len({w.dtype for w in weights}) > 1:
        raise TypeError(f"linear: stacked weights must share one dtype, got {[w.dtype for w in weights]}")
    return _linear_class(_data(x), _data(weights[0]))()(x, *weights)


def embedding(ids, weight):
    """Rows of weight (V, D) picked by integer ids of any shape: out has shape ids.shape + (D,).

    ids (a raw integer array or an integer Tensor) is never differentiated; ids outside
    [0, V) raise ValueError (ids already on the GPU: at the end of the next backward pass or
    the next copy to the host, see nn_ops/common.check_range).
    """
    ids = as_index_array(_data(ids), _data(weight), "embedding ids", weight.shape[0])
    return _embedding_class(_data(weight))()(ids, weight)


def rms_norm(x, weight, eps=1e-6, out_dtype=None, residual=None):
    """Gemma RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * (1 + weight).

    Math in float32 (float64 for float64 x); the output has x's dtype, or out_dtype when given
    (rounded once: float32 x straight to a float16 output). x's gradient has x's dtype, weight's
    weight's. With `residual` (a Tensor of x's shape, e.g. the float32 residual stream), returns
    residual + rms_norm(x, weight) as one op, with exactly the unfused pair's values and
    gradients (one kernel each way on the fast path).
    """
    if out_dtype is not None and np.dtype(out_dtype).kind != "f":
        raise TypeError(f"rms_norm: out_dtype must be a floating dtype, got {np.dtype(out_dtype)}")
    if residual is not None:
        if out_dtype is not None:
            raise ValueError("rms_norm: out_dtype and residual do not combine (the sum takes the promoted dtype)")
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"rms_norm: residual of shape {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        h, xd, wd = _data(residual), _data(x), _data(weight)
        if _residual_rms_norm_fused(h, xd, wd):
            return rmsnorm_k.FusedResidualRMSNorm(eps)(residual, x, weight)
        return ResidualRMSNorm(_rms_norm_class(xd, wd, None)(eps))(residual, x, weight)
    return _rms_norm_class(_data(x), _data(weight), out_dtype)(eps, out_dtype)(x, weight)


def rope(x, base, offset=0):
    """Rotary embedding of x (..., T, D) for positions offset .. offset+T-1 (rotate-half layout).

    out = x cos(theta) + rotate_half(x) sin(theta), theta[p, i] = p base^(-2i/D) repeated for
    both halves of the last axis; computed in float32, returned in x's dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"rope needs an even last dimension, got {x.shape[-1]}")
    return _rope_class(_data(x))(base, _position_offset(offset))(x)


def _position_offset(offset):
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"rope offset must be >= 0, got {offset}")
    return offset


def qk_norm_rope(x, weight, eps, base, offset=0):
    """Attention's query or key heads x (B, T, H, D) -> (B, H, T, D): Gemma RMSNorm over D with
    weight (D,), the heads moved before the positions, then RoPE for positions offset .. offset+T-1.

    Equal to rope(rms_norm(x, weight, eps).transpose(0, 2, 1, 3), base, offset), which is the
    reference path; the fast path (family "qk_norm_rope") does it in one kernel each way.
    """
    if len(x.shape) != 4 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"qk_norm_rope: x must be (B, T, H, D) and weight (D,), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    offset = _position_offset(offset)
    if _qk_norm_rope_fused(_data(x), _data(weight)):
        return qk_norm_rope_k.QKNormRoPE(eps, base, offset)(x, weight)
    return rope(rms_norm(x, weight, eps).transpose(0, 2, 1, 3), base, offset)


def attention(q, k, v, scale, window=None, q_offset=None, out_layout="bhtd"):
    """Causal softmax attention: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) -> (B, Hq, Tq, D).

    Hq must be a multiple of Hkv; query head h uses kv head h // (Hq / Hkv). Query i sits at
    absolute position q_offset + i (default Tk - Tq: the queries are the last Tq positions,
    as in KV-cache generation) and sees keys j <= its position; with `window=W` only keys
    with position - W < j. Scores and softmax in float32; output in q's dtype.
    out_layout="bthd" returns the output as a contiguous (B, Tq, Hq, D) array instead (the same
    values, transposed), ready to reshape into (B, Tq, Hq*D) for the output projection; the
    flash kernels write it there directly, with no transpose either way.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D), got {q.shape}, {k.shape}, {v.shape}")
    (b, hq, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if (bk, dk) != (b, d) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {hkv} kv heads")
    q_offset = tk - tq if q_offset is None else int(q_offset)
    if q_offset < 0 or q_offset + tq > tk:
        raise ValueError(f"attention: queries at positions {q_offset}..{q_offset + tq - 1} need keys "
                         f"0..{q_offset + tq - 1}, but there are only {tk}")
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1, got {window}")
    if out_layout not in ("bhtd", "bthd"):
        raise ValueError(f'attention: out_layout must be "bhtd" (B, Hq, Tq, D) or "bthd" (B, Tq, Hq, D), '
                         f"got {out_layout!r}")
    attention_class = _attention_class(_data(q), _data(k), _data(v), window, q_offset)
    return attention_class(scale, window, q_offset, out_layout)(q, k, v)


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return GeluTanh()(x)


def geglu(x):
    """gelu_tanh(gate) * up (Gemma's MLP gate) for x = [gate | up], its last axis holding gate then
    up (the output of one GEMM against the gate and up weights stacked by rows, `linear(x, (gate_w,
    up_w))`): the result has half x's last axis. Equal to `gelu_tanh(gate) * up` rounding for
    rounding, saving only x for the backward."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: the last axis of x {tuple(x.shape)} must hold gate and up, two equal halves")
    return _geglu_class(_data(x))()(x)


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along axis, computed stably (max subtracted) in float32 or wider."""
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along axis, computed stably (max subtracted) in float32 or wider."""
    return LogSoftmax(axis)(x)


def cross_entropy(logits, targets, ignore_index=-1):
    """Mean of -log softmax(logits)[target] over the targets that are not ignore_index.

    logits (N, V) or (B, T, V); targets (N,) or (B, T), a raw integer array or integer Tensor.
    Computed in float32 (float64 for float64 logits), returned as a scalar Tensor of that dtype.
    If every target is ignored the loss is 0 and the gradient is 0 (no division by zero).
    Targets outside [0, V) other than ignore_index raise ValueError (as embedding's ids do).
    """
    targets = as_index_array(_data(targets), _data(logits), "cross_entropy targets", logits.shape[-1], ignore_index)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: targets of shape {tuple(targets.shape)} do not match logits "
                         f"{tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})")
    return _cross_entropy_class(_data(logits))(ignore_index)(logits, targets)


def linear_cross_entropy(x, weight, targets, ignore_index=-1, valid_vocab=None, block_rows=None,
                         expected_grad=None):
    """cross_entropy(linear(x, weight), targets) without keeping the logits.

    x (..., D), weight (V, D), targets of x's leading shape. valid_vocab: only ids below it are
    real (a vocabulary padded to a GEMM-friendly size): the other logits get probability 0 and
    no gradient, and targets must lie below it. The logits are made block_rows rows at a time
    (default: blocks of at most 256 MiB) in the forward and again in the backward, so the head's
    peak memory is one block's logits, not all of them (nn_ops/linear_cross_entropy.py). Same
    value and gradients as the unfused ops. expected_grad: the gradient the loss's backward will
    get (a number or a 0-d array, e.g. the loss scale / micro-batches), when known: the gradients
    are then made in the forward, with no second head GEMM, and scaled by gy / expected_grad in the
    backward (any gy stays correct; the expected one gives the same values).
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_cross_entropy: x has {x.shape[-1]} features, weight {tuple(weight.shape)} "
                         f"expects {weight.shape[-1]}")
    vocab = weight.shape[0]
    if valid_vocab is not None and not 1 <= int(valid_vocab) <= vocab:
        raise ValueError(f"linear_cross_entropy: valid_vocab must be in [1, {vocab}], got {valid_vocab}")
    valid_vocab = None if valid_vocab is None or int(valid_vocab) == vocab else int(valid_vocab)
    targets = as_index_array(_data(targets), _data(x), "cross_entropy targets", valid_vocab or vocab, ignore_index)
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: targets of shape {tuple(targets.shape)} do not match x "
                         f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
    if block_rows is not None and int(block_rows) < 1:
        raise ValueError(f"linear_cross_entropy: block_rows must be >= 1, got {block_rows}")
    if expected_grad is not None and not hasattr(expected_grad, "shape") and not float(expected_grad):
        raise ValueError("linear_cross_entropy: expected_grad must be nonzero (the backward divides by it)")
    mm = gemm_k.mm if _linear_class(_data(x), _data(weight)) is gemm_k.GemmLinear else None
    return _linear_cross_entropy_class(_data(x))(ignore_index, valid_vocab, block_rows, expected_grad, mm,
                                                 _cross_entropy_class)(x, weight, targets)


# ----- which Function computes an op: the fast path's (tinygrad3/kernels/<op>.py) where its family
# is on and its kernels take the arrays, else the reference (tinygrad3/nn_ops/<op>.py)

def _linear_class(x, w):
    return gemm_k.GemmLinear if use_fast("gemm", x, w) else Linear


def _linear_cross_entropy_class(x):
    """The fused class finishes the gradients made in the forward by its kernels (one pass, or none)."""
    fused = use_fast("cross_entropy", x)
    return linear_cross_entropy_k.FusedLinearCrossEntropy if fused else LinearCrossEntropy


def _embedding_class(w):
    """FusedEmbedding adds its backward's rows by the kernel where its arrays allow (embedding_k.supports)."""
    return embedding_k.FusedEmbedding if use_fast("embedding", w, dtypes=tuple(embedding_k.GY_TYPES)) else Embedding


def _rms_norm_class(x, w, out_dtype):
    out = x.dtype if out_dtype is None else out_dtype
    fused = use_fast("rmsnorm", x, w, dtypes=rmsnorm_k.DTYPES) and rmsnorm_k.supports(x, out)
    return rmsnorm_k.FusedRMSNorm if fused else RMSNorm


def _residual_rms_norm_fused(h, x, w):
    """The residual form's kernels: the norm's inputs as _rms_norm_class takes them, a float32 h."""
    return (use_fast("rmsnorm", x, w, dtypes=rmsnorm_k.DTYPES) and use_fast("rmsnorm", h, dtypes=(np.float32,))
            and h.shape == x.shape and rmsnorm_k.supports(x, np.float32))


def _rope_class(x):
    return rope_k.FusedRoPE if use_fast("rope", x) else RoPE


def _qk_norm_rope_fused(x, w):
    """float16 CuPy x (B, T, H, D) and float16 or float32 w: one kernel each way, else the composition."""
    return (use_fast("qk_norm_rope", x) and use_fast("qk_norm_rope", w, dtypes=qk_norm_rope_k.W_DTYPES)
            and qk_norm_rope_k.supports(x))


def _attention_class(q, k, v, window, q_offset):
    """The flash kernels where they take the shapes, else cuBLAS GEMMs and a fused softmax, else the reference."""
    if use_fast("flash_attention", q, k, v) and flash_k.supports(q, k, v, window, q_offset):
        return flash_k.FlashAttention
    if use_fast("attention", q, k, v):
        return attention_k.FusedAttention
    return Attention


def _geglu_class(x):
    return geglu_k.FusedGeGLU if use_fast("geglu", x) else GeGLU


def _cross_entropy_class(logits):
    return cross_entropy_k.FusedCrossEntropy if use_fast("cross_entropy", logits) else CrossEntropy
