"""Running an ONNX-derived plan: named inputs in, every graph output out.

The plan's `model["onnx"]` block (written by the compiler's ONNX frontend) names the graph inputs (dtype and
dims, symbolic dims with their planned maximum), the outputs and the small constants (shape vectors, scalars)
that live in the arena's persistent region. Every buffer is planned for the maximum sizes; a run binds the
symbolic dims to the actual input sizes, computes each op's output shape (`onnx_shapes.infer`) and views
the first elements of the op's buffers with that shape. Weights come from the engine (mapped or streamed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import onnx_reference as ref
from . import onnx_shapes as S
from .errors import InternalError, UserError
from .onnx_ops import HANDLERS, flat
from .plan import Op


@dataclass
class _Prepared:
    """What the runner needs of one schedule op, resolved once."""

    type: str  #: the ONNX op type ("onnx." stripped)
    args: list[tuple[int, str]]  #: (0: absent, 1: tensor, 2: weight role) per ONNX input position
    outs: list[str]  #: output names by position ("" for an absent optional output)
    attrs: dict[str, Any]
    value_idx: tuple[int, ...]
    handler: Callable[[list, list, dict], Any]


class OnnxRunner:
    """Binds a loaded `Engine` (arena, weights, streamer) to the ONNX handlers."""

    def __init__(self, engine: Any) -> None:
        self.e = engine
        plan = engine.plan
        self.where = str(plan.path or plan.model.get("name"))
        info = plan.model["onnx"]
        self.inputs: list[dict[str, Any]] = info["inputs"]
        self.outputs: list[str] = [o["name"] for o in info["outputs"]]
        self.bounds: dict[str, int] = info.get("bounds", {})
        self.buf: dict[str, np.ndarray] = engine.buf
        self.cap = {n: b.nbytes // max(1, np.dtype(b.dtype).itemsize) for n, b in plan.buffers.items()
                    if b.kind != "slot"}
        self.const_shapes: dict[str, tuple[int, ...]] = {}
        for name, c in info.get("constants", {}).items():
            arr = np.asarray(c["data"], dtype=np.dtype(c["dtype"])).reshape(c["shape"])
            if name not in self.buf or arr.size > self.cap[name]:
                raise UserError(f"{self.where}: constant '{name}' does not fit its buffer; the plan is corrupt")
            self.buf[name].reshape(-1)[:arr.size] = arr.reshape(-1)
            self.const_shapes[name] = tuple(arr.shape)
        self.shapes: dict[str, tuple[int, ...]] = dict(self.const_shapes)
        self.prep: dict[int, _Prepared] = {}
        for op in plan.schedule:
            if op.op.startswith("onnx."):
                self.prep[op.index] = self._prepare(op)

    def _prepare(self, op: Op) -> _Prepared:
        t = op.op[len("onnx."):]
        handler = HANDLERS.get(t)
        if handler is None:
            raise UserError(f"{self.where}: op type {t!r} (op '{op.name}') is not supported by this executor; "
                            "upgrade edge-rt on the device")
        args: list[tuple[int, str]] = []
        for a in op.attrs.get("args", []):
            if a == "":
                args.append((0, ""))
            elif a.startswith("@"):
                args.append((2, a[1:]))
            else:
                args.append((1, a))
        attrs = {k: v for k, v in op.attrs.items() if k not in ("args", "outs", "scratch")}
        return _Prepared(t, args, list(op.attrs.get("outs", op.outputs)), attrs, S.VALUE_INPUTS.get(t, ()), handler)

    def table(self) -> dict[str, Callable[[Op, int, dict[str, np.ndarray]], None]]:
        return {op.op: self.run_op for op in self.e.plan.schedule if op.op.startswith("onnx.")}

    # ---- views ------------------------------------------------------------------------------------------------
    def view(self, name: str) -> np.ndarray:
        shape = self.shapes.get(name)
        if shape is None:
            raise InternalError(f"tensor {name} is read before any op wrote it")
        return self.buf[name].reshape(-1)[:S.numel(shape)].reshape(shape)

    def out_view(self, name: str, shape: tuple[int, ...], dtype: str, op: Op) -> np.ndarray:
        n = S.numel(shape)
        if n > self.cap[name]:
            raise UserError(f"{self.where}: op '{op.name}' needs {n} elements for '{name}' {list(shape)} at these "
                            f"input sizes but the plan holds {self.cap[name]}; use smaller inputs or recompile with "
                            "larger max_context= / max_batch_tokens=")
        b = self.buf[name]
        if b.dtype != np.dtype(dtype):
            raise InternalError(f"op {op.name}: output {name} infers to {dtype} but its buffer is {b.dtype}")
        self.shapes[name] = tuple(shape)
        return b.reshape(-1)[:n].reshape(shape)

    # ---- one op -----------------------------------------------------------------------------------------------
    def run_op(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        p = self.prep[op.index]
        ins: list[np.ndarray | None] = []
        streamed_table = None
        for kind, r in p.args:
            if kind == 1:
                ins.append(self.view(r))
            elif kind == 2:
                arr = w.get(r)
                if arr is None:  # an embedding table in a streamed plan: rows are read from the file
                    streamed_table = op.weights[r]
                    t = self.e.plan.tensors[streamed_table]
                    arr = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(t.shape), [0] * len(t.shape))
                ins.append(arr)
            else:
                ins.append(None)
        try:
            values = {i: ins[i] for i in p.value_idx if i < len(ins) and ins[i] is not None}
            specs = S.infer(p.type, [None if x is None else x.shape for x in ins],
                            [None if x is None else x.dtype.name for x in ins], values, p.attrs, len(p.outs))
        except S.ShapeError as e:
            raise UserError(f"{self.where}: op '{op.name}' ({p.type}): {e}; the inputs do not fit this graph") \
                from None
        outs = [self.out_view(name, sh, dt, op) if name else None for name, (sh, dt) in zip(p.outs, specs)]
        if all(o is None or o.size == 0 for o in outs):
            return
        want = None
        if self.e.validate and streamed_table is None:
            want = ref.run(p.type, [None if x is None else np.array(x) for x in ins], p.attrs, len(p.outs))
        t0 = time.perf_counter() if self.e.profile else 0.0
        try:
            if streamed_table is not None:
                self._gather_rows(streamed_table, ins[1], outs[0], p.attrs)
            else:
                p.handler(ins, outs, p.attrs)
        except IndexError as e:
            raise UserError(f"{self.where}: op '{op.name}' ({p.type}): {e}; check the input values") from None
        if self.e.profile:
            key = op.op
            self.e.timings.per_op[key] = self.e.timings.per_op.get(key, 0.0) + time.perf_counter() - t0
        if want is not None:
            self._check(op, p, outs, want)

    def _gather_rows(self, table: str, idx: np.ndarray, out: np.ndarray, attrs: dict[str, Any]) -> None:
        """Gather from an embedding table that is never loaded: read each row from the weights file."""
        t = self.e.plan.tensors[table]
        if S.norm_axis(attrs.get("axis", 0), len(t.shape)) != 0:
            raise InternalError(f"streamed gather of {table} along an axis other than 0")
        rows = t.shape[0]
        row = t.nbytes // rows
        ids = flat(idx)
        dst = out.reshape(ids.size, -1)
        for r in range(ids.size):
            i = int(ids[r])
            if not -rows <= i < rows:
                raise IndexError(f"index {i} is outside '{table}' ({rows} rows)")
            self.e.st.file.read_into(t.offset + (i % rows) * row, dst[r], "embedding row")

    def _check(self, op: Op, p: _Prepared, outs: list, want: list) -> None:
        rows = p.attrs.get("rows")
        for got, exp in zip(outs, want):
            if got is None or got.size == 0:
                continue
            g, x = got, exp
            if rows is not None:
                g, x = got[..., rows[0]:rows[1]], exp[..., rows[0]:rows[1]]
            if g.dtype.kind == "f":
                # Relative to max(1, |want|): exp and pow outputs are large. Equal values (infs) and NaN in both
                # count as no difference.
                with np.errstate(all="ignore"):
                    g64, x64 = g.astype(np.float64), x.astype(np.float64)
                    d = np.where((g64 == x64) | (np.isnan(g64) & np.isnan(x64)), 0.0, np.abs(g64 - x64))
                    d = np.where(np.isnan(d), np.inf, d) / np.maximum(1.0, np.abs(np.nan_to_num(x64)))
                err = float(d.max())
            else:
                err = float(np.count_nonzero(g != x))
            self.e.worst[op.op] = max(self.e.worst.get(op.op, 0.0), err)

    # ---- a whole run ------------------------------------------------------------------------------------------
    def _check_dims(self, name: str, dims: list[Any], shape: tuple[int, ...], env: dict[str, int]) -> None:
        if len(shape) != len(dims):
            raise UserError(f"input '{name}' has shape {list(shape)} but the graph takes rank {len(dims)} {dims}")
        for ax, (d, v) in enumerate(zip(dims, shape)):
            if isinstance(d, int):
                if v != d:
                    raise UserError(f"input '{name}' dim {ax} is {v} but the graph fixes it at {d}")
                continue
            if d in env and env[d] != v:
                raise UserError(f"input '{name}' dim {ax} ('{d}') is {v} but another input binds '{d}' to {env[d]}")
            env[d] = int(v)
            bound = self.bounds.get(d)
            if bound is not None and v > bound:
                raise UserError(f"input '{name}' dim {ax} ('{d}') is {v}, above the plan's maximum {bound}; use "
                                "smaller inputs or recompile with larger max_context= / max_batch_tokens=")

    def bind(self, feeds: dict[str, Any], in_place: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
        """Check the feeds against the graph inputs and write them into the arena; return the dim bindings.
        `in_place`: inputs already in their buffers (a decoder's past keys/values), by shape."""
        names = [i["name"] for i in self.inputs]
        in_place = in_place or {}
        extra = sorted(set(feeds) - set(names))
        if extra:
            raise UserError(f"unknown input(s) {extra}; the graph takes {names}")
        env: dict[str, int] = {}
        self.shapes = dict(self.const_shapes)
        for spec in self.inputs:
            name = spec["name"]
            if name in in_place:
                self._check_dims(name, spec["dims"], in_place[name], env)
                self.shapes[name] = tuple(in_place[name])
                continue
            if name not in feeds:
                raise UserError(f"input '{name}' is missing; the graph takes {names}")
            arr = np.asarray(feeds[name])
            want = np.dtype(spec["dtype"])
            if arr.dtype != want:
                if not (np.can_cast(arr.dtype, want, "same_kind") or (arr.dtype.kind in "iub" and want.kind in "iu")):
                    raise UserError(f"input '{name}' is {arr.dtype} but the graph takes {want}")
                arr = arr.astype(want)
            self._check_dims(name, spec["dims"], arr.shape, env)
            dst = self.buf[name].reshape(-1)
            if arr.size > dst.size:
                raise UserError(f"input '{name}' {list(arr.shape)} does not fit the plan's buffer ({dst.size} "
                                "elements)")
            dst[:arr.size] = arr.reshape(-1)
            self.shapes[name] = tuple(arr.shape)
        return env

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Feed named inputs, run the schedule, return copies of the named outputs (default: all)."""
        self.bind(feeds)
        self.e._run(1)
        return {o: self.view(o).copy() for o in (outputs or self.outputs)}


class OnnxDecoder:
    """Token-by-token generation on a decoder graph (input_ids -> logits).

    With past key/value inputs (HF/optimum and torch export names: `past_key_values.{i}.{key,value}` in,
    `present.{i}.{key,value}` out) each step feeds only the new tokens; the presents are copied into the past
    buffers at the start of the next step (inside the arena: no allocation), with `attention_mask` and
    `position_ids` made to match. Without them every step reruns the whole sequence, and the first step says
    so once on stderr.
    """

    def __init__(self, runner: OnnxRunner, max_context: int) -> None:
        self.r = runner
        self.io = runner.e.plan.model["onnx"]["decoder"]
        self.kv: list[list[str]] = self.io["kv"]
        self.max_context = max_context
        spec = {i["name"]: i for i in runner.inputs}
        seq_dim = spec[self.io["ids"]]["dims"][-1]
        self.chunk = seq_dim if isinstance(seq_dim, int) else runner.bounds.get(seq_dim, max_context)
        self.past_spec = {p: spec[p] for p, _ in self.kv}
        self.pos = 0
        self.history: list[int] = []
        self.pending_copy = False
        self.said = False

    def reset(self) -> None:
        self.pos = 0
        self.history = []
        self.pending_copy = False

    def _past_shapes(self, past_len: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, spec in self.past_spec.items():
            dims = spec["dims"]
            shape = []
            for ax, d in enumerate(dims):
                if ax == len(dims) - 2:
                    shape.append(past_len)
                elif isinstance(d, int):
                    shape.append(d)
                else:
                    shape.append(1)  # batch
            if self.pending_copy:
                prev = self.r.shapes.get(self.presents[name])
                if prev is not None:
                    shape = list(prev)
            out[name] = tuple(shape)
        return out

    @property
    def presents(self) -> dict[str, str]:
        return {p: q for p, q in self.kv}

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed `ids` (1-D) after the tokens so far; return the last position's logits (a view)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n == 0:
            raise UserError("empty input: nothing to run")
        if self.pos + n > self.max_context:
            raise UserError(f"context full: {self.pos + n} tokens exceed the plan's max_context {self.max_context}; "
                            "shorten the prompt or --max-tokens, or recompile with a larger max_context=")
        r = self.r
        if self.kv:
            if self.pending_copy:  # the previous step's presents become this step's pasts
                for past, present in self.kv:
                    k = S.numel(r.shapes[present])
                    if k > r.cap[past]:
                        raise UserError(f"past '{past}' needs {k} elements but the plan holds {r.cap[past]}; "
                                        "recompile with a larger max_context=")
                    r.buf[past].reshape(-1)[:k] = r.buf[present].reshape(-1)[:k]
            in_place = self._past_shapes(self.pos)
            feeds: dict[str, Any] = {self.io["ids"]: ids[None, :]}
            total, first = self.pos + n, self.pos
        else:
            if not self.said:
                import sys

                print(f"edge-rt: {r.e.plan.model.get('name')} has no past key/value inputs: recomputing the whole "
                      "sequence for every token (export it with past_key_values for faster generation)",
                      file=sys.stderr)
                self.said = True
            self.history.extend(int(t) for t in ids)
            in_place = {}
            feeds = {self.io["ids"]: np.asarray(self.history, np.int64)[None, :]}
            total, first = len(self.history), 0
        if self.io.get("mask"):
            feeds[self.io["mask"]] = np.ones((1, total), np.int64)
        if self.io.get("positions"):
            feeds[self.io["positions"]] = np.arange(first, total, dtype=np.int64)[None, :]
        r.bind(feeds, in_place)
        r.e._run(n)
        self.pos += n
        self.pending_copy = bool(self.kv)
        logits = r.view(self.io["logits"])
        return logits.reshape(-1, logits.shape[-1])[-1]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.pos + len(ids) > self.max_context:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the plan's max_context {self.max_context} "
                            f"(position {self.pos}); shorten it or recompile with a larger max_context=")
        step = max(1, int(self.chunk)) if self.kv else max(1, len(ids))
        logits = None
        for i in range(0, len(ids), step):
            logits = self.step(ids[i:i + step])
        assert logits is not None
        return logits


# ---- warm-up --------------------------------------------------------------------------------------------------------

def warm_plan(plan: Any) -> None:
    """Load, from numba's on-disk cache, every kernel specialization `plan` will call, on tiny arrays of the same
    dtypes and flags (arena views are writable, mapped weights read-only; bool as uint8). The CLIs call it before
    measuring the runtime baseline, so kernel code counts as runtime, as it does for the transformer kernels."""
    from . import onnx_kernels as K
    from .onnx_ops import UNARY_CODES

    resident = plan.weights_mode == "resident"
    seen: set[tuple] = set()

    def arr(dt: str, readonly: bool = False) -> np.ndarray:
        a = np.zeros(4, np.uint8 if dt == "bool" else np.dtype(dt))
        a.flags.writeable = not readonly
        return a

    one = np.ones(1, np.int64)
    z = np.zeros(1, np.int64)
    for op in plan.schedule:
        if not op.op.startswith("onnx."):
            continue
        t = op.op[len("onnx."):]
        ins: list[tuple[str, bool]] = []
        for a in op.attrs.get("args", []):
            if a == "":
                ins.append(("", False))
            elif a.startswith("@"):
                ins.append(("float32", resident and a[1:] not in op.attrs.get("gather", ())))
            else:
                ins.append((plan.buffers[a].dtype, False))
        outs = [plan.buffers[o].dtype for o in op.attrs.get("outs", op.outputs) if o]
        # The parallel twins run only above K.PAR_MIN elements: load them only for ops that can get there.
        sizes = [plan.buffers[b].nbytes // max(1, np.dtype(plan.buffers[b].dtype).itemsize)
                 for b in list(op.inputs) + list(op.outputs) if b in plan.buffers]
        big = max(sizes, default=0) >= K.PAR_MIN
        key = (t, tuple(ins), tuple(outs), big)
        if key in seen or not outs:
            continue
        seen.add(key)
        x = arr(*ins[0]) if ins and ins[0][0] else None
        o = arr(outs[0])
        try:
            _warm_op(K, t, ins, x, o, arr, one, z, UNARY_CODES, big)
        except (TypeError, ValueError, IndexError):  # a combination the kernels do not take: the run will say so
            pass


def _warm_op(K: Any, t: str, ins: list, x: Any, o: np.ndarray, arr: Callable, one: np.ndarray, z: np.ndarray,
             unary_codes: dict, big: bool) -> None:
    def both(serial: Callable, par: Callable, *args: Any) -> None:
        serial(*args)
        if big:
            par(*args)

    if t in unary_codes or t in ("Gelu", "IsInf", "Clip") or (t in ("Cast", "CastLike") and o.dtype == np.uint8
                                                                and x is not None and x.dtype != np.uint8):
        both(K.unary, K.unary_par, x, o, K.U_COPY, 0.0, 0.0)
    elif t in ("Cast", "CastLike"):
        K.cast(x, o)
    elif t == "Where":
        both(K.where, K.where_par, arr(*ins[0]), arr(*ins[1]), arr(*ins[2]), o, one * 4, one, one, one)
    elif t in ("MatMul", "Gemm"):
        both(K.matmul, K.matmul_par, x, arr(*ins[1]), o, z, z, 2, 2, 1)
        if t == "Gemm":
            both(K.binary, K.binary_par, o, arr(o.dtype.name), o, one * 4, one, one, K.B_ADD)
    elif t in ("LayerNormalization", "RMSNormalization"):
        bias = arr(*ins[2]) if len(ins) > 2 and ins[2][0] else np.zeros(0, x.dtype)
        both(K.norm_rows, K.norm_rows_par, x, arr(*ins[1]), bias, o, np.zeros(0, np.float32),
             np.zeros(0, np.float32), 1, 4, 1e-5, False)
    elif t in ("Softmax", "LogSoftmax"):
        both(K.softmax, K.softmax_par, x, o, 1, 4, 1, False)
    elif t.startswith("Reduce"):
        if x.dtype.kind in "iu" and t in ("ReduceSum", "ReduceProd"):
            K.reduce_int(x, o, 1, 4, 1, K.R_SUM)
        else:
            both(K.reduce, K.reduce_par, x, o, 1, 4, 1, K.R_SUM)
    elif t == "Gather":
        both(K.gather, K.gather_par, x, np.zeros(1, np.int64), o, 1, 4, 1)
    elif t in ("Transpose", "Concat", "Slice", "Split", "Expand", "Max", "Min", "Sum", "Mean"):
        for i in ins:
            if i[0]:
                both(K.copy_strided, K.copy_strided_par, arr(*i), 0, one, o, 0, one, one * 4)
        if t in ("Max", "Min", "Sum", "Mean"):
            both(K.binary, K.binary_par, x, arr(*ins[1]) if len(ins) > 1 else x, o, one * 4, one, one, K.B_ADD)
            both(K.binary, K.binary_par, o, arr(*ins[-1]), o, one * 4, one, one, K.B_ADD)
    elif t in ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
               "GreaterOrEqual", "And", "Or", "Xor"):
        y = arr(*ins[1])
        if y.dtype != x.dtype and t != "Pow":
            y = arr(x.dtype.name)
        both(K.binary, K.binary_par, x, y, o, one * 4, one, one, K.B_ADD)
    elif t == "Trilu":
        K.trilu(x, o, 1, 2, 2, True, 0)
    elif t == "Range":
        K.arange(o, x[0], x[0])
    elif t == "CumSum":
        K.cumsum(x, o, 1, 4, 1, False, False)
    elif t == "GatherND":
        K.gathernd(x, one, one * 4, np.zeros(1, np.int64), o, 1, 1, 1, 4, 1)
