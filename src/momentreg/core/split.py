"""Split any ``nn.Module`` at its first ReLU with torch.fx, and push moments through the head.

``trace_split(model)`` symbolically traces ``model`` and returns ``(head, tail)``, two
``torch.fx.GraphModule`` that share the model's submodules and parameters, with
``model(x) == tail(relu(head(x)))``:

- the first ReLU in graph order counts in any form: a module (``nn.ReLU``), a function
  (``F.relu``, ``torch.relu`` and their in-place variants) or a method (``x.relu()``);
- the head is everything that ReLU depends on. It must be affine in the input: the layers
  ``momentreg.core.moments.affine_moments`` supports (Conv2d, Linear, BatchNorm2d in eval and
  training mode, Normalize, Flatten, Identity), shape operations (view, reshape, flatten,
  permute, ...) and adding, subtracting, multiplying or dividing by a constant;
- the tail is the rest of the graph, fed by the ReLU's output. It may not read anything computed
  before the ReLU (a skip connection over it), since the regularizer feeds the tail the ReLU's
  expected output only.

Anything else raises ``ValueError`` naming the node and where it is in the source ("tanh in
forward, line 12"). ``graph_moments(head, mean, var)`` is ``head_moments`` for such a head: the
mean through the layers, the variance through the same layers with squared weights and no bias.
"""

from __future__ import annotations

import operator
import os
import re
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from momentreg.core.moments import affine_moments
from momentreg.core.normalize import Normalize
from momentreg.errors import ConfigError

__all__ = ["trace_split", "graph_moments", "HEAD_LAYERS"]

HEAD_LAYERS = (Normalize, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten, nn.Identity)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_RELU_METHODS = {"relu", "relu_"}
# shape operations: applied alike to the mean and to the variance
_SHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "size",
    "dim",
    "view_as",
    "reshape_as",
}
_SHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    getattr,
    operator.getitem,
}
_SHIFTS = {operator.add, operator.sub, torch.add, torch.sub, operator.neg, torch.neg}
_SCALES = {operator.mul, torch.mul, operator.truediv, torch.div}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping Normalize whole and recording where each node comes from."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


def _where(node: fx.Node, root: nn.Module) -> str:
    """'tanh in forward, line 12': the node's operation and its last source frame."""
    if node.op == "call_module":
        what = f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    elif node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    else:
        what = str(node.target)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', node.meta.get("stack_trace") or "")
    frames = [f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]]  # the model's own code
    return f"{what} in {frames[-1][2]}, line {frames[-1][1]}" if frames else what


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _depends_on_input(nodes: set[fx.Node]) -> set[fx.Node]:
    """The nodes of ``nodes`` computed from the model's input (not constants such as get_attr)."""
    return {n for n in nodes if n.op == "placeholder" or _ancestors(n) & _placeholders(n.graph)}


def _placeholders(graph: fx.Graph) -> set[fx.Node]:
    return {n for n in graph.nodes if n.op == "placeholder"}


def _check_head_node(node: fx.Node, root: nn.Module, varying: set[fx.Node]) -> None:
    """Raise ValueError unless ``node`` is an operation the head may hold."""
    if node.op in ("placeholder", "get_attr") or node not in varying:
        return
    reason = None
    if node.op == "call_module":
        layer = root.get_submodule(node.target)
        if not isinstance(layer, HEAD_LAYERS):
            reason = "is not an affine layer"
    elif node.op == "call_method" and node.target in _SHAPE_METHODS:
        pass
    elif node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        pass
    elif node.op == "call_function" and node.target in _SHIFTS | _SCALES:
        inputs = [a for a in node.args if isinstance(a, fx.Node) and a in varying]
        if len(inputs) != 1 or set(node.kwargs) - {"out"}:
            reason = "combines two values computed from the input (their covariance is unknown)"
        elif node.target in (operator.truediv, torch.div) and node.args[0] is not inputs[0]:
            reason = "divides by a value computed from the input"
    else:
        reason = "is not affine"
    if reason:
        kinds = ", ".join(t.__name__ for t in HEAD_LAYERS)
        raise ConfigError(
            f"{_where(node, root)} {reason}; the head (everything the first ReLU depends on) "
            f"may hold only {kinds}, shape operations and arithmetic with constants"
        )


def _is_batch_size(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return node.op == "call_method" and node.target == "size" and dim == 0


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    return fx.GraphModule(root, graph)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trace_split(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(head, tail) of ``model`` around its first ReLU (see the module docstring); cached per
    model, so calling it at every training step costs a dictionary look-up.

    Args:
        model: any module whose forward torch.fx can trace, with one input and an affine head
            (convolutions, linear maps, normalizations, reshapes) before its first ReLU.

    Returns:
        ``(head, tail)`` graph modules: ``model(x) == tail(relu(head(x)))``.

    Shape:
        head: [B, *input_shape] -> the first ReLU's input; tail: that -> the model's output.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.fc(torch.relu(self.conv(x)).flatten(1))
        >>> net, x = Net(), torch.rand(4, 1, 4, 4)
        >>> head, tail = trace_split(net)
        >>> torch.allclose(tail(torch.relu(head(x))), net(x))
        True
    """
    if model in _CACHE:
        return _CACHE[model]
    nodes, relu, pre = _first_relu(model)
    head_nodes = _ancestors(relu)
    varying = _depends_on_input(head_nodes)
    for node in nodes:
        if node in head_nodes:
            _check_head_node(node, model, varying)
    head_graph, env = fx.Graph(), {}
    for node in nodes:
        if node in head_nodes:
            env[node] = head_graph.node_copy(node, env.__getitem__)
    head_graph.output(env[pre])
    tail_graph = _tail_graph(model, nodes, relu, head_nodes)
    split = _graph_module(model, head_graph), _graph_module(model, tail_graph)
    _CACHE[model] = split
    return split


def _first_relu(model: nn.Module) -> tuple[list, fx.Node, fx.Node]:
    """(the traced graph's nodes, its first ReLU, that ReLU's input), or a ConfigError saying
    why ``model`` cannot be split."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # control flow on values, unsupported Python: fx says which
        raise ConfigError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); pass "
            "split=(head, tail) yourself"
        ) from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ConfigError(
            f"{type(model).__name__}.forward must take one input, it takes {len(inputs)}"
        )
    relu = next((n for n in nodes if _is_relu(n, model)), None)
    if relu is None:
        raise ConfigError(f"{type(model).__name__} has no ReLU (module, function or method)")
    pre = relu.args[0] if relu.args else relu.kwargs.get("input")
    if not isinstance(pre, fx.Node) or pre.op == "placeholder":
        raise ConfigError(
            f"{_where(relu, model)} is the first ReLU, and there is no affine head before it"
        )
    return nodes, relu, pre


def _tail_graph(model: nn.Module, nodes: list, relu: fx.Node, head_nodes) -> fx.Graph:
    """The graph after ``relu``, fed by its output; a ConfigError where it reads a value
    computed before the ReLU (a skip connection over it)."""
    tail_graph, env = fx.Graph(), {}
    env[relu] = tail_graph.placeholder("relu_out")
    for node in nodes:
        if node is relu or node in head_nodes or node.op == "get_attr":
            continue  # constants (get_attr) are copied where the tail uses them
        if _is_batch_size(node) and node.args[0] not in env:
            # x.size(0) of a value before the ReLU, e.g. in out.view(x.size(0), -1): the batch
            # size, which the tail reads off its own input (the regularizer stacks two batches)
            env[node] = tail_graph.call_method("size", (env[relu], 0))
            continue
        for used in node.all_input_nodes:
            if used in env:
                continue
            if used.op == "get_attr":
                env[used] = tail_graph.node_copy(used, env.__getitem__)
            else:  # computed before the ReLU (or the input itself), read after it
                source = "the input" if used.op == "placeholder" else _where(used, model)
                raise ConfigError(
                    f"{_where(node, model)} reads {source}, computed before the first ReLU "
                    f"({_where(relu, model)}): a skip connection over the ReLU cannot be fed its "
                    "expected output; pass "
                    "split=(head, tail) yourself"
                )
        env[node] = tail_graph.node_copy(node, env.__getitem__)
    return tail_graph


class _Pair(NamedTuple):
    """A value computed from the input, in both propagations: mean (batch B), variance (batch 1)."""

    mean: object
    var: object


def graph_moments(
    head: fx.GraphModule, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head(mean), variance of head(x + n)) for a head from ``trace_split``; ``var`` is the input
    noise variance [1, *input_shape]. Layers go through ``affine_moments``; shape operations act
    on both; a constant shift leaves the variance, a constant factor c scales it by c^2."""
    env: dict[fx.Node, object] = {}

    def load(arg, part: int):
        def one(a):
            value = env[a] if isinstance(a, fx.Node) else a
            return value[part] if isinstance(value, _Pair) else value

        return fx.node.map_aggregate(arg, one)

    for node in head.graph.nodes:
        if node.op == "placeholder":
            env[node] = _Pair(mean, var)
        elif node.op == "get_attr":
            env[node] = fx.graph_module._get_attr(head, node.target)
        elif node.op == "output":
            out = env[node.args[0]]
            return out.mean, out.var
        elif not any(isinstance(env[n], _Pair) for n in node.all_input_nodes):
            env[node] = _run(head, node, load(node.args, 0), load(node.kwargs, 0))
        elif node.op == "call_module":
            (x,) = [env[n] for n in node.all_input_nodes]
            env[node] = _Pair(*affine_moments(head.get_submodule(node.target), x.mean, x.var))
        elif node.target in _SCALES:  # x * c, c * x or x / c with a constant c
            (x,) = [env[n] for n in node.all_input_nodes if isinstance(env[n], _Pair)]
            c = next(a for a in load(node.args, 0) if a is not x.mean)
            scaled = (
                x.var * (c * c) if node.target in (operator.mul, torch.mul) else x.var / (c * c)
            )
            env[node] = _Pair(_run(head, node, load(node.args, 0), load(node.kwargs, 0)), scaled)
        elif node.target in _SHIFTS:
            (x,) = [env[n] for n in node.all_input_nodes if isinstance(env[n], _Pair)]
            env[node] = _Pair(_run(head, node, load(node.args, 0), load(node.kwargs, 0)), x.var)
        else:  # a shape operation
            env[node] = _Pair(
                _run(head, node, load(node.args, 0), load(node.kwargs, 0)),
                _run(head, node, load(node.args, 1), load(node.kwargs, 1)),
            )
    raise AssertionError("a graph always ends in an output node")


def _run(root: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        self, *rest = args
        return getattr(self, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)
