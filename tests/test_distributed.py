"""Data parallelism on the CPU, with ranks as threads (InProcessGroup) standing in for NCCL.

The central claim: one update over N ranks, each on its own micro-batches, equals one process
accumulating the same N micro-batches; and an overflow on one rank makes every rank skip. Both
for DataParallel (`.grad` buckets) and for allreduce_grad_buffer (the optimizer's flat buffer,
as CUDA-graphed training fills it; here its eager equivalent on the CPU).
"""
import functools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import nn
import tinygrad3.functional as F
import train
from data.loader import BatchLoader
from tinygrad3 import Function, Tensor
from models import Gemma3, Gemma3Config
from tinygrad3.distributed import DataParallel, InProcessGroup, allreduce_grad_buffer, broadcast_optimizer

D, K = 12, 5  # the synthetic model: D -> D -> D -> K


# ----- the engine's leaf hook ----------------------------------------------------------------------
def test_leaf_hook_fires_once_per_leaf_after_its_last_contribution():
    rng = np.random.default_rng(0)
    a, b, c = (Tensor(rng.standard_normal(3), requires_grad=True) for _ in range(3))
    names = {id(a): "a", id(b): "b", id(c): "c"}
    seen = []

    def hook(leaf):
        seen.append((names[id(leaf)], leaf.grad.copy()))

    # a twice in one op, b in two separate branches (one of them late in the walk), c once.
    loss = (a * a).sum() + (b * c).sum() + (b.exp() * 2.0).sum()
    loss.backward(leaf_hook=hook)
    assert sorted(name for name, _ in seen) == ["a", "b", "c"]
    final = {"a": a.grad, "b": b.grad, "c": c.grad}
    for name, grad_at_hook in seen:  # nothing was added after the hook saw it
        np.testing.assert_array_equal(grad_at_hook, final[name])
    np.testing.assert_allclose(b.grad, c.data + 2 * np.exp(b.data))

    # A second pass accumulates; the hook sees the sum of both passes, once more per leaf.
    seen.clear()
    (a * 3.0).sum().backward(leaf_hook=hook)
    assert [name for name, _ in seen] == ["a"]
    np.testing.assert_allclose(seen[0][1], 2 * a.data + 3.0)


def test_leaf_hook_fires_for_leaves_without_gradient_and_for_a_leaf_root():
    class NoGradForSecond(Function):
        def forward(self, x, y):
            return x * 2

        def backward(self, gy):
            return gy * 2, None

    x = Tensor(np.ones(2), requires_grad=True)
    y = Tensor(np.ones(2), requires_grad=True)
    seen = []
    NoGradForSecond()(x, y).sum().backward(leaf_hook=seen.append)
    assert [t is x for t in seen].count(True) == 1 and [t is y for t in seen].count(True) == 1
    assert y.grad is None  # reached, but no gradient flowed: the hook still says it is final

    seen.clear()
    root = Tensor(np.ones(()), requires_grad=True)
    root.backward(leaf_hook=seen.append)
    assert seen == [root]


# ----- the in-process communicator ---------------------------------------------------------------
def test_in_process_collectives_fold_in_rank_order():
    group = InProcessGroup(4)
    tiny = np.float32(4e-8)

    def collectives(comm):
        # 1 + 4e-8 + 4e-8 + 4e-8 in float32: the left fold keeps 1.0 (each 4e-8 rounds away); any other
        # order first adds up the small ones and ends at 1 + 2^-23.
        values = np.array([1.0 if comm.rank == 0 else tiny, comm.rank], np.float32)
        comm.allreduce(values).wait()
        biggest = np.array([comm.rank, -comm.rank], np.int64)
        comm.allreduce(biggest, "max").wait()
        weights = np.full(3, float(comm.rank))
        comm.broadcast(weights, root=2)
        return values, biggest, weights, comm.allreduce_scalars([1.0, comm.rank], "min"), \
            comm.allgather_object({"rank": comm.rank})

    for values, biggest, weights, scalars, objects in group.run(collectives):
        np.testing.assert_array_equal(values, np.array([1.0, 6.0], np.float32))
        np.testing.assert_array_equal(biggest, [3, 0])
        np.testing.assert_array_equal(weights, [2.0, 2.0, 2.0])
        assert scalars == [1.0, 0.0]
        assert objects == [{"rank": r} for r in range(4)]


def test_in_process_allreduce_result_lands_at_wait():
    """As with NCCL, the sum is only there once waited for: code that forgets to wait fails here too."""
    def rank_main(comm):
        values = np.full(3, comm.rank + 1.0)
        work = comm.allreduce(values)
        before = values.copy()
        work.wait()
        return before, values

    for rank, (before, after) in enumerate(InProcessGroup(2).run(rank_main)):
        np.testing.assert_array_equal(before, np.full(3, rank + 1.0))
        np.testing.assert_array_equal(after, np.full(3, 3.0))


def test_in_process_group_reports_errors_instead_of_hanging():
    def mismatched(comm):
        comm.allreduce(np.zeros(2 + comm.rank))

    with pytest.raises(ValueError, match="ranks disagree"):
        InProcessGroup(2).run(mismatched)

    def one_fails(comm):
        if comm.rank == 1:
            raise KeyError("rank 1 broke")
        comm.barrier()  # rank 0 would wait forever for rank 1

    with pytest.raises(KeyError, match="rank 1 broke"):
        InProcessGroup(2, timeout=30).run(one_fails)


# ----- a small model with a weight used twice ------------------------------------------------------
class Synthetic(nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w_in = nn.Parameter((rng.standard_normal((D, D)) * 0.5).astype(dtype))
        self.bias = nn.Parameter((rng.standard_normal(D) * 0.1).astype(dtype))
        self.w_out = nn.Parameter((rng.standard_normal((D, K)) * 0.5).astype(dtype))

    def loss(self, x, y):
        h = F.gelu_tanh(Tensor(x) @ self.w_in + self.bias)
        h = F.gelu_tanh(h @ self.w_in)  # w_in again: two contributions to its gradient per pass
        err = h @ self.w_out - Tensor(y)
        return (err * err).mean()


def batches(count, dtype, seed=1, rows=6):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((rows, D)).astype(dtype), rng.standard_normal((rows, K)).astype(dtype))
            for _ in range(count)]


class Replica:
    """Model, AdamW and loss scaler of one rank (or of the single process), Trainer.update's loop."""

    def __init__(self, dtype, comm=None):
        self.model = Synthetic(dtype)
        self.opt = nn.AdamW(self.model.named_parameters(), lr=1e-2, weight_decay=0.1)
        self.scaler = nn.LossScaler(init_scale=2.0 ** 10)
        self.comm = comm
        bucket_bytes = 50 * np.dtype(dtype).itemsize  # two buckets: w_out alone; bias and w_in together
        self.dp = DataParallel(self.model.parameters(), comm, bucket_bytes) if comm is not None else None
        if comm is not None:
            broadcast_optimizer(comm, self.opt)

    def update(self, micro_batches, plant_inf=False):
        world = self.comm.world_size if self.comm is not None else 1
        weight = self.scaler.scale / (len(micro_batches) * world)
        for i, (x, y) in enumerate(micro_batches):
            hook = self.dp.leaf_hook if self.dp is not None and i == len(micro_batches) - 1 else None
            if hook is not None and plant_inf:
                hook = self._planting(hook)
            (self.model.loss(x, y) * weight).backward(leaf_hook=hook)
        if self.dp is not None:
            self.dp.finish()
        result = self.opt.step(inv_scale=self.scaler.inv_scale, clip_norm=0.5)
        self.scaler.update(result.found_inf)
        self.opt.zero_grad()
        return result

    @staticmethod
    def _planting(hook):
        def plant_then_hook(leaf):  # this rank's gradient overflowed, just before it is reduced
            leaf.grad = leaf.grad.copy()
            leaf.grad.reshape(-1)[0] = np.inf
            hook(leaf)
        return plant_then_hook

    def state(self):
        return {"master": self.opt.master.copy(), "m": self.opt.m.copy(), "v": self.opt.v.copy()}


@pytest.mark.parametrize("world,accum,dtype", [(2, 1, np.float64), (4, 1, np.float64), (2, 3, np.float64),
                                               (4, 2, np.float32)])
def test_data_parallel_update_equals_single_process_accumulation(world, accum, dtype):
    updates = 3
    data = [batches(world * accum, dtype, seed=10 + u) for u in range(updates)]
    single = Replica(dtype)
    single_results = [single.update(data[u]) for u in range(updates)]

    def rank_main(comm):
        replica = Replica(dtype, comm)
        assert len(replica.dp.buckets) == 2
        results = [replica.update(data[u][comm.rank * accum:(comm.rank + 1) * accum]) for u in range(updates)]
        return results, replica.state()

    tolerance = dict(rtol=1e-12, atol=1e-15) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-7)
    for results, state in InProcessGroup(world).run(rank_main):
        for ours, theirs in zip(results, single_results):
            assert not ours.found_inf
            np.testing.assert_allclose(ours.grad_norm, theirs.grad_norm, **tolerance)
            assert ours.clip_coef < 1.0 and theirs.clip_coef < 1.0  # the clip path is exercised
        for key, value in single.state().items():
            np.testing.assert_allclose(state[key], value, **tolerance, err_msg=key)


@pytest.mark.parametrize("world", [2, 4])
def test_overflow_on_one_rank_makes_every_rank_skip(world):
    data = batches(world, np.float32, seed=3)

    def rank_main(comm):
        replica = Replica(np.float32, comm)
        before = replica.state()
        result = replica.update([data[comm.rank]], plant_inf=comm.rank == 1)
        return result, replica.scaler.scale, before, replica.state(), replica.opt.step_count

    for result, scale, before, after, steps in InProcessGroup(world).run(rank_main):
        assert result.found_inf and not np.isfinite(result.grad_norm)
        assert scale == 2.0 ** 9 and steps == 0
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
            assert np.isfinite(after[key]).all()


def test_ranks_that_disagree_on_a_skip_are_an_error():
    def rank_main(comm):
        fake_trainer = SimpleNamespace(comm=comm, world_size=comm.world_size, step=0)
        return train.Trainer.agree_on_step(fake_trainer, 1.0 + comm.rank, found_inf=comm.rank == 0)

    with pytest.raises(RuntimeError, match="disagree"):
        InProcessGroup(2).run(rank_main)
    agreed = InProcessGroup(2).run(lambda comm: train.Trainer.agree_on_step(
        SimpleNamespace(comm=comm, world_size=2, step=0), 1.0 + comm.rank, False))
    assert agreed == [1.5, 1.5]


# ----- buckets -----------------------------------------------------------------------------------------
def test_buckets_cover_every_parameter_exactly_once_in_reverse_order():
    rng = np.random.default_rng(0)
    sizes = [(40, 3), (7,), (100,), (5, 5), (1,), (30,)]
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in sizes]
    frozen = nn.Parameter(np.zeros(3, np.float32), requires_grad=False)
    listed = params + [params[0], frozen]  # a tied weight listed twice, a frozen one
    dp = DataParallel(listed, InProcessGroup(1).comms[0], bucket_bytes=200)
    assert [[p.shape for p in bucket.params] for bucket in dp.buckets] == [
        [(30,), (1,), (5, 5)],  # reversed order, filled until the 200 bytes are reached
        [(100,)],               # 400 bytes: larger than a bucket, alone
        [(7,), (40, 3)]]        # what is left; the tied weight only once, the frozen one not at all
    for bucket in dp.buckets:
        covered = np.zeros(bucket.buffer.size, int)
        for where in bucket.slices:
            covered[where] += 1
        assert (covered == 1).all()


def test_a_bucket_holds_one_dtype_when_precisions_mix():
    """Mixed precision keeps norm weights float32 among fp16 weights: a dtype change starts a bucket."""
    dtypes = [np.float16, np.float32, np.float16, np.float16, np.float32]
    params = [nn.Parameter(np.ones(10, dtype)) for dtype in dtypes]
    dp = DataParallel(params, InProcessGroup(1).comms[0], bucket_bytes=10 ** 6)
    assert [[p.dtype for p in bucket.params] for bucket in dp.buckets] == [
        [np.float32], [np.float16, np.float16], [np.float32], [np.float16]]
    assert [bucket.buffer.dtype for bucket in dp.buckets] == [np.float32, np.float16, np.float32, np.float16]


def test_each_bucket_starts_during_backward_as_soon_as_it_is_complete():
    def rank_main(comm):
        model = Synthetic(np.float64)
        dp = DataParallel(model.parameters(), comm, bucket_bytes=400)  # [w_out], [bias, w_in]
        final, started = [], []
        real_allreduce = comm.allreduce

        def spy(array, op="sum"):
            started.append(len(final))  # how many gradients were final when this bucket started
            return real_allreduce(array, op)

        def hook(leaf):
            final.append(leaf)
            dp.leaf_hook(leaf)

        comm.allreduce = spy
        x, y = batches(1, np.float64, seed=comm.rank)[0]
        model.loss(x, y).backward(leaf_hook=hook)
        dp.finish()
        return started, [id(p) for p in final] == [id(model.w_out), id(model.bias), id(model.w_in)]

    for started, in_order in InProcessGroup(2).run(rank_main):
        # w_out (the last layer) is final first and its bucket starts at once; w_in, used twice,
        # only after the first layer's backward, and then the second bucket starts, before finish().
        assert started == [1, 3] and in_order


def test_finish_reduces_parameters_the_backward_never_reached():
    def rank_main(comm):
        model = Synthetic(np.float64)
        dp = DataParallel(model.parameters(), comm, bucket_bytes=500)
        x, y = batches(1, np.float64, seed=comm.rank)[0]
        if comm.rank == 0:  # only rank 0 uses the model this step; rank 1 contributes zeros
            model.loss(x, y).backward(leaf_hook=dp.leaf_hook)
        dp.finish()
        return {name: p.grad.copy() for name, p in model.named_parameters()}

    grads = InProcessGroup(2).run(rank_main)
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name])
        assert np.abs(grads[0][name]).sum() > 0


# ----- the optimizer's flat gradient buffer (CUDA-graphed training) -------------------------------------
SCALE = 2.0 ** 10  # a loss scale: the buffer holds scaled gradients, step unscales them
TINY = Gemma3Config.tiny(vocab_size=512, unpadded_vocab_size=500)  # the tiny preset, a small vocabulary


def token_batches(count, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.unpadded_vocab_size, (count, 2, 17))
    return [(b[:, :-1], b[:, 1:]) for b in ids]


class BufferedReplica:
    """The tiny Gemma 3 (float32, CPU) trained as nn.GraphedMicroBatch trains it, eagerly: backward
    inside `grads_in_buffer`, so every gradient is added into AdamW's flat buffer and no .grad exists."""

    def __init__(self):
        self.model = Gemma3(TINY, seed=0)
        self.opt = nn.AdamW(self.model.named_parameters(), lr=3e-3)

    def micro_batches(self, batches, weight):
        for x, y in batches:
            with self.opt.grads_in_buffer():
                loss = self.model(x, y, return_logits=False, loss_grad=weight)[1]
                (loss * weight).backward()
        assert all(p.grad is None for p in self.opt.params)

    def step(self):
        # No clip: a clipped (normalised) gradient would hide a wrongly scaled sum from m and the masters.
        return self.opt.step(inv_scale=1 / SCALE)

    def state(self):
        return {"master": self.opt.master.copy(), "m": self.opt.m.copy(), "v": self.opt.v.copy()}


def relative_difference(got, expected):
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("world,accum", [(2, 2), (4, 1)])
def test_grad_buffer_allreduce_equals_single_process_accumulation(world, accum):
    updates = 2
    data = [token_batches(world * accum, seed=20 + u) for u in range(updates)]
    weight = SCALE / (world * accum)

    def rank_main(comm):
        replica, local, summed, results = BufferedReplica(), [], [], []
        for u in range(updates):
            replica.micro_batches(data[u][comm.rank * accum:(comm.rank + 1) * accum], weight)
            local.append(replica.opt._grad.copy())
            allreduce_grad_buffer(comm, replica.opt)
            summed.append(replica.opt._grad.copy())
            results.append(replica.step())
        return local, summed, results, replica.state()

    ranks = InProcessGroup(world).run(rank_main)
    single, single_sums, single_results = BufferedReplica(), [], []
    start = single.opt.master.copy()
    for u in range(updates):
        single.micro_batches(data[u], weight)
        single_sums.append(single.opt._grad.copy())
        single_results.append(single.step())

    for u in range(updates):
        # Exact: the ranks' buffers added up in rank order, as the communicator folds them.
        fold = functools.reduce(np.add, [local[u] for local, _, _, _ in ranks])
        for _, summed, results, _ in ranks:
            np.testing.assert_array_equal(summed[u], fold)
            assert not results[u].found_inf
    for _, _, _, state in ranks:  # every rank took the same steps, to the bit
        for key, value in ranks[0][3].items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)

    _, summed, results, state = ranks[0]
    expected = single.state()
    if accum == 1:
        # Each rank's buffer is zeros plus its one micro-batch's gradient, so the rank-order fold
        # adds the very arrays one process adds, in its order: the same bits.
        for u in range(updates):
            np.testing.assert_array_equal(summed[u], single_sums[u])
            assert results[u] == single_results[u]
        for key, value in expected.items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)
    else:
        # One process adds micro-batch after micro-batch into one buffer; the ranks add their sums:
        # float32 rounding apart (up to a few 1e-6 after two steps), a sum of the wrong scale or with
        # a rank missing is off by tens of percent.
        for u in range(updates):
            assert relative_difference(summed[u], single_sums[u]) < 1e-4
            assert results[u].grad_norm == pytest.approx(single_results[u].grad_norm, rel=1e-5)
        assert relative_difference(state["master"] - start, expected["master"] - start) < 1e-4
        for key in ("m", "v"):
            assert relative_difference(state[key], expected[key]) < 1e-4, key


@pytest.mark.parametrize("world", [2, 4])
def test_inf_in_one_ranks_grad_buffer_makes_every_rank_skip(world):
    data = token_batches(world, seed=3)

    def rank_main(comm):
        replica = BufferedReplica()
        before = replica.state()
        replica.micro_batches([data[comm.rank]], SCALE / world)
        if comm.rank == world - 1:  # the last rank overflowed, in the buffer's last element
            replica.opt._grad[-1] = np.inf
        allreduce_grad_buffer(comm, replica.opt)
        seen = bool(np.isinf(replica.opt._grad[-1]))
        return seen, replica.step(), before, replica.state(), replica.opt.step_count

    for seen, result, before, after, steps in InProcessGroup(world).run(rank_main):
        assert seen and result.found_inf and not np.isfinite(result.grad_norm) and steps == 0
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_grad_buffer_allreduce_takes_in_grads_a_plain_backward_left():
    """.grad arrays are added into the buffer before the sum and cleared: step would otherwise add
    this rank's own gradients, unsummed, on top of the summed buffer."""
    def rank_main(comm):
        model = Synthetic(np.float64)
        opt = nn.AdamW(model.named_parameters())
        x, y = batches(1, np.float64, seed=comm.rank)[0]
        model.loss(x, y).backward()
        local = np.concatenate([p.grad.reshape(-1) for p in opt.params])
        allreduce_grad_buffer(comm, opt)
        return local, opt._grad.copy(), [p.grad for p in opt.params]

    ranks = InProcessGroup(2).run(rank_main)
    for _, summed, grads in ranks:
        np.testing.assert_array_equal(summed, ranks[0][0] + ranks[1][0])
        assert all(g is None for g in grads)


# ----- train.py --------------------------------------------------------------------------------------------
def _args(data, out, *extra):
    return train.parse_args(["--preset", "tiny", "--device", "cpu", "--data", data, "--out", str(out),
                             "--batch-size", "2", "--block-size", "16", "--grad-accum", "1", "--warmup", "2",
                             "--lr", "3e-3", "--eval-every", "2", "--eval-batches", "3", "--no-progress",
                             "--bucket-mb", "0.05", *extra])


class FixedBatches:
    """Stands in for a trainer's BatchLoader: hands out the given train batches in order."""

    def __init__(self, items):
        self.items = list(items)

    def next_batch(self, split):
        return self.items.pop(0)

    def state_dict(self):
        return {}


@pytest.mark.parametrize("recompute", [(), ("--recompute",)])
def test_trainer_update_equals_single_process_accumulation(synthetic_dir, tmp_path, recompute):
    """Also with activation recomputation on the ranks (tinygrad3.recompute) against a plain process."""
    world = 2
    loader = BatchLoader(synthetic_dir, 2, 16, seed=5)
    data = [loader.next_batch("train") for _ in range(world)]
    single = train.setup(_args(synthetic_dir, tmp_path / "single", "--grad-accum", str(world),
                                 "--dtype", "float64"))
    single.loader = FixedBatches(data)
    expected = single.update()

    def rank_main(comm):
        trainer = train.setup(_args(synthetic_dir, tmp_path / "dp", "--dtype", "float64", *recompute), comm)
        trainer.loader = FixedBatches([data[comm.rank]])
        assert len(trainer.runner.dp.buckets) > 1 and trainer.model.recompute == bool(recompute)
        return trainer.update(), trainer.optimizer, trainer.tokens

    for record, optimizer, tokens in InProcessGroup(world).run(rank_main):
        assert tokens == single.tokens == world * 2 * 16
        assert record["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # summed in float32 alone
        assert record["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-12)
        for key in ("master", "m", "v"):
            np.testing.assert_allclose(getattr(optimizer, key), getattr(single.optimizer, key),
                                       rtol=1e-10, atol=1e-15, err_msg=key)


def test_trainer_eval_is_the_mean_over_the_same_batches_at_any_world_size(synthetic_dir, tmp_path):
    expected = train.setup(_args(synthetic_dir, tmp_path / "single")).evaluate()
    for world in (2, 4):  # 3 eval batches: uneven shares, and a rank with none at world size 4
        got = InProcessGroup(world).run(
            lambda comm: train.setup(_args(synthetic_dir, tmp_path / f"dp{comm.world_size}"), comm).evaluate())
        for losses in got:
            assert losses == pytest.approx(expected, rel=1e-12)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_distributed_run_writes_once_and_resumes_at_any_world_size(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    InProcessGroup(2).run(lambda comm: train.setup(_args(synthetic_dir, out, "--max-updates", "4"), comm).run())
    log = _log(out)
    assert [r["kind"] for r in log] == ["update", "update", "eval", "update", "update", "eval"]
    assert log[-1]["tokens"] == 4 * 2 * 2 * 16  # 4 updates x 2 ranks x 2 x 16 tokens
    with open(out / "last" / "state.json") as f:
        saved = json.load(f)
    assert saved["world_size"] == 2 and saved["step"] == 4
    assert saved["loaders"][0] != saved["loaders"][1]  # every rank draws its own batches
    assert saved["loaders"][0]["seed"] == 0  # rank 0 of a fresh run: --seed itself

    # The same world size continues each rank's stream where it stopped.
    def positions(comm):
        trainer = train.setup(_args(synthetic_dir, out, "--max-updates", "6", "--resume"), comm)
        return trainer.loader.state_dict(), trainer.optimizer.step_count

    for rank, (position, steps) in enumerate(InProcessGroup(2).run(positions)):
        assert position == saved["loaders"][rank] and steps == 4

    # One process (no --distributed) takes the run over with fresh streams from (seed, rank, step).
    trainer = train.setup(_args(synthetic_dir, out, "--max-updates", "6", "--resume"))
    assert trainer.loader.seed == train.stream_seed(0, 0, 4) != 0
    assert trainer.optimizer.step_count == 4 and trainer.tokens == saved["tokens"]
    assert trainer.run() == 0
    log = _log(out)
    assert [r["step"] for r in log if r["kind"] == "update"] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["tokens"] == saved["tokens"] + 2 * 2 * 16  # one rank from here on


def test_stream_seeds():
    assert train.stream_seed(7) == 7  # one rank, fresh run: the non-distributed stream
    seeds = {train.stream_seed(7, rank, step) for rank in range(4) for step in (0, 100)}
    assert len(seeds) == 8 and train.stream_seed(7, 2, 100) == train.stream_seed(7, 2, 100)
    assert train.saved_loader_state({"loader": {"a": 1}}, 0, 1) == {"a": 1}  # before --distributed existed
    assert train.saved_loader_state({"world_size": 2, "loaders": [1, 2]}, 1, 2) == 2
    assert train.saved_loader_state({"world_size": 2, "loaders": [1, 2]}, 0, 4) is None
    assert train.saved_loader_state({"world_size": 2, "loaders": None}, 0, 2) is None


# ----- real MPI processes (only where mpi4py and mpirun are installed; CI has neither) -------------
MPI_SCRIPT = """
import hashlib, json, os, sys, numpy as np
from tinygrad3.distributed import MpiCommunicator, launched_world_size, mpi_world
comm = MpiCommunicator(mpi_world())
rng = np.random.default_rng(comm.rank)
values = (rng.standard_normal(1000) * 10.0 ** rng.integers(-8, 8, 1000)).astype(np.float32)
comm.allreduce(values).wait()
biggest = np.array([comm.rank, -comm.rank], np.int64)
comm.allreduce(biggest, "max").wait()
weights = np.full(3, float(comm.rank))
comm.broadcast(weights, root=1)
result = dict(rank=comm.rank, world=comm.world_size, launched=launched_world_size(),
              sum_bits=hashlib.sha256(values.tobytes()).hexdigest(), biggest=biggest.tolist(),
              weights=weights.tolist(), scalars=comm.allreduce_scalars([1.5, comm.rank]),
              objects=comm.allgather_object(comm.rank))
with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:  # ranks' stdout interleaves
    json.dump(result, f)
"""


def test_mpi_communicator_under_mpirun(tmp_path):
    import shutil
    import subprocess
    import sys

    pytest.importorskip("mpi4py", reason="mpi4py is not installed (optional: CPU runs under mpirun)")
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpirun is None:
        pytest.skip("no mpirun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([mpirun, "-n", "3", sys.executable, "-c", MPI_SCRIPT, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    for r in ranks:
        assert r["world"] == r["launched"] == 3
        assert r["sum_bits"] == ranks[0]["sum_bits"]  # the same bits on every rank
        assert r["biggest"] == [2, 0] and r["weights"] == [1.0, 1.0, 1.0]
        assert r["scalars"] == [4.5, 3.0] and r["objects"] == [0, 1, 2]
