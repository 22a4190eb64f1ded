"""`edge-rt-exec serve`: an OpenAI-compatible HTTP API over one or more plans (the optional `serve` extra:
starlette + uvicorn, as llama-cpp-python's server uses).

Endpoints: `POST /v1/chat/completions` (streamed with server-sent events or not), `POST /v1/completions`,
`POST /v1/embeddings` (encoder plans), `GET /v1/models`, `GET /health`.

Each plan is one `Session` with one engine; its requests are served one at a time by a worker thread (the
arena holds one run, so the memory budget holds whatever the load), in arrival order. Up to `queue` requests
wait per plan; more get 503 at once. A streamed response whose client disconnects stops generating at the
next token. A chat request re-sends the whole conversation; the session reuses the KV cache of the longest
prefix it shares with the previous request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .generate import Session
from .sampling import SamplingParams


class RequestError(Exception):
    """A bad request: HTTP 400 with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Model:
    """One served plan: its session and the queue in front of it."""

    id: str
    session: Session
    queue_limit: int
    waiting: int = 0  #: requests queued or running
    #: the one thread that runs this plan's engine: requests are served in arrival order, one at a time
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="edge-rt"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return str(self.session.plan.model["kind"])


def _model_ids(sessions: list[Session]) -> list[str]:
    """The model's name, or the plan file's stem where two plans share a model."""
    names = [s.name for s in sessions]
    out = []
    for s, n in zip(sessions, names):
        stem = s.plan.path.name.removesuffix(".plan.json") if s.plan.path else n
        out.append(n if names.count(n) == 1 else f"{n}/{stem}")
    return out


# ---- request parsing -----------------------------------------------------------------------------------------

def _num(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(f"'{key}' must be an integer", param=key)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise RequestError(f"'{key}' must be a number", param=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{key}' = {v} is out of range [{lo}, {hi}]", param=key)
    return v


def sampling_from(body: dict) -> tuple[SamplingParams, int, list[str], bool]:
    """(sampling, max_tokens, stop strings, ignore_eos) from an OpenAI request body (llama.cpp's extras too)."""
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop) and len(stop) <= 16:
        stops = stop
    else:
        raise RequestError("'stop' must be a string or a list of at most 16 strings", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", 256, int, 1, 1 << 20)
    penalty = body.get("repeat_penalty")
    if penalty is None and body.get("frequency_penalty"):
        raise RequestError("'frequency_penalty' is not supported; use llama.cpp's 'repeat_penalty'",
                           param="frequency_penalty")
    try:
        params = SamplingParams(
            temperature=float(_num(body, "temperature", 1.0, float, 0.0, 100.0)),
            top_p=float(_num(body, "top_p", 1.0, float, 1e-9, 1.0)),
            top_k=_num(body, "top_k", 0, int, 0, 1 << 20),
            min_p=float(_num(body, "min_p", 0.0, float, 0.0, 1.0)),
            repeat_penalty=float(_num(body, "repeat_penalty", 1.0, float, 1e-6, 100.0)),
            seed=_num(body, "seed", 0, int, 0, 2**63 - 1),
        ).check()
    except UserError as e:
        raise RequestError(str(e)) from None
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    return params, max_tokens, stops, bool(body.get("ignore_eos", False))


# ---- the app ---------------------------------------------------------------------------------------------------

def build_app(sessions: list[Session], queue: int = 8) -> Any:
    """The ASGI app serving `sessions` (tests drive it through a real uvicorn server)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    models = {mid: Model(mid, s, queue) for mid, s in zip(_model_ids(sessions), sessions)}

    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error") \
            -> Response:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    def pick(body: dict, kinds: tuple[str, ...]) -> Model:
        want = body.get("model")
        cands = [m for m in models.values() if m.kind in kinds or (m.kind == "graph" and "decoder" in kinds
                                                                   and m.session.decoder is not None)]
        if want is not None and want in models:
            m = models[want]
            if m not in cands:
                raise RequestError(f"model '{want}' is a {m.kind} plan; this endpoint needs a "
                                   f"{' or '.join(kinds)} plan", param="model")
            return m
        if want is not None and len(cands) != 1:
            raise RequestError(f"model '{want}' is not served; served: {', '.join(models)}", status=404,
                               param="model")
        if not cands:
            raise RequestError(f"no {' or '.join(kinds)} plan is served here", status=404, param="model")
        if len(cands) > 1:
            raise RequestError(f"several models are served; name one of {', '.join(m.id for m in cands)}",
                               param="model")
        return cands[0]

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > 8 << 20:
            raise RequestError("request body larger than 8 MiB", status=413)
        try:
            b = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(b, dict):
            raise RequestError("the request body must be a JSON object")
        return b

    async def run_in_worker(m: Model, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model's engine, one request at a time; 503 when too many already wait."""
        if m.waiting > m.queue_limit:  # one running + `queue_limit` waiting
            raise RequestError(f"model '{m.id}' is busy ({m.waiting} requests queued); retry later", status=503)
        m.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(m.worker, fn)
        finally:
            m.waiting -= 1

    def completion_ids(m: Model, body: dict, chat: bool) -> list[int]:
        s = m.session
        try:
            if chat:
                return s.encode_chat(body.get("messages"))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)
            if not isinstance(prompt, str):
                raise RequestError("'prompt' must be a string (or one string, or token ids)", param="prompt")
            return s.encode_prompt(prompt)
        except UserError as e:
            raise RequestError(str(e), param="messages" if chat else "prompt") from None

    async def completions(request: Request, chat: bool) -> Response:
        try:
            body = await body_of(request)
            m = pick(body, ("decoder",))
            params, max_tokens, stops, ignore_eos = sampling_from(body)
            ids = completion_ids(m, body, chat)
            if len(ids) >= m.session.plan.max_context:
                raise RequestError(f"the prompt has {len(ids)} tokens; this plan's context holds "
                                   f"{m.session.plan.max_context}", param="messages" if chat else "prompt")
        except RequestError as e:
            return error(str(e), e.status, e.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(r: Any) -> dict:
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens),
                    "total_tokens": r.prompt_tokens + len(r.tokens),
                    "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

        if not body.get("stream"):
            def work() -> Any:
                return m.session.generate(ids, max_tokens, params, stop=stops, ignore_eos=ignore_eos)
            try:
                r = await run_in_worker(m, work)
            except RequestError as e:
                return error(str(e), e.status, e.param)
            except UserError as e:
                return error(str(e), 400)
            choice: dict[str, Any] = {"index": 0, "finish_reason": r.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = r.text
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": m.id,
                                 "choices": [choice], "usage": usage(r)})

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        def work_stream() -> Any:
            return m.session.generate(ids, max_tokens, params, stop=stops, ignore_eos=ignore_eos,
                                      on_text=lambda t: emit(("text", t)), should_stop=cancelled.is_set)

        def chunk(delta: dict | str | None, finish: str | None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            else:
                c["text"] = delta or ""
            d = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": m.id,
                 "choices": [c]}
            return f"data: {json.dumps(d)}\n\n"

        async def events() -> AsyncIterator[str]:
            task = asyncio.ensure_future(run_in_worker(m, work_stream))
            task.add_done_callback(lambda t: emit(("done", t)))
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    kind, val = await q.get()
                    if kind == "text":
                        yield chunk(val, None)
                        continue
                    try:
                        r = val.result()
                    except (RequestError, UserError) as e:
                        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
                        break
                    final = json.loads(chunk(None, r.finish_reason)[len("data: "):])
                    if body.get("stream_options", {}).get("include_usage"):
                        final["usage"] = usage(r)
                    yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                    break
            finally:
                cancelled.set()  # a client that went away frees the engine at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def embeddings(request: Request) -> Response:
        try:
            body = await body_of(request)
            m = pick(body, ("encoder",))
            inp = body.get("input")
            texts = [inp] if isinstance(inp, str) else inp
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise RequestError("'input' must be a string or a non-empty list of strings", param="input")
            if len(texts) > 2048:
                raise RequestError("at most 2048 inputs per request", param="input")
            if body.get("encoding_format", "float") not in ("float", "base64"):
                raise RequestError("'encoding_format' must be float or base64", param="encoding_format")
            emb = await run_in_worker(m, lambda: m.session.embed(texts))
        except RequestError as e:
            return error(str(e), e.status, e.param)
        except UserError as e:
            return error(str(e), 400)
        n_tok = sum(len(m.session.tokenizer.encode(t).ids) for t in texts) if m.session.tokenizer else 0
        if body.get("encoding_format") == "base64":
            import base64

            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(e.astype("<f4").tobytes())
                     .decode()} for i, e in enumerate(emb)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": e.tolist()} for i, e in enumerate(emb)]
        return JSONResponse({"object": "list", "data": data, "model": m.id,
                             "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": "edge-rt",
             "meta": {"kind": m.kind, "plan": str(m.session.plan.path), "max_context": m.session.plan.max_context,
                      "budget": m.session.plan.budget, "strategy": m.session.plan.strategy}}
            for m in models.values()]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": {m.id: {"queued": m.waiting} for m in models.values()}})

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def serve(sessions: list[Session], host: str, port: int, queue: int, log: Callable[[str], None]) -> None:
    import uvicorn

    app = build_app(sessions, queue)
    ids = ", ".join(_model_ids(sessions))
    log(f"edge-rt-exec: serving {ids} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
