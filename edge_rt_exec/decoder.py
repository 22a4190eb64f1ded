"""One token-generation state machine for every decoder plan.

A decoder plan names its graph inputs and outputs by role (`plan.graph["io"]`: ids, positions, mask,
logits) and says how it keeps what it has seen (`plan.graph["kv"]["mode"]`):

- `cache`: the KV cache is state in the arena (the transformer families): a step feeds only the new tokens
  and their positions;
- `past_present`: an ONNX decoder with past key/value inputs and present outputs: each step feeds the new
  tokens, and the previous step's presents are copied into the past buffers first (inside the arena);
- `none`: an ONNX decoder without them: every step reruns the whole sequence (said once on stderr).

Prompts longer than one step's maximum rows are fed in chunks.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .engine import Engine
from .errors import UserError
from .ops.registry import numel


class Decoder:
    """Feed tokens, get the next token's logits; `reset()` starts a new sequence."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        p = engine.plan
        g = p.graph
        self.io: dict[str, str] = g.get("io", {})
        kv = g.get("kv") or {"mode": "none", "pairs": []}
        self.mode: str = kv["mode"]
        self.pairs: list[list[str]] = [list(x) for x in kv.get("pairs", [])]
        if "ids" not in self.io or "logits" not in self.io:
            raise UserError(f"{engine.where}: {p.model.get('name')} is not a decoder (no token ids in, no logits "
                            "out); run it with `edge-rt-exec infer`")
        self.spec = {i["name"]: i for i in g["inputs"]}
        self.max_context = p.max_context
        ids_dims = self.spec[self.io["ids"]]["dims"]
        seq = ids_dims[-1]
        bound = g.get("bounds", {}).get(seq, p.max_batch_tokens) if isinstance(seq, str) else seq
        self.chunk = max(1, int(min(bound, p.max_batch_tokens) if self.mode == "cache" else bound))
        self.pos = 0
        self.tokens: list[int] = []  #: every token fed since the last reset (what the KV cache holds)
        self._pending_copy = False
        self._said = False

    def reset(self) -> None:
        self.pos = 0
        self.tokens = []
        self._pending_copy = False

    def feed(self, ids: Any) -> tuple[np.ndarray, int]:
        """Make `ids` the whole sequence; return (last logits, prompt tokens reused). With a KV cache in the arena
        the longest prefix shared with the tokens fed so far is kept (its cache rows are still valid) and only
        the rest is computed; at least the last token is always fed, for its logits."""
        ids = [int(t) for t in np.asarray(ids, dtype=np.int64).reshape(-1)]
        keep = 0
        if self.mode == "cache":
            limit = min(len(self.tokens), len(ids) - 1)
            while keep < limit and self.tokens[keep] == ids[keep]:
                keep += 1
        if keep == 0:
            self.reset()
        else:
            self.pos = keep
            del self.tokens[keep:]
        return self.prefill(np.asarray(ids[keep:], np.int64)), keep

    def _shaped(self, role: str, values: np.ndarray) -> np.ndarray:
        """A 1-D sequence as the input of `role` takes it (`[n]` or `[1, n]`)."""
        rank = len(self.spec[self.io[role]]["dims"])
        return values.reshape((1,) * (rank - 1) + (-1,))

    def step(self, ids: Any) -> np.ndarray:
        """Feed `ids` after the tokens so far; return the last position's logits (a view, valid until the next
        step)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n == 0:
            raise UserError("empty input: nothing to run")
        if n > self.chunk and self.mode != "none":
            return self.prefill(ids)
        if self.pos + n > self.max_context:
            raise UserError(f"context full: {self.pos + n} tokens exceed the plan's max_context {self.max_context}; "
                            "shorten the prompt or --max-tokens, or recompile with a larger max_context=")
        vocab = self.e.plan.model.get("config", {}).get("vocab_size")
        if vocab and (ids.min() < 0 or ids.max() >= vocab):
            raise UserError(f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the model's "
                            f"vocabulary of {vocab}")
        in_place: dict[str, tuple[int, ...]] = {}
        if self.mode == "none":
            if not self._said:
                print(f"edge-rt: {self.e.plan.model.get('name')} has no past key/value inputs: recomputing the whole "
                      "sequence for every token (export it with past_key_values for faster generation)",
                      file=sys.stderr)
                self._said = True
            seq, first = np.asarray(self.tokens + [int(t) for t in ids], np.int64), 0
        else:
            seq, first = ids, self.pos
            if self.mode == "past_present":
                in_place = self._feed_back_presents()
        total = first + len(seq)
        feeds: dict[str, np.ndarray] = {self.io["ids"]: self._shaped("ids", seq)}
        if "positions" in self.io:
            feeds[self.io["positions"]] = self._shaped("positions", np.arange(first, total, dtype=np.int64))
        if "mask" in self.io:
            feeds[self.io["mask"]] = self._shaped("mask", np.ones(total if self.mode != "cache" else len(seq),
                                                                  np.int64))
        self.e.run(feeds, in_place)
        self.pos += n
        self.tokens.extend(int(t) for t in ids)
        self._pending_copy = self.mode == "past_present"
        logits = self.e.output(self.io["logits"])
        return logits.reshape(-1, logits.shape[-1])[-1]

    def _feed_back_presents(self) -> dict[str, tuple[int, ...]]:
        """Copy the previous step's presents into the past inputs; return the pasts' shapes."""
        shapes: dict[str, tuple[int, ...]] = {}
        for past, present in self.pairs:
            if self._pending_copy:
                sh = self.e.shapes[present]
                k = numel(sh)
                dst = self.e.flat[past]
                if k > dst.size:
                    raise UserError(f"past '{past}' needs {k} elements but the plan holds {dst.size}; recompile "
                                    "with a larger max_context=")
                dst[:k] = self.e.flat[present][:k]
                shapes[past] = tuple(sh)
            else:  # the first step: empty pasts (the sequence axis, second to last, is 0; batch 1)
                dims = self.spec[past]["dims"]
                shapes[past] = tuple(0 if ax == len(dims) - 2 else (d if isinstance(d, int) else 1)
                                     for ax, d in enumerate(dims))
        return shapes

    def prefill(self, ids: Any) -> np.ndarray:
        """Feed a prompt in chunks of the plan's maximum rows; return the last logits."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise UserError("empty input: nothing to run")
        if self.pos + len(ids) > self.max_context:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the plan's max_context {self.max_context} "
                            f"(position {self.pos}); shorten it or recompile with a larger max_context=")
        step = self.chunk if self.mode != "none" else len(ids)
        logits = None
        for i in range(0, len(ids), step):
            logits = self.step(ids[i:i + step])
        assert logits is not None
        return logits
