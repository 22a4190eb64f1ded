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
from .sampling import SamplingParams, sample


def load_tokenizer(plan: Plan):
    from tokenizers import Tokenizer

    if "tokenizer" not in plan.files:
        raise UserError(f"{plan.path}: the artifact has no tokenizer.json; compile from a model folder that has "
                        "one, or use `edge-rt-exec infer` with token ids")
    from .plan import read_regular

    path = plan.file("tokenizer")
    data = read_regular(path, 256 << 20, "tokenizer")
    try:
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
    stop_reason: str  #: "eos" | "stop" (a stop string) | "max_tokens" | "context" | "cancelled"
    first_token_time: float = 0.0  #: wall clock (time.time()) when the first token was ready
    cached_tokens: int = 0  #: prompt tokens whose KV cache was reused from the previous call
    read_s: float = 0.0
    check_s: float = 0.0  #: of the streamer: time spent checking group checksums
    wait_s: float = 0.0
    compute_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        """OpenAI's name for why generation ended."""
        return "length" if self.stop_reason in ("max_tokens", "context") else "stop"


class TextStream:
    """Incremental detokenization with stop strings: `push(tokens)` returns the newly safe text. Text that could
    still become a stop string is held back; `stopped` is set when one appears (its text is not emitted)."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, [x for x in stop if x]
        self.emitted = ""
        self.text = ""
        self.stopped = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        full = self.tok.decode(tokens, skip_special_tokens=False)
        cut = min((i for i in (full.find(x) for x in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, self.stopped, final = full[:cut], True, True
        if full.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        safe = len(full)
        if not final:
            for x in self.stop:  # hold back a tail that is the start of a stop string
                for k in range(min(len(x) - 1, len(full)), 0, -1):
                    if full.endswith(x[:k]):
                        safe = min(safe, len(full) - k)
                        break
        self.text = full
        if not full.startswith(self.emitted) or safe <= len(self.emitted):
            return ""
        new, self.emitted = full[len(self.emitted):safe], full[:safe]
        return new


class Session:
    """A loaded plan with its tokenizer: `generate()` for decoders, `embed()` for encoders.

    `generate` keeps the KV cache between calls and reuses the longest prefix the new prompt shares with what
    was fed before (a multi-turn chat re-sends the whole conversation; only the new turn is computed).
    """

    def __init__(self, plan: Plan | str, threads: int | None = None, validate: bool = False,
                 tokenizer: Any = None, profile: bool = False, adapt_threads: bool = True) -> None:
        from .contention import CpuLoad
        from .plan import load_plan

        self._load = CpuLoad()  # other processes' load from now on: the first generation starts at what is free
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if tokenizer is None and "tokenizer" in self.plan.files:
            tokenizer = load_tokenizer(self.plan)
        self.tokenizer = tokenizer
        self.gen = load_generation(self.plan)
        self.engine = Engine(self.plan, threads=threads, validate=validate, profile=profile)
        self.decoder = Decoder(self.engine) if self.plan.model["kind"] != "encoder" and \
            "logits" in self.plan.graph.get("io", {}) else None
        self.name = str(self.plan.model.get("name"))
        self.governor: Any = None  #: a `thermal.ThermalGovernor` polled between tokens (`--max-temp`)
        #: a `contention.ThreadAdapter` timing tokens (off: `adapt_threads=False`, the CLI's `--fixed-threads`)
        self.adapter: Any = None
        if adapt_threads and self.decoder is not None:
            self.adapt_threads()

    def adapt_threads(self, **config: Any) -> None:
        """Adapt the thread count between tokens to what the cores give (see `contention.py`); `config`
        overrides the adapter's settings (window, probe_every, slower, gain)."""
        from .contention import ThreadAdapter

        config.setdefault("load", self._load)
        self.adapter = ThreadAdapter(self.engine.threads, self.engine.use_threads, **config)

    def hold_temperature(self, max_temp_c: float, notify: Callable[[str], None] | None = None) -> None:
        """Keep the SoC under `max_temp_c`: fewer threads, then paced tokens, near it (see `thermal.py`)."""
        from .thermal import ThermalGovernor

        # with the adapter on, the governor's count is the adapter's ceiling
        a = self.adapter
        top, to = (a.max_threads, a.limit) if a is not None else (self.engine.threads, self.engine.use_threads)
        self.governor = ThermalGovernor(max_temp_c, top, to, notify=notify)

    def close(self) -> None:
        self.engine.close()

    # ---- decoders ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a plain prompt (special tokens in it are honoured), or of one user message wrapped in the
        chat template (after `system`, if given)."""
        if chat:
            msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
                [{"role": "user", "content": prompt}]
            return self.encode_chat(msgs)
        ids = self._tokenizer().encode(prompt, add_special_tokens=True).ids
        bos = self.gen.get("bos_token_id")
        if self.gen.get("add_bos") and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, rendered with the model's chat template, ending in the assistant's turn."""
        from .chat import check_messages, render_chat

        text = render_chat(self.gen, check_messages(messages), self.name)
        return self._tokenizer().encode(text, add_special_tokens=False).ids

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError(f"{self.plan.path}: no tokenizer in the artifact")
        return self.tokenizer

    def generate(self, prompt_ids: list[int], max_tokens: int = 32, params: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None, stop: list[str] | None = None,
                 ignore_eos: bool = False, should_stop: Callable[[], bool] | None = None,
                 reuse_cache: bool = True) -> GenerationResult:
        """Generate up to `max_tokens` tokens after `prompt_ids`. `on_text` receives the text as it becomes final;
        `stop` strings end generation (not included in the text); `should_stop()` is polled every token (a
        client that went away). The prompt is truncated to leave room for nothing: one that does not fit the
        plan's max_context is an error; generation stops when the context is full."""
        params = (params or SamplingParams()).check()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise UserError(f"max_tokens={max_tokens!r} must be an integer >= 1")
        kind = self.plan.model["kind"]
        if kind == "encoder":
            raise UserError(f"{self.name} is an encoder; use `edge-rt-exec embed`")
        if self.decoder is None:
            raise UserError(f"{self.name} is an ONNX graph without token inputs and logits; run it "
                            "with `edge-rt-exec infer PLAN --inputs in.npz --out out.npz`")
        if not prompt_ids:
            raise UserError("the prompt encodes to no tokens; give a non-empty prompt")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.plan.max_context:
            raise UserError(f"prompt of {n_prompt} tokens does not fit the plan's max_context "
                            f"{self.plan.max_context}; shorten it or recompile with a larger max_context=")
        eng, dec = self.engine, self.decoder
        eng.use_threads()
        rng = np.random.default_rng(params.seed)
        eos = set() if ignore_eos else set(self.gen.get("eos_token_ids") or [])
        stream = TextStream(self._tokenizer(), stop or []) if self.tokenizer is not None else None
        if self.adapter is not None:
            self.adapter.prepare()  # fewer threads from the start when other processes hold cores
        t0 = time.perf_counter()
        if reuse_cache:
            logits, cached = dec.feed(prompt_ids)
        else:
            dec.reset()
            logits, cached = dec.prefill(prompt_ids), 0
        history = list(prompt_ids)
        tok = sample(logits, params, rng, history)
        t1 = time.perf_counter()
        first_wall = time.time()
        tracer = eng.tracer  # `--trace`: the prefill and each decoded token as spans
        if tracer is not None:
            tracer.span("prefill", t0, t1, tokens=n_prompt - cached, cached=cached)
        out: list[int] = []
        reason = "max_tokens"
        adapter = self.adapter
        if adapter is not None:
            adapter.start()
        while True:
            if tok in eos:
                reason = "eos"
                break
            out.append(tok)
            history.append(tok)
            if stream is not None:
                piece = stream.push(out)
                if piece and on_text is not None:
                    on_text(piece)
                if stream.stopped:
                    reason = "stop"
                    break
            if len(out) >= max_tokens:
                break
            if should_stop is not None and should_stop():
                reason = "cancelled"
                break
            if dec.pos + 1 > self.plan.max_context:
                reason = "context"
                break
            if adapter is not None:
                adapter.tick()
            if self.governor is not None:
                self.governor.step()
            ts = time.perf_counter()
            logits = dec.step(np.array([tok], dtype=np.int64))
            tok = sample(logits, params, rng, history)
            if tracer is not None:
                tracer.span(f"token {len(out) + 1}", ts, time.perf_counter(), context=dec.pos)
        t2 = time.perf_counter()
        text = ""
        if stream is not None:
            if not stream.stopped:
                piece = stream.push(out, final=True)
                if piece and on_text is not None:
                    on_text(piece)
            # the final text without special tokens (what a user reads); cut at a stop string like the stream
            text = self._tokenizer().decode(out, skip_special_tokens=True)
            for x in stop or []:
                if x and x in text:
                    text = text[:text.find(x)]
        n_decode = max(0, len(out) - 1)  # the first token comes from prefill
        decode_s = t2 - t1
        s = eng.streamer.stats if eng.streamer else None
        return GenerationResult(
            tokens=out, text=text, prompt_tokens=n_prompt, prefill_ms=(t1 - t0) * 1e3, decode_ms=decode_s * 1e3,
            decode_tok_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0, stop_reason=reason,
            first_token_time=first_wall, cached_tokens=cached,
            read_s=s.read_s if s else 0.0, check_s=s.check_s if s else 0.0, wait_s=s.wait_s if s else 0.0,
            compute_s=eng.timings.compute_s)

    # ---- encoders ---------------------------------------------------------------------------------------
    def embed(self, sentences: list[str]) -> np.ndarray:
        """Sentence embeddings `[n, d]` (float32, L2-normalised), in the sentences' order."""
        parts = list(self.embed_iter(sentences))
        return np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)

    @property
    def embedding_dim(self) -> int:
        return int(self.plan.buffers[self.plan.graph["io"]["embeddings"]].shape[-1])

    def embed_iter(self, sentences: Any, chunk: int = 1024) -> Any:
        """Embeddings of an iterable of sentences, `chunk` at a time (arrays `[<= chunk, d]`, in order): memory
        stays bounded whatever the number of sentences. Within a chunk, sentences are batched by length so
        padding wastes little."""
        kind = self.plan.model["kind"]
        if kind == "graph":
            raise UserError(f"{self.name} is an ONNX graph: `embed` needs a plan compiled from an encoder checkpoint "
                            "(HF folder); run the graph with `edge-rt-exec infer PLAN --inputs in.npz --out out.npz`")
        if kind != "encoder":
            raise UserError(f"{self.name} is a decoder; use `edge-rt-exec run`")
        self.engine.use_threads()
        tok = self._tokenizer()
        tok.enable_truncation(max_length=self.plan.max_context)
        tok.no_padding()
        buf: list[str] = []
        for sentence in sentences:
            buf.append(sentence)
            if len(buf) == chunk:
                yield self._embed_chunk(tok, buf)
                buf = []
        if buf:
            yield self._embed_chunk(tok, buf)

    def _embed_chunk(self, tok: Any, sentences: list[str]) -> np.ndarray:
        encs = tok.encode_batch(sentences)
        out = np.empty((len(sentences), self.embedding_dim), np.float32)
        budget = self.plan.max_batch_tokens
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        i = 0
        while i < len(order):
            j = i
            longest = 0
            while j < len(order) and max(longest, len(encs[order[j]].ids)) * (j - i + 1) <= budget:
                longest = max(longest, len(encs[order[j]].ids))
                j += 1
            if j == i:
                raise UserError(f"a sentence has {len(encs[order[i]].ids)} tokens, more than the plan's "
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
