"""CUDA graphs (tinygrad3/cuda_graph.py, nn/graphed_step.py) and what they rely on: the cuBLAS
GEMMs callable during capture (kernels/gemm.py), the flat-gradient kernel (kernels/flat_grads.py)
and AdamW.accumulate_grads.

CPU (CI): accumulate_grads against summed .grad, the flat-gradient reference, the clear errors.
GPU (`gpu` marker): each kernel against its reference, capture and replay against eager runs,
a failed id check inside a graph, 20 fp16 updates of the tiny preset with graphs against
the same updates without, and graphed micro-batches summed over a one-rank NCCL group
(distributed.allreduce_grad_buffer).
"""
import re

import numpy as np
import pytest

import nn
from tinygrad3 import Tensor, backend
from tinygrad3.cuda_graph import CaptureError, CudaGraph
from tinygrad3.kernels import fast, flat_grads, gemm

from test_kernels import close16, half


def two_param_optimizer(xp, dtypes=(np.float32, np.float32)):
    a = nn.Parameter(xp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), dtype=dtypes[0]))
    b = nn.Parameter(xp.asarray(np.linspace(2, 3, 5), dtype=dtypes[1]))
    return nn.AdamW([("a", a), ("b", b)], lr=1e-2, weight_decay=0.0), a, b


def test_accumulated_grads_step_like_summed_grads(rng):
    """Adding two micro-batches' gradients with accumulate_grads gives the step that their sum in
    .grad gives; the flat buffer is back at zero after the step."""
    g1 = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    g2 = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    opt_a, a1, b1 = two_param_optimizer(np)
    opt_a.accumulate_grads(g1)
    opt_a.accumulate_grads([g2[0], None])
    b1.grad = g2[1]  # .grad is added in at the step
    opt_a.step(inv_scale=0.5, clip_norm=1.0)
    opt_b, a2, b2 = two_param_optimizer(np)
    a2.grad, b2.grad = g1[0] + g2[0], g1[1] + g2[1]
    opt_b.step(inv_scale=0.5, clip_norm=1.0)
    np.testing.assert_array_equal(opt_a.master, opt_b.master)
    assert not opt_a._grad.any()


def test_accumulate_grads_checks_shapes():
    opt, a, b = two_param_optimizer(np)
    with pytest.raises(ValueError, match=r"a: gradient shape \(4, 3\) != parameter shape \(3, 4\)"):
        opt.accumulate_grads([np.zeros((4, 3), np.float32), None])


def test_zero_grad_clears_accumulated_grads():
    opt, a, b = two_param_optimizer(np)
    opt.accumulate_grads([np.ones((3, 4), np.float32), np.ones(5, np.float32)])
    opt.zero_grad()
    opt.step()
    np.testing.assert_array_equal(opt.master[:12], np.linspace(-1, 1, 12, dtype=np.float32))


def test_flat_grads_reference_adds_each_piece_at_its_offset(rng):
    flat = rng.standard_normal(20).astype(np.float32)
    pieces = [(half(rng, (2, 3)), 1), (rng.standard_normal(4).astype(np.float32), 12)]
    expected = flat.copy()
    expected[1:7] += pieces[0][0].reshape(-1).astype(np.float32)
    expected[12:16] += pieces[1][0]
    np.testing.assert_array_equal(flat_grads.reference_add(flat, pieces), expected)


def test_graphs_need_a_gpu():
    if backend.cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CaptureError, match="CUDA GPU"):
        CudaGraph(lambda: None)


# ----- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_mm_kernel(gpu_xp, rng, trans_a, trans_b):
    cp = gpu_xp
    m, k, n = 70, 256, 33
    a = half(rng, (k, m) if trans_a else (m, k))
    b = half(rng, (n, k) if trans_b else (k, n))
    c = gemm.mm(cp.asarray(a), cp.asarray(b), trans_a, trans_b)
    close16(c, gemm.reference_bmm(a[None], b[None], trans_a, trans_b)[0], what="C")


@pytest.mark.gpu
def test_flat_grads_kernel(gpu_xp, rng):
    """Mixed float16/float32 pieces, sizes around the chunk size, at offsets; twice (accumulates)."""
    cp = gpu_xp
    sizes = [1, flat_grads.CHUNK - 1, flat_grads.CHUNK, 3 * flat_grads.CHUNK + 5, 17]
    pieces, offset = [], 3
    for i, size in enumerate(sizes):
        pieces.append((half(rng, size, dtype=np.float16 if i % 2 else np.float32), offset))
        offset += size + 2
    flat = rng.standard_normal(offset + 1).astype(np.float32)
    adder, out = flat_grads.FlatAdder(), cp.asarray(flat)
    dev_pieces = [(cp.asarray(a), o) for a, o in pieces]
    adder.add(out, dev_pieces)
    adder.add(out, dev_pieces)
    expected = flat_grads.reference_add(flat_grads.reference_add(flat.copy(), pieces), pieces)
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_replay_recomputes_from_new_inputs(gpu_xp, rng):
    """A captured fast-path forward+backward (GEMM, RMSNorm, GeGLU) replayed on new inputs gives
    the eager results for those inputs."""
    import tinygrad3.functional as F
    cp = gpu_xp
    w = Tensor(cp.asarray(half(rng, (64, 32), 0.2)), requires_grad=True)
    norm_w = Tensor(cp.asarray(half(rng, 32, 0.1, np.float32)), requires_grad=True)
    x_buffer = cp.asarray(half(rng, (8, 32)))

    def step(x):
        y = F.linear(F.rms_norm(Tensor(x), norm_w), w)
        out = F.geglu(y).astype(np.float32).sum()
        out.backward()
        grads = w.grad, norm_w.grad
        w.grad = norm_w.grad = None
        return out.data, grads

    with fast(True):
        graph = CudaGraph(lambda: step(x_buffer))
        for _ in range(2):
            x = cp.asarray(half(rng, (8, 32)))
            x_buffer[...] = x
            graph.replay()
            out, (gw, gn) = graph.outputs
            expected, (ew, en) = step(x)
            close16(out, expected, what="out")
            close16(gw, ew, what="dW")
            close16(gn, en, tol=1e-4, what="dnorm")


@pytest.mark.gpu
def test_capture_of_cupy_cublas_is_a_clear_error(gpu_xp, rng):
    cp = gpu_xp
    a = Tensor(cp.asarray(half(rng, (8, 8))), requires_grad=True)
    with fast(False), pytest.raises(CaptureError, match="TINYGRAD3_FAST=1"):
        CudaGraph(lambda: (a @ a).data)


def tiny_training(cp, ids, graphs, bad_step=None):
    """Losses of 20 fp16 updates (2 micro-batches each) of the tiny preset, fast path."""
    from models import Gemma3, Gemma3Config
    model = Gemma3(Gemma3Config.tiny(), seed=0)
    masters = model.state_dict()
    model.to(device="cuda", dtype=np.float16)
    opt = nn.AdamW(model.named_parameters(), lr=3e-3)
    opt.set_masters(masters)
    scaler, losses = nn.LossScaler(), []
    # graphed: the blocked head with its gradients made in the forward for the graph's loss weight
    graphed = nn.GraphedMicroBatch(lambda x, y, w: model(x, y, return_logits=False, loss_grad=w)[1],
                                   opt) if graphs else None
    with fast(True):
        for step in range(len(ids)):
            total = cp.zeros((), np.float32)
            for micro in range(2):
                batch = cp.asarray(ids[step, micro])
                if graphed is not None:
                    total += graphed(batch[:, :-1], batch[:, 1:], scaler.scale / 2)
                else:
                    _, loss = model(batch[:, :-1], batch[:, 1:])
                    (loss * (scaler.scale / 2)).backward()
                    total += loss.data
            result = opt.step(inv_scale=scaler.inv_scale, clip_norm=1.0)
            scaler.update(result.found_inf)
            opt.zero_grad()
            losses.append(float(total) / 2)
    return np.array(losses)


def counting_ids(steps=20):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 64, (steps, 2, 4, 1))
    return (starts + np.arange(33)) % 64


@pytest.mark.gpu
def test_graphed_training_matches_eager(gpu_xp):
    """20 fp16 updates with every micro-batch after the first replayed from a CUDA graph: the
    losses equal those of the same updates run op by op, within float16 tolerance (the graphed
    run sums micro-batch gradients in float32, the eager one in float16; the graphed one also
    takes the blocked head with its gradients made in the forward, the eager one the logits)."""
    ids = counting_ids()
    eager, graphed = tiny_training(gpu_xp, ids, False), tiny_training(gpu_xp, ids, True)
    assert eager[-1] < eager[0] - 0.5, eager  # it learns
    np.testing.assert_allclose(graphed, eager, rtol=5e-3, atol=5e-3,
                               err_msg=f"max |difference| {np.abs(graphed - eager).max():.2e}")


@pytest.mark.gpu
def test_graph_reads_the_loss_weight_of_each_call(gpu_xp):
    """The loss weight is read from the GPU at each replay: twice the weight, twice the gradient
    (exactly, but for float16 gradients small enough to be subnormal, hence a loss-scale-sized
    weight and a tolerance far below the factor 2 being tested)."""
    from models import Gemma3, Gemma3Config
    cp = gpu_xp
    model = Gemma3(Gemma3Config.tiny(), seed=0)
    model.to(device="cuda", dtype=np.float16)
    opt = nn.AdamW(model.named_parameters())
    graphed = nn.GraphedMicroBatch(lambda x, y, w: model(x, y)[1], opt)
    batch = cp.asarray(counting_ids(1)[0, 0])
    sums = []
    with fast(True):
        for weight in (1024.0, 1024.0, 2048.0):  # eager, captured + replayed, replayed
            opt.zero_grad()
            graphed(batch[:, :-1], batch[:, 1:], weight)
            sums.append(cp.asnumpy(opt._grad).copy())
    np.testing.assert_allclose(sums[1], sums[0], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(sums[2], 2 * sums[1], rtol=1e-3, atol=1e-3 * np.abs(sums[1]).max())


@pytest.mark.gpu
def test_bad_ids_in_a_replay_raise_before_the_step(gpu_xp):
    """An id out of range in a replayed micro-batch raises the engine's ValueError, at the latest
    before the optimizer step, and the step does not run."""
    from models import Gemma3, Gemma3Config
    cp = gpu_xp
    config = Gemma3Config.tiny()
    model = Gemma3(config, seed=0)
    model.to(device="cuda", dtype=np.float16)
    opt = nn.AdamW(model.named_parameters())
    graphed = nn.GraphedMicroBatch(lambda x, y, w: model(x, y)[1], opt)
    good = cp.asarray(counting_ids(1)[0, 0])
    with fast(True):
        for _ in range(3):
            graphed(good[:, :-1], good[:, 1:], 1.0)
        opt.zero_grad()
        bad = good.copy()
        bad[1, 3] = config.vocab_size + 5
        before = cp.asnumpy(opt.master).copy()
        with pytest.raises(ValueError, match=f"lie in \\[0, {config.vocab_size}\\).*found {config.vocab_size + 5}"):
            graphed(bad[:, :-1], bad[:, 1:], 1.0)
            opt.step()
        np.testing.assert_array_equal(cp.asnumpy(opt.master), before)


@pytest.mark.gpu
def test_graphed_micro_batches_then_grad_buffer_allreduce_at_world_one(gpu_xp, monkeypatch):
    """Data-parallel training with graphs at world size 1, through real NCCL: after each update's
    micro-batches (eager, captured, replayed) allreduce_grad_buffer leaves the flat buffer with
    the bits it had (a sum over one rank), and the step reads that buffer."""
    from models import Gemma3, Gemma3Config
    from tinygrad3.distributed import NcclCommunicator, allreduce_grad_buffer
    cp = gpu_xp
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared machines
    try:
        comm = NcclCommunicator()
    except (ImportError, RuntimeError) as e:  # CuPy without its NCCL wheel
        pytest.skip(str(e))
    model = Gemma3(Gemma3Config.tiny(), seed=0)
    model.to(device="cuda", dtype=np.float16)
    opt = nn.AdamW(model.named_parameters(), lr=3e-3)
    graphed = nn.GraphedMicroBatch(lambda x, y, w: model(x, y, return_logits=False, loss_grad=w)[1], opt)
    ids, scale = counting_ids(3), 1024.0
    with fast(True):
        for step in range(3):
            for micro in range(2):
                batch = cp.asarray(ids[step, micro])
                graphed(batch[:, :-1], batch[:, 1:], scale / 2)
            alone = cp.asnumpy(opt._grad)
            allreduce_grad_buffer(comm, opt)
            np.testing.assert_array_equal(cp.asnumpy(opt._grad), alone)
            result = opt.step(inv_scale=1 / scale)
            assert not result.found_inf and np.abs(alone).max() > 0
            assert result.grad_norm == pytest.approx(np.linalg.norm(alone.astype(np.float64)) / scale, rel=1e-5)
            assert not opt._grad.any()


def test_graphed_micro_batch_needs_a_gpu():
    if backend.cuda_available():
        pytest.skip("this machine has a GPU")
    opt, a, b = two_param_optimizer(np)
    with pytest.raises(CaptureError, match="CUDA GPU"):
        nn.GraphedMicroBatch(lambda x, y, w: None, opt)


@pytest.mark.parametrize("argv, message", [
    (["--cuda-graphs", "--device", "cpu"], r"error: --cuda-graphs.*--device cuda"),
])
def test_train_cuda_graphs_argument_errors(argv, message, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
