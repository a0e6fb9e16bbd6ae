"""Draw the graph that a Tensor's backward will walk, as SVG (and Graphviz DOT).

    with record_shapes():                 # the engine keeps no output shapes: note them while recording
        loss = model(x, y)[1]
    draw(loss, "graph.svg", names=model.named_parameters(), dot_path="graph.dot")

A box is a Function: its class, its output's shape and dtype, and every array it saved for its
backward (its attributes not starting with "_", which the engine frees once that backward has run;
arrays of the Functions it holds, such as ResidualRMSNorm's RMSNorm, are listed under theirs). A
saved array that is a named leaf's own data is shown as `name = leaf`. An ellipse is a leaf tensor
(a parameter or an input): its name, shape and dtype. An arrow runs from each input to the Function
that read it; the output's Function has a thick border.

The layout is done here, so no Graphviz is needed: rows by longest path from the inputs (a leaf sits
just above its first reader), an edge that skips rows bends through one point per row, the order
within a row comes from the mean position of the neighbours, a few sweeps each way. The same graph
always gives the same file. The DOT file is for those who have Graphviz (`dot -Tsvg graph.dot`).
"""
import contextlib
import weakref

import numpy as np

from . import backend
from .tensor import Function, Tensor

_shapes = weakref.WeakKeyDictionary()  # Function -> its output's shape, noted under record_shapes()

FONT, CHAR, LINE, PAD, GAP_X, GAP_Y = 12, 7.3, 15, 8, 24, 36


@contextlib.contextmanager
def record_shapes():
    """Within this block every Function that records a graph notes its output's shape for draw.
    (It swaps Function.__call__ for the block, so use it from one thread at a time.)"""
    original = Function.__call__

    def call(fn, *inputs):
        out = original(fn, *inputs)
        if out._creator is fn:
            _shapes[fn] = tuple(out.shape)
        return out

    Function.__call__ = call
    try:
        yield
    finally:
        Function.__call__ = original


def functions(tensor):
    """The Functions behind a non-leaf tensor, each after every Function it read (forward order)."""
    if tensor._creator is None:
        raise ValueError("draw: this tensor is a leaf, there is no graph behind it")
    order, seen, stack = [], set(), [(tensor._creator, False)]
    while stack:
        fn, done = stack.pop()
        if done:
            order.append(fn)
            continue
        if id(fn) in seen:
            continue
        if not hasattr(fn, "_parents"):
            raise ValueError("draw: this graph was freed by a backward pass; draw it before calling backward()")
        seen.add(id(fn))
        stack.append((fn, True))
        stack.extend((p, False) for p in reversed(fn._parents) if isinstance(p, Function) and id(p) not in seen)
    return order


def saved_arrays(fn, prefix=""):
    """(name, array) for every array fn keeps for its backward, searched through the lists, tuples
    and Functions it holds (named `norm.x`, `blocks[0][2].lse`, ...)."""
    found = []
    for name, value in vars(fn).items():
        if not name.startswith("_"):
            found += _arrays(prefix + name, value)
    return found


def _arrays(name, value):
    if isinstance(value, np.ndarray) or (backend.cupy is not None and isinstance(value, backend.cupy.ndarray)):
        return [(name, value)]
    if isinstance(value, Function):
        return saved_arrays(value, name + ".")
    if isinstance(value, (list, tuple)):
        return [found for i, v in enumerate(value) for found in _arrays(f"{name}[{i}]", v)]
    return []


def _shape(shape):
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def function_lines(fn, leaf_names=None):
    """The text of fn's box: class; output shape and dtype; one line per saved array."""
    leaf_names = leaf_names or {}
    shape = _shapes.get(fn)
    lines = [type(fn).__name__, (_shape(shape) + " " if shape is not None else "") + str(np.dtype(fn._out_dtype))]
    for name, array in saved_arrays(fn):
        leaf = leaf_names.get(id(array))
        lines.append(f"{name} = {leaf}" if leaf else f"{name} {_shape(array.shape)} {array.dtype}")
    return lines


def _names(names):
    """id(leaf data) -> name, from (name, tensor) pairs or a {name: tensor} dict."""
    pairs = names.items() if isinstance(names, dict) else (names or ())
    return {id(t.data): name for name, t in pairs}


def _graph(tensor, names):
    """Nodes (key -> text lines, kind) and edges (input key, reader key) of tensor's graph."""
    fns, leaf_names = functions(tensor), _names(names)
    nodes, edges = {}, []
    for fn in fns:
        nodes[id(fn)] = (function_lines(fn, leaf_names), "root" if fn is tensor._creator else "function")
        for parent in fn._parents:
            if isinstance(parent, Tensor):
                name = leaf_names.get(id(parent.data), "leaf")
                nodes.setdefault(id(parent), ([name, f"{_shape(parent.shape)} {parent.dtype}"], "leaf"))
            if parent is not None and (id(parent), id(fn)) not in edges:
                edges.append((id(parent), id(fn)))
    return nodes, edges


def _rows(nodes, edges):
    """Row of every node: Functions by longest path, a leaf just above its first reader."""
    row, inputs = {}, {}
    for src, dst in edges:
        inputs.setdefault(dst, []).append(src)
    for key, (_, kind) in nodes.items():  # forward order: a Function's inputs come first
        if kind != "leaf":
            row[key] = 1 + max([row[s] for s in inputs.get(key, []) if s in row], default=0)
    for key, (_, kind) in nodes.items():
        if kind == "leaf":
            row[key] = min(row[dst] for src, dst in edges if src == key) - 1
    return row


def _layout(nodes, edges):
    """Positions: (x, y, width, height) per node, and each edge as its list of bend points."""
    row = _rows(nodes, edges)
    size = {k: (PAD * 2 + CHAR * max(map(len, lines)), PAD * 2 + LINE * len(lines)) for k, (lines, _) in nodes.items()}
    chains, rows = [], {}
    for key in nodes:
        rows.setdefault(row[key], []).append(key)
    for src, dst in edges:  # one bend point per row the edge crosses
        chain = [src]
        for r in range(row[src] + 1, row[dst]):
            bend = ("bend", src, dst, r)
            size[bend], row[bend] = (2, 0), r
            rows[r].append(bend)
            chain.append(bend)
        chains.append(chain + [dst])
    neighbours = {key: ([], []) for key in size}  # (above, below)
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            neighbours[b][0].append(a)
            neighbours[a][1].append(b)
    order = [rows[r] for r in sorted(rows)]
    x = {}
    for sweep in range(8):  # alternately by the rows above and by the rows below
        _place(order, size, x, neighbours, sweep)
        for keys in order:
            keys.sort(key=lambda k: _mean([x[n] for n in neighbours[k][sweep % 2]], x[k]))
    _place(order, size, x, neighbours, 8)
    left = min(x[k] - size[k][0] / 2 for k in size)
    y, top = {}, PAD * 2
    for keys in order:
        height = max(size[k][1] for k in keys)
        for k in keys:
            y[k] = top + height / 2
        top += height + GAP_Y
    box = {k: (x[k] - left + PAD * 2, y[k], size[k][0], size[k][1]) for k in size}
    return box, chains, top


def _mean(values, default):
    return sum(values) / len(values) if values else default


def _place(order, size, x, neighbours, sweep):
    """Centres in each row: as near the neighbours' mean as the row's order and spacing allow."""
    for keys in (order if sweep % 2 == 0 else order[::-1]):
        want = [_mean([x[n] for n in neighbours[k][0] + neighbours[k][1] if n in x], x.get(k, 0.0)) for k in keys]
        right = -float("inf")
        for k, w in zip(keys, want):  # left to right, each at least a gap after the one before
            x[k] = max(w, right + GAP_X + size[k][0] / 2)
            right = x[k] + size[k][0] / 2
        shift = sum(x[k] - w for k, w in zip(keys, want)) / len(keys)
        for k in keys:  # the row as a whole back onto its neighbours
            x[k] -= shift


def _escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _svg(nodes, edges):
    box, chains, height = _layout(nodes, edges)
    width = max(cx + w / 2 for cx, _, w, _ in box.values()) + PAD * 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="{FONT}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for chain in chains:
        points = [(box[chain[0]][0], box[chain[0]][1] + box[chain[0]][3] / 2)]
        for bend in chain[1:-1]:
            points.append((box[bend][0], box[bend][1]))
        points.append((box[chain[-1]][0], box[chain[-1]][1] - box[chain[-1]][3] / 2))
        path = f"M{points[0][0]:.1f},{points[0][1]:.1f}"
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            mid = (y0 + y1) / 2
            path += f" C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"
        out.append(f'<path d="{path}" fill="none" stroke="#555" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for key, (lines, kind) in nodes.items():
        cx, cy, w, h = box[key]
        if kind == "leaf":
            out.append(f'<ellipse cx="{cx:.1f}" cy="{cy:.1f}" rx="{w / 2 + PAD:.1f}" ry="{h / 2:.1f}" '
                       'fill="#fff4c2" stroke="#a08000"/>')
        else:
            out.append(f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" '
                       f'fill="#e3efff" stroke="#2b5797" stroke-width="{3 if kind == "root" else 1}"/>')
        for i, line in enumerate(lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            ty = cy - h / 2 + PAD + LINE * (i + 0.8)
            out.append(f'<text x="{cx:.1f}" y="{ty:.1f}" text-anchor="middle"{weight}>{_escape(line)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def _dot(nodes, edges):
    out = ['digraph graph_behind_tensor {', '  node [fontname="monospace", fontsize=10];']
    for i, (key, (lines, kind)) in enumerate(nodes.items()):
        shape = "ellipse" if kind == "leaf" else "box"
        label = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
        pen = ", penwidth=3" if kind == "root" else ""
        out.append(f'  n{key} [shape={shape}, label="{label}"{pen}];')
    out += [f"  n{src} -> n{dst};" for src, dst in edges]
    return "\n".join(out + ["}"]) + "\n"


def draw(tensor, path, names=None, dot_path=None):
    """Write the graph behind `tensor` to `path` as SVG (and to `dot_path` as DOT, when given).

    names: (name, tensor) pairs or a {name: tensor} dict naming leaves, e.g. model.named_parameters().
    Draw before backward(), which frees the graph. Shapes appear for Functions recorded inside
    record_shapes(); the others show their output's dtype only.
    """
    nodes, edges = _graph(tensor, names)
    # Keys are ids, which differ from run to run: number the nodes in forward order instead.
    number = {key: i for i, key in enumerate(nodes)}
    nodes = {number[k]: v for k, v in nodes.items()}
    edges = [(number[s], number[d]) for s, d in edges]
    with open(path, "w") as f:
        f.write(_svg(nodes, edges))
    if dot_path is not None:
        with open(dot_path, "w") as f:
            f.write(_dot(nodes, edges))
