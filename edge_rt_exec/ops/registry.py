"""The op registry: every op the executor runs is one `OpDef`, registered by the module of its family.

An op is defined once (STYLE.md #18): its name, the attributes it takes, its shape rule, its numpy twin (the
definition of its math), the numba kernels that implement it, how it binds to arena views (`bind`), which
kernel specializations to load before a run (`warm`) and a generator of random cases (`sample`) on which the
registry test checks kernels against twins. The compiler reads names, attributes, shape rules and twins from
here without importing numba (kernels are lazy, see `_jit.py`).

Conventions shared by every op:

* Inputs and outputs are positional (ONNX order); an absent optional one is `None` (`""` in a plan).
  Weights are inputs like any other; the engine passes them as the array their weight format views them
  with (float32 `[out, in]`, or the raw blocks of a quantized format) and says which format in
  `Site.formats`.
* `shape(shapes, dtypes, values, attrs, n_out) -> [(shape, dtype), ...]`: shapes are tuples of ints
  (weights: their logical shape), dtypes numpy names; `values[i]` holds the contents of small integer inputs
  listed in `value_inputs` (a Reshape target, Slice starts, ...). A disagreement raises `ShapeError`.
* `twin(ins, attrs, n_out) -> [array, ...]`: pure numpy, never writes its inputs; weights arrive
  dequantized to float32.
* `bind(site) -> call`: everything that can be resolved for one set of shapes is resolved here, once; the
  returned zero-argument callable only calls the kernel (STYLE.md #19).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._jit import Kernel

Shape = tuple[int, ...]
ShapeRule = Callable[[list, list, dict, dict, int], list]
Twin = Callable[[list, dict, int], list]


class ShapeError(ValueError):
    """Input shapes, dtypes or values an op cannot take."""


@dataclass
class Site:
    """One op at one set of input shapes: what `bind` resolves its kernel call against."""

    op: str  #: the op's name in the schedule (for messages)
    ins: list[np.ndarray | None]  #: arena views with the run's shapes; weights as their format views
    outs: list[np.ndarray | None]
    attrs: dict[str, Any]  #: the op's attributes, defaults filled in
    formats: list[str | None]  #: weight format of each input ("f32", "q4_1", ...); None for activations
    shapes: list[Shape | None]  #: logical shape of each input (a quantized weight's `[out, in]`)
    values: dict[int, np.ndarray] = field(default_factory=dict)  #: contents of the value inputs
    scratch: list[np.ndarray] = field(default_factory=list)  #: op-local scratch buffers (flat, planned size)
    streamed: dict[int, Any] = field(default_factory=dict)  #: input index -> reader of a table never loaded


@dataclass(frozen=True)
class WarmSpec:
    """What `warm` needs to know to load the kernel specializations an op will call."""

    in_dtypes: list[str | None]
    out_dtypes: list[str | None]
    readonly: list[bool]  #: per input: a read-only view (mapped weights)
    formats: list[str | None]
    attrs: dict[str, Any]
    big: bool  #: some buffer of the op is large enough for the parallel kernels


@dataclass(frozen=True)
class Sample:
    """A random case for the registry test: inputs (weights already in their format's view), attributes, and
    the format of each input."""

    ins: list[np.ndarray | None]
    attrs: dict[str, Any]
    formats: list[str | None] = field(default_factory=list)
    tol: float = 1e-5  #: max |kernel - twin| / max(1, |twin|)
    n_out: int = 1  #: outputs to ask for (Split's, LayerNormalization's statistics)


@dataclass(frozen=True)
class OpDef:
    """One op: everything the compiler and the executor need to know about it."""

    name: str
    shape: ShapeRule
    twin: Twin
    bind: Callable[[Site], Callable[[], Any]]
    warm: Callable[[WarmSpec], None]
    kernels: tuple[Kernel, ...]  #: empty only for metadata ops (Shape, Size), which `bind` does in numpy
    sample: Callable[[np.random.Generator], list[Sample]]
    attrs: dict[str, Any] = field(default_factory=dict)  #: attribute name -> default
    required: tuple[str, ...] = ()  #: attributes a plan must give (their default above is a placeholder)
    value_inputs: tuple[int, ...] = ()
    #: op-local scratch: (input shapes, attrs) -> element counts (float32) of each scratch buffer
    scratch: Callable[[list, dict], list[int]] | None = None
    #: FLOPs of one run at these shapes (the cost model); default: one per output element
    flops: Callable[[list, list, dict], int] | None = None
    #: output i may share its buffer with input j (`{i: j}`): the kernel reads before it writes
    inplace: dict[int, int] = field(default_factory=dict)
    #: inputs sliced along their first axis by a `rows=[r0, r1]` attribute (a Linear's weight and bias, tiled
    #: by the partitioner when a weight exceeds a slot): the op sees rows r0..r1 only
    row_tiled: tuple[int, ...] = ()
    #: weight inputs the op reads only some rows of (an embedding table): a streamed plan never loads them and
    #: the op reads the rows it needs from the weights file (`Site.streamed`)
    row_gather: tuple[int, ...] = ()
    doc: str = ""
    #: "onnx": the ONNX operator of this name (an ONNX graph may use it); "edge-rt": an op of ours that only the
    #: compiler's families and fusions emit (Linear, CausalAttention, ...)
    domain: str = "onnx"


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in REGISTRY:
        raise AssertionError(f"op {op.name} registered twice")
    REGISTRY[op.name] = op
    return op


def get(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


def with_defaults(op: OpDef, attrs: dict[str, Any]) -> dict[str, Any]:
    out = dict(op.attrs)
    out.update(attrs)
    return out


def infer(op: str, shapes: Sequence[Shape | None], dtypes: Sequence[str | None], values: dict[int, Any],
          attrs: dict[str, Any], n_out: int = 1) -> list[tuple[Shape, str]]:
    """Output `(shape, dtype)` of one op (shared by the compiler, at the plan's maximum dims, and the engine)."""
    d = get(op)
    return d.shape(list(shapes), list(dtypes), values, with_defaults(d, attrs), n_out)


def run_twin(op: str, ins: Sequence[np.ndarray | None], attrs: dict[str, Any], n_out: int = 1) -> list[np.ndarray]:
    """Evaluate the numpy twin (constant folding, validate mode, tests)."""
    d = get(op)
    with np.errstate(all="ignore"):  # numpy's float warnings are the data's business (inf, nan are values)
        return [np.asarray(o) for o in d.twin(list(ins), with_defaults(d, attrs), n_out)]


def flops(op: str, in_shapes: list, out_shapes: list, attrs: dict[str, Any]) -> int:
    d = get(op)
    if d.flops is not None:
        return int(d.flops(in_shapes, out_shapes, with_defaults(d, attrs)))
    return sum(numel(s) for s in out_shapes if s is not None)


# ---- shape helpers shared by the families ---------------------------------------------------------------------

def numel(shape: Sequence[int]) -> int:
    """Element count in Python ints (file-supplied dims must never wrap)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def broadcast(*shapes: Shape) -> Shape:
    """Numpy (multidirectional) broadcasting."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        d = 1
        for s in shapes:
            k = i - (rank - len(s))
            if k < 0:
                continue
            e = s[k]
            if e == d or e == 1:
                continue
            if d == 1:
                d = e
            else:
                raise ShapeError(f"shapes {[list(x) for x in shapes]} do not broadcast")
        out.append(d)
    return tuple(out)


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def ints(v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1).tolist()]


def need_value(values: dict[int, Any], i: int, op: str) -> Any:
    if i not in values:
        raise ShapeError(f"{op} needs the value of input {i} (it decides the output shape)")
    return values[i]


def flat(a: np.ndarray) -> np.ndarray:
    """The flat view kernels take (bool as uint8)."""
    f = a.reshape(-1)
    return f.view(np.uint8) if f.dtype == np.bool_ else f


def strides_of(shape: Sequence[int]) -> list[int]:
    """Element strides of a C-contiguous array of `shape`."""
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= int(d)
    return st[::-1]


def bcast_strides(shape: Sequence[int], out: Sequence[int]) -> list[int]:
    """Element strides of a contiguous `shape` broadcast to `out` (0 along broadcast dims)."""
    st = strides_of(shape)
    pad = len(out) - len(shape)
    return [0] * pad + [0 if shape[i] == 1 and out[pad + i] != 1 else st[i] for i in range(len(shape))]


def collapse(shape: Sequence[int], *strides: list[int]) -> tuple[np.ndarray, ...]:
    """Drop size-1 dims and merge neighbours that are contiguous in every operand; int64 arrays (rank >= 1)."""
    dims: list[int] = []
    sts: list[list[int]] = [[] for _ in strides]
    for i, d in enumerate(shape):
        if d == 1:
            continue
        if dims and all(s[-1] == strides[k][i] * d for k, s in enumerate(sts)):
            dims[-1] *= d
            for k, s in enumerate(sts):
                s[-1] = strides[k][i]
            continue
        dims.append(int(d))
        for k, s in enumerate(sts):
            s.append(strides[k][i])
    if not dims:
        dims = [1]
        sts = [[1] for _ in strides]
    return (np.array(dims, np.int64),) + tuple(np.array(s, np.int64) for s in sts)


#: Below this many elements a kernel runs its serial variant (launching a parallel region costs microseconds).
PAR_MIN = 1 << 15
