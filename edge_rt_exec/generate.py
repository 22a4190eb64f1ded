"""Text generation and sentence embeddings on top of the engine, with the artifact's tokenizer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decoder import Decoder
from .engine import Engine
from .errors import UserError
from .memory import MB, peak_rss
from .plan import Plan
from .sampling import sample


def load_tokenizer(plan: Plan):
    from tokenizers import Tokenizer

    if "tokenizer" not in plan.files:
        raise UserError(f"{plan.path}: the artifact has no tokenizer.json; compile from a model folder that has "
                        "one, or use `edge-rt-exec infer` with token ids")
    from .plan import read_regular

    path = plan.file("tokenizer")
    data = read_regular(path, 256 << 20, "tokenizer")
    try:
        data.decode("utf-8")
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise UserError(f"{path}: cannot load the tokenizer ({e}); copy the whole artifact folder again") from None


def load_generation(plan: Plan) -> dict[str, Any]:
    from .plan import parse_json, read_regular

    path = plan.file("generation")
    gen = parse_json(read_regular(path, 16 << 20, "generation settings"), str(path), "generation settings")
    if not isinstance(gen, dict):
        raise UserError(f"{path}: generation settings are not a JSON object; copy the whole artifact folder again")
    return gen


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_tok_s: float
    stop_reason: str
    first_token_time: float = 0.0  #: wall clock (time.time()) when the first token was ready
    read_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Session:
    """A loaded plan with its tokenizer: `generate()` for decoders, `embed()` for encoders."""

    def __init__(self, plan: Plan | str, threads: int | None = None, validate: bool = False,
                 tokenizer: Any = None, profile: bool = False) -> None:
        from .plan import load_plan

        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if tokenizer is None and "tokenizer" in self.plan.files:
            tokenizer = load_tokenizer(self.plan)
        self.tokenizer = tokenizer
        self.gen = load_generation(self.plan)
        self.engine = Engine(self.plan, threads=threads, validate=validate, profile=profile)
        self.decoder = Decoder(self.engine) if self.plan.model["kind"] != "encoder" and \
            "logits" in self.plan.graph.get("io", {}) else None

    def close(self) -> None:
        self.engine.close()

    # ---- decoders ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise UserError(f"{self.plan.path}: no tokenizer in the artifact")
        if chat:
            pre, suf = self.gen.get("chat_prefix"), self.gen.get("chat_suffix")
            if pre is None or suf is None:
                raise UserError(f"{self.plan.model['name']} has no usable chat template "
                                f"({self.gen.get('chat_error', 'none in the model')}); drop --chat")
            prompt = pre + prompt + suf
        ids = self.tokenizer.encode(prompt, add_special_tokens=not chat).ids
        bos = self.gen.get("bos_token_id")
        if self.gen.get("add_bos") and bos is not None and (not ids or ids[0] != bos) and not chat:
            ids = [bos] + ids
        return ids

    def generate(self, prompt_ids: list[int], max_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
                 stop_at_eos: bool = True) -> GenerationResult:
        kind = self.plan.model["kind"]
        if kind == "encoder":
            raise UserError(f"{self.plan.model['name']} is an encoder; use `edge-rt-exec embed`")
        if self.decoder is None:
            raise UserError(f"{self.plan.model['name']} is an ONNX graph without token inputs and logits; run it "
                            "with `edge-rt-exec infer PLAN --inputs in.npz --out out.npz`")
        if not prompt_ids:
            raise UserError("the prompt encodes to no tokens; give a non-empty --prompt")
        n_prompt = len(prompt_ids)
        if n_prompt + max_tokens > self.plan.max_context:
            if n_prompt >= self.plan.max_context:
                raise UserError(f"prompt of {n_prompt} tokens does not fit the plan's max_context "
                                f"{self.plan.max_context}; shorten it or recompile with a larger max_context=")
            max_tokens = self.plan.max_context - n_prompt
        eng, dec = self.engine, self.decoder
        dec.reset()
        rng = np.random.default_rng(seed)
        eos = set(self.gen.get("eos_token_ids") or [])
        t0 = time.perf_counter()
        logits = dec.prefill(prompt_ids)
        tok = sample(logits, temperature, top_k, top_p, rng)
        t1 = time.perf_counter()
        first_wall = time.time()
        out: list[int] = []
        printed = ""
        reason = "max_tokens"
        while True:
            if stop_at_eos and tok in eos:
                reason = "eos"
                break
            out.append(tok)
            if on_text is not None and self.tokenizer is not None:
                text = self.tokenizer.decode(out, skip_special_tokens=False)
                if not text.endswith("\ufffd") and len(text) > len(printed) and text.startswith(printed):
                    on_text(text[len(printed):])
                    printed = text
            if len(out) >= max_tokens:
                break
            logits = dec.step(np.array([tok], dtype=np.int64))
            tok = sample(logits, temperature, top_k, top_p, rng)
        t2 = time.perf_counter()
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer is not None else ""
        if on_text is not None and self.tokenizer is not None:
            full = self.tokenizer.decode(out, skip_special_tokens=False)
            if full.startswith(printed) and len(full) > len(printed):
                on_text(full[len(printed):])
        n_decode = max(0, len(out) - 1)  # the first token comes from prefill
        decode_s = t2 - t1
        s = eng.streamer.stats if eng.streamer else None
        return GenerationResult(
            tokens=out, text=text, prompt_tokens=n_prompt, prefill_ms=(t1 - t0) * 1e3, decode_ms=decode_s * 1e3,
            decode_tok_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0, stop_reason=reason,
            first_token_time=first_wall,
            read_s=s.read_s if s else 0.0, wait_s=s.wait_s if s else 0.0, compute_s=eng.timings.compute_s)

    # ---- encoders ---------------------------------------------------------------------------------------
    def embed(self, sentences: list[str]) -> np.ndarray:
        kind = self.plan.model["kind"]
        if kind == "graph":
            raise UserError(f"{self.plan.model['name']} is an ONNX graph: `embed` needs a plan compiled from an "
                            "encoder checkpoint (HF folder); run the graph with `edge-rt-exec infer PLAN --inputs "
                            "in.npz --out out.npz`")
        if kind != "encoder":
            raise UserError(f"{self.plan.model['name']} is a decoder; use `edge-rt-exec run`")
        if self.tokenizer is None:
            raise UserError(f"{self.plan.path}: no tokenizer in the artifact")
        tok = self.tokenizer
        max_len = self.plan.max_context
        tok.enable_truncation(max_length=max_len)
        tok.no_padding()
        encs = tok.encode_batch(sentences)
        d = self.plan.model["config"]["hidden_size"]
        out = np.empty((len(sentences), d), np.float32)
        budget = self.plan.max_batch_tokens
        # Sort by length so each padded batch wastes little; restore the order at the end.
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        i = 0
        while i < len(order):
            j = i
            longest = 0
            while j < len(order) and max(longest, len(encs[order[j]].ids)) * (j - i + 1) <= budget:
                longest = max(longest, len(encs[order[j]].ids))
                j += 1
            if j == i:
                raise UserError(f"sentence {order[i] + 1} has {len(encs[order[i]].ids)} tokens, more than the plan's "
                                f"max_batch_tokens {budget}; recompile with a larger max_batch_tokens=")
            idx = order[i:j]
            S = max(1, longest)
            ids = np.zeros((len(idx), S), np.int64)
            mask = np.zeros((len(idx), S), np.int64)
            types = np.zeros((len(idx), S), np.int64)
            for r, k in enumerate(idx):
                e = encs[k]
                ids[r, :len(e.ids)] = e.ids
                mask[r, :len(e.ids)] = e.attention_mask
                types[r, :len(e.ids)] = e.type_ids
            out[idx] = self.encode_batch(ids, mask, types)
            i = j
        return out


    def encode_batch(self, ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray | None = None) -> np.ndarray:
        """Encoder: `ids`/`mask` int64 [B, S] -> embeddings [B, d] (a copy)."""
        B, S = ids.shape
        if B * S > self.plan.max_batch_tokens:
            raise UserError(f"batch of {B * S} tokens exceeds the plan's max_batch_tokens {self.plan.max_batch_tokens}")
        if S > self.plan.max_context:
            raise UserError(f"sequence of {S} tokens exceeds the plan's max_context {self.plan.max_context}")
        io = self.plan.graph["io"]
        feeds = {io["ids"]: ids.reshape(-1), io["mask"]: mask}
        if "positions" in io:
            feeds[io["positions"]] = np.tile(np.arange(S, dtype=np.int64), B)
        if "type_ids" in io:
            feeds[io["type_ids"]] = (np.zeros(B * S, np.int64) if type_ids is None else type_ids.reshape(-1))
        self.engine.run(feeds)
        return self.engine.output(io["embeddings"]).copy()


def memory_report(baseline: int) -> dict[str, float]:
    peak = peak_rss()
    return {"peak_rss_mb": round(peak / MB, 1), "baseline_rss_mb": round(baseline / MB, 1),
            "plan_rss_mb": round((peak - baseline) / MB, 1)}
