"""The engine: replays a plan's schedule on one arena with numba kernels.

Every buffer lives at its plan offset in one `uint8` arena allocated once; nothing is allocated per token on
the kernel path. Decoders keep a KV cache position; a prompt runs through each group before the next, so a
prompt of up to `max_batch_tokens` reads each weight once. `validate=True` also runs every op's plain-numpy
twin (`reference.py`) on the same inputs and records the worst difference per op type.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reference as ref
from .errors import InternalError, UserError
from .plan import Op, Plan, load_plan
from .weights import GroupStreamer, open_weights

_EMPTY = np.zeros(0, np.float32)


@dataclass
class Timings:
    compute_s: float = 0.0
    steps: int = 0
    per_op: dict[str, float] = field(default_factory=dict)


def set_threads(n: int | None) -> int:
    import numba

    avail = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    n = avail if not n else max(1, min(int(n), avail))
    numba.set_num_threads(n)
    return n


class Engine:
    """Load a plan, map its weights and run forward passes."""

    def __init__(self, plan: Plan | str | Path, threads: int | None = None, validate: bool = False,
                 profile: bool = False) -> None:
        from . import kernels as K  # compiles or loads the cached kernels

        self.K = K
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        p = self.plan
        want = threads if threads is not None else p.target.get("threads")
        cores = os.cpu_count() or 1
        if threads is None and len(p.arena["slots"]) >= 2 and cores > 1 and (want or cores) >= cores:
            # speculative_prefetch: leave a core to the reader thread, or compute and reads fight over every core
            # and the kernels' parallel regions wait on a descheduled thread (benchmarks/bench_streaming.py)
            want = cores - 1
        self.threads = set_threads(want)
        self.validate = validate
        self.profile = profile
        self.worst: dict[str, float] = {}
        self.timings = Timings()
        self.st = open_weights(p)
        self.cfg = p.model["config"]
        self.decoder = p.model["kind"] == "decoder"
        self.arena = np.empty(p.arena["size"], dtype=np.uint8)
        self.buf: dict[str, np.ndarray] = {}
        for b in p.buffers.values():
            raw = self.arena[b.offset:b.offset + b.nbytes]
            self.buf[b.name] = raw.view(np.dtype(b.dtype)).reshape(b.shape) if b.kind != "slot" else raw
        self.slots = [self.buf[f"slot.{i}"] for i in range(len(p.arena["slots"]))]
        self.streamer = None
        if p.weights_mode == "streamed":
            self.streamer = GroupStreamer(self.st, p.groups, self.slots, prefetch=len(self.slots) >= 2)
        self.pos = 0
        self._inv_freq: dict[int, np.ndarray] = {}
        self._views = self._weight_views()
        self._scratch_row = np.empty(self.cfg["hidden_size"], np.float32)
        self.ops: dict[str, Callable[[Op, int, dict[str, np.ndarray]], None]] = {
            "embed": self._embed, "layernorm": self._layernorm, "rmsnorm": self._rmsnorm, "linear": self._linear,
            "lm_head": self._lm_head, "attention": self._attention, "attention_bidir": self._attention_bidir,
            "add": self._add, "silu_mul": self._silu_mul, "gelu_tanh": self._gelu_tanh, "gelu_erf": self._gelu_erf,
            "mean_pool_l2": self._mean_pool,
        }
        self.onnx = None
        self.onnx_decoder = None
        if "onnx" in p.model:  # a plan compiled from an ONNX graph: its ops run in onnx_runtime
            from .onnx_runtime import OnnxRunner

            self.onnx = OnnxRunner(self)
            self.ops.update(self.onnx.table())
            if p.model["onnx"].get("decoder"):
                from .onnx_runtime import OnnxDecoder

                self.onnx_decoder = OnnxDecoder(self.onnx, p.max_context)
        unknown = sorted({op.op for op in p.schedule} - set(self.ops))
        if unknown:
            raise UserError(f"{p.path}: op types {unknown} are not supported by this executor; upgrade edge-rt "
                            "on the device")

    # ---- weights ---------------------------------------------------------------------------------------
    def _tensor_view(self, base: np.ndarray | None, base_off: int, name: str, rows: list[int] | None,
                     role: str) -> np.ndarray:
        t = self.plan.tensors[name]
        shape = list(t.shape)
        off, nbytes = t.offset, t.nbytes
        if rows is not None and role in ("weight", "bias"):
            row = nbytes // shape[0]
            off, nbytes, shape[0] = off + rows[0] * row, (rows[1] - rows[0]) * row, rows[1] - rows[0]
        if base is None:
            return self.st.file.view(off, nbytes, "<f4", tuple(shape), f"tensor '{name}'")
        start = off - base_off
        if start < 0 or start + nbytes > base.nbytes:
            raise InternalError(f"tensor {name} [{off}, {off + nbytes}) is outside its group's slot")
        return base[start:start + nbytes].view(np.float32).reshape(shape)

    def _weight_views(self) -> dict[tuple[int, int], dict[int, dict[str, np.ndarray]]]:
        """(group, slot) -> op index -> role -> view. Slot memory is fixed, so views are made once."""
        p = self.plan
        views: dict[tuple[int, int], dict[int, dict[str, np.ndarray]]] = {}
        for g in p.groups:
            targets = [(-1, None)] if g.slot is None else list(enumerate(self.slots))
            for s, base in targets:
                per_op: dict[int, dict[str, np.ndarray]] = {}
                for op in p.schedule[g.op_start:g.op_end]:
                    gather = set(op.attrs.get("gather", ()))
                    per_op[op.index] = {
                        role: self._tensor_view(None if role in gather else base, g.byte_start, w,
                                                op.attrs.get("rows"), role)
                        for role, w in op.weights.items()
                        if not (role in gather and p.weights_mode == "streamed")
                    }
                views[(g.index, s)] = per_op
        return views

    # ---- running ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self.pos = 0
        if self.onnx_decoder is not None:
            self.onnx_decoder.reset()

    def _run(self, n: int) -> None:
        p = self.plan
        try:
            for g in p.groups:
                s = self.streamer.acquire(g) if (self.streamer and g.slot is not None) else -1
                views = self._views[(g.index, s)]
                t0 = time.perf_counter()
                for op in p.schedule[g.op_start:g.op_end]:
                    if self.profile:
                        t1 = time.perf_counter()
                        self.ops[op.op](op, n, views[op.index])
                        self.timings.per_op[op.op] = self.timings.per_op.get(op.op, 0.0) + time.perf_counter() - t1
                    else:
                        self.ops[op.op](op, n, views[op.index])
                self.timings.compute_s += time.perf_counter() - t0
                if self.streamer and g.slot is not None:
                    self.streamer.release(g)
        except BaseException:
            if self.streamer is not None:  # the cyclic read order is broken: start the reader afresh
                self.streamer.close()
                self.streamer = GroupStreamer(self.st, p.groups, self.slots, prefetch=len(self.slots) >= 2)
            raise
        self.timings.steps += 1

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Decoder: feed `ids` (at most max_batch_tokens) at the current position; return the last row's
        logits (a view into the arena, valid until the next step)."""
        if self.onnx_decoder is not None:
            return self.onnx_decoder.step(ids)
        n = len(ids)
        if n == 0:
            raise UserError("empty input: nothing to run")
        if n > self.plan.max_batch_tokens:
            raise InternalError(f"step of {n} rows exceeds max_batch_tokens {self.plan.max_batch_tokens}")
        if self.pos + n > self.plan.max_context:
            raise UserError(f"context full: {self.pos + n} tokens exceed the plan's max_context "
                            f"{self.plan.max_context}; shorten the prompt or --max-tokens, or recompile with a "
                            "larger max_context=")
        vocab = self.cfg["vocab_size"]
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab:
            raise UserError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}")
        self.buf["ids"][:n] = ids
        self.buf["positions"][:n] = np.arange(self.pos, self.pos + n)
        self._run(n)
        self.pos += n
        return self.buf["logits"][0]

    def prefill(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Run a prompt in chunks of max_batch_tokens; return the last logits."""
        if self.onnx_decoder is not None:
            return self.onnx_decoder.prefill(ids)
        ids = np.asarray(ids, dtype=np.int64)
        if self.pos + len(ids) > self.plan.max_context:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the plan's max_context "
                            f"{self.plan.max_context} (position {self.pos}); shorten it or recompile with a larger "
                            "max_context=")
        logits = None
        step = self.plan.max_batch_tokens
        for i in range(0, len(ids), step):
            logits = self.step(ids[i:i + step])
        assert logits is not None
        return logits

    def encode_batch(self, ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray | None = None) -> np.ndarray:
        """Encoder: `ids`/`mask` int64 [B, S] -> embeddings [B, d] (a copy)."""
        B, S = ids.shape
        n = B * S
        if n > self.plan.max_batch_tokens:
            raise InternalError(f"batch of {n} tokens exceeds max_batch_tokens {self.plan.max_batch_tokens}")
        if S > self.plan.max_context:
            raise UserError(f"sequence of {S} tokens exceeds the plan's max_context {self.plan.max_context}")
        self.buf["ids"][:n] = ids.reshape(-1)
        self.buf["positions"][:n] = np.tile(np.arange(S), B)
        self.buf["type_ids"][:n] = 0 if type_ids is None else type_ids.reshape(-1)
        self.buf["mask"].reshape(-1)[:n] = mask.reshape(-1)
        self._bs = (B, S)
        self._run(n)
        return self.buf["embeddings"][:B].copy()

    def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """ONNX plans: feed named graph inputs, return every graph output (or the named ones) by name (copies)."""
        if self.onnx is None:
            raise UserError(f"{self.plan.path}: infer needs a plan compiled from an ONNX graph; use run or embed")
        return self.onnx.run(feeds, outputs)

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    # ---- ops -------------------------------------------------------------------------------------------
    def _in(self, op: Op, i: int, n: int) -> np.ndarray:
        return self.buf[op.inputs[i]][:n]

    def _out(self, op: Op, n: int, i: int = 0) -> np.ndarray:
        return self.buf[op.outputs[i]][:n]

    def _check(self, op: Op, got: np.ndarray, want: np.ndarray) -> None:
        err = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        self.worst[op.op] = max(self.worst.get(op.op, 0.0), err)

    def _embed(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        K, out = self.K, self._out(op, n)
        ids = self.buf["ids"][:n]
        extra = [("pos", self.buf["positions"][:n])]
        if "type" in op.weights:
            extra.append(("type", self.buf["type_ids"][:n]))
        if self.plan.weights_mode == "streamed":
            # Gather rows straight from the file: the table itself is never loaded.
            for role, idx in [("tok", ids)] + extra:
                if role not in op.weights:
                    continue
                t = self.plan.tensors[op.weights[role]]
                row = t.nbytes // t.shape[0]
                for r in range(n):
                    i = int(idx[r])
                    if not 0 <= i < t.shape[0]:
                        raise UserError(f"index {i} is outside embedding '{op.weights[role]}' ({t.shape[0]} rows)")
                    if role == "tok":
                        self.st.file.read_into(t.offset + i * row, out[r], "embedding row")
                    else:
                        self.st.file.read_into(t.offset + i * row, self._scratch_row, "embedding row")
                        out[r] += self._scratch_row
            if self.validate:  # debug mode: map the tables to check the row reads
                w = {role: self._tensor_view(None, 0, name, None, role) for role, name in op.weights.items()}
            else:
                return
        else:
            K.embedding_gather(ids, w["tok"], out)
            for role, idx in extra:
                if role in w:
                    K.embedding_add(idx, w[role], out)
        if self.validate:
            want = ref.embedding_gather(ids, w["tok"])
            for role, idx in extra:
                if role in w:
                    want = ref.embedding_add(idx, w[role], want)
            self._check(op, out, want)

    def _layernorm(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        x, out = self._in(op, 0, n), self._out(op, n)
        want = ref.layernorm(x, w["weight"], w["bias"], op.attrs["eps"]) if self.validate else None
        self.K.layernorm(x, w["weight"], w["bias"], op.attrs["eps"], out)
        if want is not None:
            self._check(op, out, want)

    def _rmsnorm(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        x, out = self._in(op, 0, n), self._out(op, n)
        want = ref.rmsnorm(x, w["weight"], op.attrs["eps"]) if self.validate else None
        self.K.rmsnorm(x, w["weight"], op.attrs["eps"], out)
        if want is not None:
            self._check(op, out, want)

    def _linear(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        x = self._in(op, 0, n)
        out_full = self.buf[op.outputs[0]][:n]
        bias = w.get("bias", _EMPTY)
        rows = op.attrs.get("rows")
        if rows is not None and (rows[0] != 0 or rows[1] != out_full.shape[1]):
            self.K.linear_rows(x, w["weight"], bias, out_full, rows[0])  # a row tile writes its columns
            out = out_full[:, rows[0]:rows[1]]
        else:
            self.K.linear(x, w["weight"], bias, out_full)
            out = out_full
        if self.validate:
            self._check(op, out, ref.linear(x, w["weight"], bias if bias.size else None))

    def _lm_head(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        x = self._in(op, 0, n)[n - 1:n]  # only the last row's logits are needed
        logits = self.buf[op.outputs[0]]
        r0, r1 = op.attrs["rows"]
        if r0 == 0 and r1 == logits.shape[1]:
            self.K.linear(x, w["weight"], _EMPTY, logits)
        else:
            self.K.linear_rows(x, w["weight"], _EMPTY, logits, r0)
        if self.validate:
            self._check(op, logits[:, r0:r1], ref.linear(x, w["weight"]))

    def _rope(self, op: Op) -> np.ndarray | None:
        rope = op.attrs.get("rope")
        if not rope:
            return None
        f = self._inv_freq.get(op.index)
        if f is None:
            f = ref.rope_inv_freq(op.attrs["head_dim"], rope["theta"], rope.get("scaling"))
            self._inv_freq[op.index] = f
        return f

    def _attention(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        a = op.attrs
        q, k, v = (self._in(op, i, n) for i in range(3))
        kc, vc = self.buf[op.inputs[3]], self.buf[op.inputs[4]]
        out = self._out(op, n)
        pos = self.buf[op.inputs[5]][:n]
        inv = self._rope(op)
        want = None
        if self.validate:
            qr = ref.rope(q, pos, inv, a["n_heads"], a["head_dim"]) if inv is not None else q.copy()
            kr = ref.rope(k, pos, inv, a["n_kv_heads"], a["head_dim"]) if inv is not None else k.copy()
            kc2, vc2 = ref.kv_write(kr, v, kc, vc, self.pos)
            want = ref.attention_causal(qr, kc2, vc2, self.pos, a["n_heads"], a["n_kv_heads"], a["head_dim"],
                                        a["scale"])
        if inv is not None:
            self.K.rope_inplace(q, pos, inv, a["n_heads"], a["head_dim"])
            self.K.rope_inplace(k, pos, inv, a["n_kv_heads"], a["head_dim"])
        self.K.kv_write(k, v, kc, vc, self.pos)
        scratch = self.buf[a["scratch"][0]]
        self.K.attention_causal(q, kc, vc, self.pos, a["n_heads"], a["n_kv_heads"], a["head_dim"], a["scale"],
                                scratch, out)
        if want is not None:
            self._check(op, out, want)

    def _attention_bidir(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        a = op.attrs
        B, S = self._bs
        q, k, v = (self._in(op, i, n) for i in range(3))
        mask = self.buf["mask"].reshape(-1)[:n].reshape(B, S)
        out = self._out(op, n)
        scratch = self.buf[a["scratch"][0]].reshape(-1)[:B * a["n_heads"] * S].reshape(B * a["n_heads"], S)
        self.K.attention_bidir(q, k, v, mask, B, S, a["n_heads"], a["head_dim"], a["scale"], scratch, out)
        if self.validate:
            self._check(op, out, ref.attention_bidir(q, k, v, mask, B, S, a["n_heads"], a["head_dim"], a["scale"]))

    def _binary(self, op: Op, n: int, kern: Callable, refn: Callable) -> None:
        a, b, out = self._in(op, 0, n), self._in(op, 1, n), self._out(op, n)
        want = refn(a, b) if self.validate else None
        kern(a, b, out)
        if want is not None:
            self._check(op, out, want)

    def _add(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        self._binary(op, n, self.K.add, ref.add)

    def _silu_mul(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        self._binary(op, n, self.K.silu_mul, ref.silu_mul)

    def _unary(self, op: Op, n: int, kern: Callable, refn: Callable) -> None:
        x, out = self._in(op, 0, n), self._out(op, n)
        want = refn(x) if self.validate else None
        kern(x, out)
        if want is not None:
            self._check(op, out, want)

    def _gelu_tanh(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        self._unary(op, n, self.K.gelu_tanh, ref.gelu_tanh)

    def _gelu_erf(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        self._unary(op, n, self.K.gelu_erf, ref.gelu_erf)

    def _mean_pool(self, op: Op, n: int, w: dict[str, np.ndarray]) -> None:
        B, S = self._bs
        x = self._in(op, 0, n)
        mask = self.buf["mask"].reshape(-1)[:n].reshape(B, S)
        out = self.buf[op.outputs[0]][:B]
        self.K.mean_pool_l2(x, mask, B, S, out)
        if self.validate:
            self._check(op, out, ref.mean_pool_l2(x, mask, B, S))


def describe_worst(worst: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items()))


