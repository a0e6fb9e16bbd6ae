"""nn/micro_batch.py's eager runner: micro-batch gradients of float16 weights sum in float32."""
import numpy as np

import tinygrad3.functional as F
from tinygrad3 import Tensor
from nn import AdamW, Parameter
from nn.micro_batch import EagerMicroBatch


def test_eager_micro_batches_sum_float16_weight_gradients_in_float32():
    """dL/dW of sum(x W^T) is x: micro-batches of x = 1 and x = 2^-12 give a gradient of 1 + 2^-12,
    which float32 holds and float16 (spacing 2^-10 at 1) rounds to 1. The runner given the optimizer
    adds into its float32 buffer and leaves `.grad` unset; without it the sum is float16's."""
    def run(with_optimizer):
        w = Parameter(np.ones((1, 1), np.float16))
        opt = AdamW([("w", w)])
        runner = EagerMicroBatch(lambda x, y, weight: F.linear(x, w).sum(), opt if with_optimizer else None)
        for x in (1.0, 2.0 ** -12):
            runner(Tensor(np.full((1, 1), x, np.float16)), None, 1.0)
        runner.finish()
        return w, opt

    w, opt = run(True)
    assert w.grad is None
    np.testing.assert_array_equal(opt.grad_buffer, np.float32([1 + 2.0 ** -12]))
    w, opt = run(False)
    assert w.grad.dtype == np.float16 and float(w.grad[0, 0]) == 1.0
    assert not opt.grad_buffer.any()


def test_trainers_eager_runner_adds_into_the_optimizer_buffer():
    from nn.trainer import micro_batch_runner
    w = Parameter(np.ones((1, 1), np.float16))
    opt = AdamW([("w", w)])
    runner = micro_batch_runner(lambda x, y, weight: F.linear(x, w).sum(), opt, [w])
    assert type(runner) is EagerMicroBatch and runner.optimizer is opt
