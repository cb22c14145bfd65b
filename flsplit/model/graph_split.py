"""Split any ``nn.Module`` from its ``torch.fx`` graph.

A module that is not a layer stack (skip connections, functional ops in ``forward``, several
tensors alive at a boundary) is traced with ``torch.fx`` and cut into *stages* at named
points: a cut named by a module path (``"layer2"``, ``"blocks.3"``) sits at the beginning of
that module's first call, as in ``torch.distributed.pipelining``'s ``SplitPoint.BEGINNING``.
Stage ``i`` runs the graph's nodes between cut points ``i`` and ``i + 1``; what crosses a
boundary is every value computed before it and used after it (a skip connection's input, an
attention mask, several tensors of a tuple), and a stage passes on unchanged what a later
stage needs.

A boundary where one tensor crosses passes it as it is; where several cross, they travel
*packed*: flattened per sample and concatenated along dimension 1 into one
``(batch, sum of per-sample sizes)`` tensor of the model's floating dtype, and the next stage
splits and reshapes them back (non-float tensors, such as masks or ids, are cast there and
back; their values must be exact in that dtype). Packing keeps the data plane's contract of
one tensor per batch, so the codecs, the reply gate, the byte accounting and the server's
step rules handle a packed crossing as they handle any smashed tensor; cat, split and view
are exact, so training is unchanged bit for bit. ``SplitModel.crossing(cut)`` names what a
cut's tensor holds. A lossy codec (fp8, int8) then uses one scale for all of a crossing's
tensors.

Refused, each with the point and the reason: a cut inside a module whose ``forward`` cannot
be traced (data-dependent control flow; the module is kept whole and the cut points inside it
are not available), a cut across which a parameter or a stateful module would be used on
both sides (tied weights), a crossing value that is not a tensor with the batch as its first
dimension, and a cut where the model's raw input would cross to the server.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import fx, nn

__all__ = ["Crossing", "GraphSplitError", "Stage", "graph_split", "pack", "unpack"]

CutPoint = Union[str, int]


class GraphSplitError(ValueError):
    """A model cannot be split where asked; the text names the point and why."""


@dataclass(frozen=True)
class Crossing:
    """One tensor that crosses a boundary: the graph value's name, its per-sample shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def elements(self) -> int:
        """Values per sample."""
        return _numel(self.shape)


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """Several batched tensors as one ``(batch, sum of per-sample sizes)`` tensor.

    The packed dtype is the first floating tensor's (non-float tensors are cast to it)."""
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
    return torch.cat([t.reshape(t.shape[0], -1).to(dtype) for t in tensors], dim=1)


def unpack(packed: torch.Tensor, shapes: tuple, dtypes: tuple) -> tuple:
    """The tensors ``pack`` packed, given their per-sample shapes and dtypes."""
    sizes = [_numel(s) for s in shapes]
    if packed.dim() != 2 or packed.shape[1] != sum(sizes):
        raise ValueError(f"a packed crossing of {sum(sizes)} values per sample was expected, got shape "
                         f"{tuple(packed.shape)}")
    parts = torch.split(packed, sizes, dim=1)
    return tuple(p.reshape(p.shape[0], *s).to(d) for p, s, d in zip(parts, shapes, dtypes))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------- tracing
class _Untraceable(Exception):
    """Tracing failed inside the module at ``path``."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(path, cause)
        self.path, self.cause = path, cause


class _Tracer(fx.Tracer):
    """fx's tracer that keeps the modules in ``opaque`` whole and says where tracing failed."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Untraceable:
            raise
        except Exception as err:  # the innermost module whose forward could not be traced
            raise _Untraceable(self.path_of_module(m), err) from err


def _trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """The model's graph; modules whose forward cannot be traced are kept whole (``opaque``,
    path -> reason). Raises ``GraphSplitError`` if the model's own forward cannot be traced."""
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(model)
        except _Untraceable as err:
            if err.path in opaque or not err.path:  # pragma: no cover - a leaf cannot fail to trace
                raise GraphSplitError(f"cannot trace {type(model).__name__}: {err.cause}") from err
            opaque[err.path] = f"{type(err.cause).__name__}: {err.cause}"
            continue
        except Exception as err:  # in the root's own forward
            raise GraphSplitError(
                f"cannot split {type(model).__name__}: its forward cannot be traced by torch.fx "
                f"({type(err).__name__}: {err}); data-dependent control flow in the top-level forward "
                "cannot be cut: move it into a submodule (which is then kept whole) or build a "
                "SplitModel by hand"
            ) from err
        return fx.GraphModule(model, graph), opaque


def _paths(node: fx.Node) -> list[str]:
    """Module paths a node was created inside, outermost first (its own module last)."""
    paths = [qualname for qualname, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module" and (not paths or paths[-1] != node.target):
        paths.append(str(node.target))
    return paths


def _top_level(node: fx.Node) -> Optional[str]:
    """The outermost module called around a node (a ``ModuleList``'s items, which are called,
    rather than the list, which is not)."""
    paths = _paths(node)
    return paths[0] if paths else None


# ---------------------------------------------------------------------------------- cut points
def _compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def _default_points(nodes: list[fx.Node]) -> list[tuple[str, int]]:
    """The beginning of each outermost module call after the first, in call order."""
    points, seen = [], set()
    for i, node in enumerate(nodes):
        top = _top_level(node)
        if top is None or top in seen:
            continue
        seen.add(top)
        if i > 0:
            points.append((top, i))
    return points


def _point_of(path: str, nodes: list[fx.Node], model: nn.Module, opaque: dict[str, str]) -> int:
    """Index of the first node inside module ``path``; refused if ``path`` cannot be cut at."""
    for inner, reason in opaque.items():
        if path.startswith(inner + "."):
            raise GraphSplitError(
                f"cannot cut at {path!r}: it is inside {inner!r}, whose forward cannot be traced by torch.fx "
                f"and is kept whole ({reason}); cut at {inner!r} or after it"
            )
    for i, node in enumerate(nodes):
        if path in _paths(node):
            if i == 0:
                raise GraphSplitError(f"cannot cut at {path!r}: it is the model's first operation, the client "
                                      "would compute nothing")
            return i
    names = dict(model.named_modules())
    if path in names:
        raise GraphSplitError(f"cannot cut at {path!r}: the module is never called in the model's forward")
    top = [n for n, _ in model.named_children()]
    raise GraphSplitError(f"cannot cut at {path!r}: the model has no such module (top-level modules: {top})")


def _points(cuts: Optional[Sequence[CutPoint]], nodes: list[fx.Node], model: nn.Module,
            opaque: dict[str, str]) -> list[tuple[str, int]]:
    """The boundaries, as (name, node index), in graph order."""
    defaults = _default_points(nodes)
    if cuts is None:
        if not defaults:
            raise GraphSplitError(
                f"{type(model).__name__} has no cut point by default (its forward calls fewer than two "
                "top-level modules): name the cut points with cuts=['module.path', ...]"
            )
        return defaults
    out = []
    for cut in cuts:
        if isinstance(cut, bool) or not isinstance(cut, (int, str)):
            raise GraphSplitError(f"a cut point is a module path or an index, got {cut!r}")
        if isinstance(cut, int):
            if not 1 <= cut <= len(defaults):
                raise GraphSplitError(
                    f"cut point {cut} is outside the model: by index, cut k is the beginning of the (k+1)-th "
                    f"top-level module called, 1..{len(defaults)} ({[n for n, _ in defaults]})"
                )
            out.append(defaults[cut - 1])
        else:
            out.append((cut, _point_of(cut, nodes, model, opaque)))
    out.sort(key=lambda p: p[1])
    for (a, i), (b, j) in zip(out, out[1:]):
        if i == j:
            raise GraphSplitError(f"cut points {a!r} and {b!r} are the same point of the graph")
    return out


# ---------------------------------------------------------------------------------- stages
def _crossing(ordered: list[fx.Node], boundary: int, position: dict[fx.Node, int]) -> list[fx.Node]:
    """Values before position ``boundary`` used at or after it (the output node counts as
    after everything), in graph order."""
    return [n for n in ordered[:boundary] if any(position.get(u, len(ordered)) >= boundary for u in n.users)]


def _meta(node: fx.Node) -> Any:
    return node.meta.get("tensor_meta")


def _check_crossing(name: str, values: list[fx.Node], batch: int) -> list[Crossing]:
    out = []
    for v in values:
        meta = _meta(v)
        if v.op == "placeholder":
            raise GraphSplitError(f"cannot cut at {name!r}: the model's input itself is used after it (by "
                                  f"{[u.name for u in v.users]}), so the server would receive the raw data")
        if meta is None or not hasattr(meta, "shape"):
            raise GraphSplitError(
                f"cannot cut at {name!r}: the value {v.name!r} ({v.format_node()}) crosses it but is not a tensor; "
                "only tensors with the batch as their first dimension can cross a cut"
            )
        shape = tuple(meta.shape)
        if not shape or shape[0] != batch:
            raise GraphSplitError(
                f"cannot cut at {name!r}: the tensor {v.name!r} of shape {shape} crosses it but its first "
                f"dimension is not the batch ({batch}); only per-sample tensors can cross a cut"
            )
        out.append(Crossing(v.name, shape[1:], meta.dtype))
    return out


def _stage(root: nn.Module, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
           crossing_in: list[Crossing], crossing_out: list[Crossing]) -> fx.GraphModule:
    """The graph of one stage: unpack its input, run its nodes, pack its output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    if len(inputs) == 1:
        env[inputs[0]] = x
    else:
        parts = graph.call_function(unpack, (x, tuple(c.shape for c in crossing_in), tuple(c.dtype for c in crossing_in)))
        for i, v in enumerate(inputs):
            env[v] = graph.call_function(operator.getitem, (parts, i))

    def value(n: fx.Node) -> fx.Node:
        if n not in env and n.op == "get_attr":  # a parameter or constant read where it is used
            env[n] = graph.node_copy(n)
        return env[n]

    for node in nodes:
        env[node] = graph.node_copy(node, value)
    result = [value(v) for v in outputs]
    graph.output(result[0] if len(result) == 1 else graph.call_function(pack, tuple(result)))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="Stage")


def _owners(nodes: list[fx.Node], bounds: list[int], root: nn.Module) -> None:
    """Refuse a parameter, buffer or stateful module used in two stages (tied across a cut)."""
    stage_of: dict[str, int] = {}
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        used = set()
        for node in nodes[a:b]:
            if node.op == "call_module":
                used.update(f"{node.target}.{k}" for k in root.get_submodule(str(node.target)).state_dict())
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    used.add(str(arg.target))
        for target in used:
            other = stage_of.setdefault(target, s)
            if other != s:
                raise GraphSplitError(
                    f"{target!r} is used in block {other} and in block {s}: a parameter or buffer on both sides of a "
                    "cut would be trained as two copies; choose cut points that keep its uses together"
                )


def _no_inplace(root: nn.Module, graph: fx.Graph) -> None:
    """In-place ops would write into a stage's input, a leaf that requires grad on the server:
    use the out-of-place forms (same values)."""
    for m in root.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for node in graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                and not node.target.startswith("_") and hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]


class Stage(nn.Module):
    """One stage of a graph split: the stage's graph as traced in train mode and in eval mode.

    ``torch.fx`` reads Python attributes such as ``self.training`` once, while tracing
    (``F.dropout(x, training=self.training)``, ``if self.training:``), so the model is traced in
    each mode and the stage runs the graph of its current mode. Both graphs call the same
    module objects; the stage's own children are the train graph's, so its parameters and
    state dict keys are the original model's names.
    """

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule) -> None:
        super().__init__()
        for name, child in train_graph.named_children():
            self.add_module(name, child)
        for name, param in train_graph.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in train_graph.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        # Kept outside the module tree: their modules are the children above.
        object.__setattr__(self, "_graphs", {True: train_graph, False: eval_graph})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._graphs[self.training](x)


def _split_traced(model: nn.Module, example_input: torch.Tensor, cuts: Optional[Sequence[CutPoint]]):
    """``graph_split`` for the model in its current mode."""
    gm, opaque = _trace(model)
    _no_inplace(model, gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphSplitError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; split models take one tensor")
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise GraphSplitError(f"{type(model).__name__}.forward returns {type(result).__name__}; split models "
                              "return one tensor (the logits)")
    probe = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # no batch-norm statistics move; a graph traced in train mode still drops out
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            fx.passes.shape_prop.ShapeProp(gm).propagate(probe)
    except Exception as err:
        raise GraphSplitError(f"example_input of shape {tuple(example_input.shape)} does not run through "
                              f"{type(model).__name__}: {type(err).__name__}: {err}") from err
    finally:
        for m, mode in modes:
            m.training = mode
    nodes = _compute_nodes(gm.graph)
    points = _points(cuts, nodes, model, opaque)
    bounds = [0] + [i for _, i in points] + [len(nodes)]
    _owners(nodes, bounds, gm)
    ordered = placeholders + nodes  # the input at position 0, node i at i + 1
    position = {n: i for i, n in enumerate(ordered)}
    crossings: list[list[Crossing]] = []
    values: list[list[fx.Node]] = []
    for name, at in points:
        live = _crossing(ordered, at + 1, position)
        values.append(live)
        crossings.append(_check_crossing(name, live, int(probe.shape[0])))
    ins = [placeholders] + values
    outs = values + [[result]]
    meta_in = [[Crossing("x", tuple(probe.shape[1:]), probe.dtype)]] + crossings
    stages = [_stage(gm, nodes[a:b], ins[s], outs[s], meta_in[s], crossings[s] if s < len(crossings) else [])
              for s, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return stages, [name for name, _ in points], crossings


def graph_split(model: nn.Module, example_input: torch.Tensor,
                cuts: Optional[Sequence[CutPoint]] = None) -> tuple[list[Stage], list[str], list[list[Crossing]]]:
    """Stages of ``model`` between its cut points.

    Parameters
    ----------
    model : nn.Module
        Any module with one tensor input and one tensor output.
    example_input : Tensor
        A batch of inputs (its values are only run through the model to learn shapes).
    cuts : sequence of str or int, optional
        The cut points: module paths (the cut sits where the module is first called) or
        indices (``k``: before the ``(k+1)``-th top-level module called). Default: before
        each top-level module called, after the first.

    Returns
    -------
    stages, names, crossings
        ``len(cuts) + 1`` stage modules (their parameters are the model's, under the model's
        names), the name of each cut point, and what crosses each boundary.
    """
    if not isinstance(example_input, torch.Tensor):
        raise GraphSplitError(f"example_input must be a tensor (a batch of inputs), got {type(example_input).__name__}")
    was_training = model.training
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        train = _split_traced(model, example_input, cuts)
        model.eval()
        evaluate = _split_traced(model, example_input, cuts)
    finally:
        for m, mode in modes:
            m.training = mode
    (train_stages, names, crossings), (eval_stages, eval_names, eval_crossings) = train, evaluate
    if names != eval_names or [[(c.shape, c.dtype) for c in cs] for cs in crossings] != \
            [[(c.shape, c.dtype) for c in cs] for cs in eval_crossings]:
        raise GraphSplitError(
            f"{type(model).__name__} has other cut points or crossing tensors in eval mode than in train mode "
            f"({names} / {eval_names}); a split model must send the same tensors in both"
        )
    stages = [Stage(t, e) for t, e in zip(train_stages, eval_stages)]
    for stage in stages:
        stage.train(was_training)
    return stages, names, crossings
