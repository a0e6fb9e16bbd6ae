"""One training update of the tiny Gemma 3 through the engine, printing every number that
docs/walkthrough.md quotes (tests/test_docs.py checks that each printed line is in it).

    python docs/walkthrough.py                # also writes docs/decoder_layer.svg
    python docs/walkthrough.py --out /tmp     # the picture into another directory

Float32 on the CPU, the reference path, as train.py's update does it: the batch, the Functions
the forward records, the backward in the order the engine runs it (measured by wrapping each
Function's backward), then the loss scaler and AdamW.
"""
import argparse
import collections
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import nn  # noqa: E402
from data.synthetic import generate_stories  # noqa: E402
from data.tokenizer import EOT_ID, gpt2  # noqa: E402
from models import Gemma3, Gemma3Config  # noqa: E402
from tinygrad3 import ADDED, Function, Tensor  # noqa: E402
from tinygrad3.draw import draw, function_lines, functions, record_shapes, saved_arrays  # noqa: E402

B, T = 2, 16


def batch(enc):
    """(x, y): the first B*T + 1 tokens of generated stories (each followed by <|endoftext|>, as
    data/prepare.py writes them), in B rows of T + 1."""
    ids = []
    for story in generate_stories(4, seed=0):
        ids += enc.encode_ordinary(story.strip()) + [EOT_ID]
    rows = [np.array(ids[b * T:b * T + T + 1], dtype=np.int64) for b in range(B)]
    return np.stack([r[:-1] for r in rows]), np.stack([r[1:] for r in rows])


def owner(array):
    """The array that owns the memory of `array` (itself, or the base of a view)."""
    while array.base is not None:
        array = array.base
    return array


def held_bytes(fns, outside):
    """Bytes of the distinct arrays these Functions still hold for backward (views counted once,
    by the array owning the memory), leaving out memory owned by `outside` (the parameters')."""
    owners = {id(owner(a)): owner(a).nbytes for fn in fns for _, a in saved_arrays(fn)}
    return sum(n for key, n in owners.items() if key not in outside)


def label(fn, names):
    """The Function's class and the modules whose weights it reads (`Linear layers.0.mlp.down_proj`;
    stacked weights: `Linear layers.0.mlp.gate_proj + up_proj`)."""
    read = [names[id(p.data)].removeprefix("model.").removesuffix(".weight")
            for p in fn._parents if isinstance(p, Tensor) and id(p.data) in names]
    if not read:
        return type(fn).__name__
    return f"{type(fn).__name__} {read[0]}" + "".join(f" + {r.rsplit('.', 1)[-1]}" for r in read[1:])


def instrument(fns, outside, names):
    """Wrap each Function's backward. As the engine calls it, note: its label, the bytes the graph
    still holds, and the contributions its output's gradient was summed from (who sent each, how:
    returned as a new array, passed on as the sender's own gradient, or added in place into the
    sum through grad_target), and the gradient itself."""
    steps, arrived = [], collections.defaultdict(list)
    for fn in fns:
        def backward(gy, fn=fn, original=fn.backward):
            steps.append((label(fn, names), held_bytes(fns, outside), arrived[id(fn)], gy.copy()))
            targets = [fn.grad_target(i) for i in range(len(fn._parents))]
            before = [None if t is None else t.copy() for t in targets]
            grads = original(gy)
            for parent, g, target, old in zip(fn._parents, grads if isinstance(grads, tuple) else (grads,),
                                              targets, before):
                if isinstance(parent, Function) and g is not None:
                    how, value = (("added in place", target - old) if g is ADDED else
                                  ("passed on", g) if g is gy else ("returned", g))
                    arrived[id(parent)].append((steps[-1][0], how, np.array(value)))
            return grads
        fn.backward = backward
    return steps


def layer_slice(fns, names, i):
    """(start, stop) of decoder layer i's Functions: the first to the last one reading its weights."""
    prefix = f"model.layers.{i}."
    touch = [k for k, fn in enumerate(fns)
             if any(isinstance(p, Tensor) and names.get(id(p.data), "").startswith(prefix) for p in fn._parents)]
    return touch[0], touch[-1] + 1


def show_batch(enc, config, params, x, y):
    n_params = sum(t.size for _, t in params)
    print(f"model: Gemma3Config.tiny(), float32 on the CPU, {n_params:,} parameters "
          f"({config.vocab_size:,} x {config.hidden_size} embedding and as many in lm_head)")
    print(f"batch: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}, {x.size} tokens; y[b, t] = x[b, t + 1]")
    print(f"x[0] = {x[0].tolist()}")
    print(f"x[0] reads {enc.decode(x[0].tolist())!r}")
    print()


def show_forward(config, loss, fns, names, outside):
    """The whole graph, then decoder layer 0 Function by Function; returns layer 0's Functions."""
    start, stop = layer_slice(fns, names, 0)
    size, layers = stop - start, config.num_hidden_layers
    assert all(layer_slice(fns, names, i) == (start + i * size, stop + i * size) for i in range(layers))
    around = [type(fn).__name__ for fn in fns[:start] + fns[start + layers * size:]]
    vocab = config.unpadded_vocab_size
    print(f"loss {loss.item():.4f} (ln {vocab} = {math.log(vocab):.4f})")
    print(f"{len(fns)} Functions: " + ", ".join(f"{name} {n}" for name, n in
                                                collections.Counter(type(fn).__name__ for fn in fns).most_common()))
    print(f"{size} per decoder layer x {layers} layers, and {len(around)} around them: " + ", ".join(around))
    print(f"saved for backward: {held_bytes(fns, outside):,} bytes in distinct arrays (parameters not counted)")
    print()
    layer, short = fns[start:stop], {k: v.removeprefix("model.layers.0.") for k, v in names.items()}
    print("| # | Function | output | saved for backward |")
    print("|---|---|---|---|")
    for k, fn in enumerate(layer, 1):
        lines = function_lines(fn, short)
        print(f"| {k} | {lines[0]} | {lines[1]} | {', '.join(lines[2:]) or '(nothing)'} |")
    print()
    print(f"layer 0 holds {held_bytes(layer, outside):,} bytes for backward; "
          f"{sum(len(saved_arrays(fn)) for fn in layer)} saved arrays, "
          f"{sum(1 for fn in layer for _, a in saved_arrays(fn) if id(owner(a)) in outside)} of them parameters")
    head = fns[-1]
    print(f"{type(head).__name__} holds " + ", ".join(f"{n} {a.shape} {a.dtype}" for n, a in saved_arrays(head)
                                                      if a.size > 1) + f": {held_bytes([head], outside):,} bytes")
    print()
    return layer


def show_backward(steps, first, size, weight, held_after):
    """The engine's order (the first two steps, then decoder layer 0 from step `first` on), the
    bytes still held, and the residual stream's gradient as the sum of its contributions."""
    n = len(steps)
    print("| step | Function | bytes held before it | its output's gradient, the sum of |")
    print("|---|---|---|---|")
    for k in [0, 1, None] + list(range(first, n)):
        if k is None:
            print(f"| 3-{first} | layers 2 and 1, {size} each | | |")
            continue
        name, held, parts, _ = steps[k]
        summed = " + ".join(f"{sender} ({how})" for sender, how, _ in parts) or f"the upstream gradient {weight:g}"
        print(f"| {k + 1} | {name} | {held:,} | {summed} |")
    print()
    at = (0, 1, 19, 39, 59, n - 1)
    print(f"bytes held before steps {', '.join(str(k + 1) for k in at)} and after: "
          + ", ".join(f"{steps[k][1]:,}" for k in at) + f", {held_after:,}")
    parts, stream = steps[n - 2][2:]  # step n - 1 is the Mul: its output is the stream entering layer 0
    total = sum(value for _, _, value in parts)
    print("residual stream entering layer 0 (the Mul's output), unscaled: contributions of norm "
          + " and ".join(f"{np.linalg.norm(v) / weight:.4f} ({sender})" for sender, _, v in parts)
          + f", their sum {np.linalg.norm(stream) / weight:.4f}; "
          f"max |sum - gradient| = {np.abs(total - stream).max():g}")
    print()


def loss_of(model, x, y, weight):
    """train.py's micro-batch loss: the head told the gradient it will get (its loss weight)."""
    return model(x, y, return_logits=False, loss_grad=weight)[1]


def show_update(model, opt, scaler, schedule, params, x, y, config):
    """Unscale, inf check, clip, AdamW on the gradients of the backward above; then an update
    whose gradients hold an inf, as an fp16 overflow leaves them."""
    scaled = [t.grad.copy() for _, t in params]
    for _, t in params:
        t.grad = None
    loss_of(model, x, y, 1.0).backward()
    diff = max(float(np.abs(s / np.float32(scaler.scale) - t.grad).max()) for s, (_, t) in zip(scaled, params))
    for s, (_, t) in zip(scaled, params):
        t.grad = s
    print(f"loss scale {scaler.scale:g}; gradients / scale against an unscaled backward: max difference {diff:g}")

    before = {name: opt.master_of(name).copy() for name, _ in params}
    lr = schedule(opt.step_count)
    result = opt.step(lr, inv_scale=scaler.inv_scale, clip_norm=1.0)
    scaler.update(result.found_inf)
    opt.zero_grad()
    change = {name: np.abs(opt.master_of(name) - before[name]) for name, _ in params}
    moved = {name: int((c > 0).sum()) for name, c in change.items()}
    rows = int((change["model.embed_tokens.weight"].sum(axis=1) > 0).sum())
    norms = sum(moved[name] for name, t in params if t.ndim == 1)
    print(f"update 1: lr {lr:g}, found_inf {result.found_inf}, grad norm {result.grad_norm:.4f}, "
          f"clip factor {result.clip_coef:.4f}, step_count {opt.step_count}")
    print(f"largest change of a weight {max(c.max() for c in change.values()):.4g}; weights that moved "
          f"{sum(moved.values()):,} of {opt.num_params:,} = {opt.num_decayed:,} decayed + {norms:,} norm weights + "
          f"{rows} embedding rows x {config.hidden_size} ({len(np.unique(x))} distinct ids in x)")

    (loss_of(model, x, y, scaler.scale) * scaler.scale).backward()
    model.lm_head.weight.grad[0, 0] = np.inf
    master, m, scale = opt.master.copy(), opt.m.copy(), scaler.scale
    result = opt.step(schedule(opt.step_count), inv_scale=scaler.inv_scale, clip_norm=1.0)
    scaler.update(result.found_inf)
    opt.zero_grad()
    print(f"update 2 with an inf planted: found_inf {result.found_inf}, masters and moments unchanged: "
          f"{bool((opt.master == master).all() and (opt.m == m).all())}, step_count {opt.step_count}, "
          f"loss scale {scale:g} -> {scaler.scale:g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="where decoder_layer.svg goes")
    args = p.parse_args(argv)

    enc, config = gpt2(), Gemma3Config.tiny()
    model = Gemma3(config, seed=0)
    x, y = batch(enc)
    params = list(model.named_parameters())
    show_batch(enc, config, params, x, y)

    # The trainer's objects, built before the forward: AdamW re-binds the parameters to its buffers.
    opt = nn.AdamW(params, weight_decay=0.1)
    scaler = nn.LossScaler()  # train.py enables it for float16 only; here it shows its arithmetic
    schedule = nn.LRSchedule(1e-3, warmup_steps=10, total_steps=100)
    weight = scaler.scale / 1  # loss scale / grad_accum: what backward multiplies the loss by
    names = {id(t.data): name for name, t in params}
    outside = {id(owner(t.data)) for _, t in params}

    with record_shapes():
        loss = loss_of(model, x, y, weight)
    fns = functions(loss)
    layer = show_forward(config, loss, fns, names, outside)

    # The same layer alone, on a leaf input, for the picture: the same Functions.
    h = Tensor(np.zeros((B, T, config.hidden_size), np.float32), requires_grad=True)
    with record_shapes():
        alone = model.model.layers[0](h)
    assert [type(f).__name__ for f in functions(alone)] == [type(f).__name__ for f in layer]
    draw(alone, os.path.join(args.out, "decoder_layer.svg"),
         names=[("h (residual stream)", h)] + list(model.model.layers[0].named_parameters()))

    steps = instrument(fns, outside, names)
    (loss * weight).backward()
    assert len(steps) == len(fns)
    first = len(steps) - len(layer) - 2  # layer 0 runs just before the Mul and the Embedding
    assert steps[first][0] == "ResidualRMSNorm layers.0.post_feedforward_layernorm"
    show_backward(steps, first, len(layer), weight, held_bytes(fns, outside))
    show_update(model, opt, scaler, schedule, params, x, y, config)


if __name__ == "__main__":
    main()
