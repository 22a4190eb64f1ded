"""The model's jinja chat template, rendered at compile time into its structure, so the device needs no template
engine (`edge_rt_exec.chat` rebuilds any conversation from it).

A conversation renders turn by turn: for most templates the rendering of the first k messages is a prefix of
the rendering of the first k + 1, and each turn is `prefix(role) + content + suffix(role)`; the first turn may
differ (a BOS token, a default system prompt inserted before a first user message). The structure is read
off renderings with sentinel contents and then proven: several conversations are rendered both by the real
template and from the structure, and must be identical. A template that fails that keeps only the single-turn
prefix/suffix around one user message (as before), and says why.

Templates are user input: they render in jinja2's immutable sandbox, with `range` capped and a wall-clock limit
per rendering, so a hostile template fails with one line instead of running forever.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any

from edge_rt_exec.errors import UserError

#: Wall-clock seconds one rendering may take.
RENDER_SECONDS = 2.0
#: Largest `range()` a template may build.
MAX_RANGE = 10_000
#: Longest output a rendering may produce (characters).
MAX_OUTPUT = 1 << 20

_S = "\x00EDGE_RT_{}\x00"


class _TemplateTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):  # noqa: ANN202
    """SIGALRM-based limit (the compiler renders on the main thread); no limit elsewhere."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _TemplateTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _environment() -> Any:
    import jinja2.sandbox

    def capped_range(*args: int) -> range:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise jinja2.sandbox.SecurityError(f"range of {len(r)} items (more than {MAX_RANGE})")
        return r

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["range"] = capped_range

    def raise_exception(msg: str) -> None:  # HF templates call it to refuse a conversation
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env


class Renderer:
    """Renders one template with the limits above; `render` raises `TemplateFailure` with a one-line reason."""

    def __init__(self, template: str, tokens: dict[str, str]) -> None:
        self.tokens = tokens
        try:
            self.tpl = _environment().from_string(template)
        except Exception as e:  # a template is user input: any failure is reported, not raised
            raise TemplateFailure(f"the template does not parse ({e.__class__.__name__}: {e})") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            with _time_limit(RENDER_SECONDS):
                text = self.tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except _TemplateTimeout:
            raise TemplateFailure(f"rendering took more than {RENDER_SECONDS:g} s") from None
        except RecursionError:
            raise TemplateFailure("rendering recursed too deeply") from None
        except Exception as e:
            raise TemplateFailure(f"{e.__class__.__name__}: {str(e)[:200]}") from None
        if len(text) > MAX_OUTPUT:
            raise TemplateFailure(f"rendering produced {len(text)} characters")
        return text


class TemplateFailure(Exception):
    """Why a template's structure could not be used (recorded in generation.json, not raised to the user)."""


def _wrap(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise TemplateFailure("the template does not echo each message exactly once")
    pre, suf = text.split(sentinel)
    return pre, suf


def single_turn(r: Renderer) -> tuple[str, str]:
    """(prefix, suffix) around one user message, with the generation prompt."""
    s = _S.format("USER")
    return _wrap(r.render([{"role": "user", "content": s}], True), s)


def structure(r: Renderer) -> dict[str, Any]:
    """The `chat` block of generation.json (see `edge_rt_exec.chat`)."""
    first: dict[str, tuple[str, str]] = {}
    turn: dict[str, tuple[str, str]] = {}
    roles = ("system", "user", "assistant")
    for role in roles:
        s = _S.format("FIRST")
        try:
            first[role] = _wrap(r.render([{"role": role, "content": s}], False), s)
        except TemplateFailure:
            if role == "user":
                raise
    # later turns: after a (system, user) opening, each role in turn; read off the growth of the rendering
    opening = [{"role": "system", "content": _S.format("S")}, {"role": "user", "content": _S.format("U")}]
    base = r.render(opening, False)
    for role in roles:
        s = _S.format("TURN")
        msgs = opening + ([{"role": "assistant", "content": _S.format("A")}] if role == "user" else []) + \
            [{"role": role, "content": s}]
        prev = r.render(msgs[:-1], False) if role == "user" else base
        text = r.render(msgs, False)
        if not text.startswith(prev):
            raise TemplateFailure("the rendering of a conversation is not a prefix of its continuation")
        try:
            turn[role] = _wrap(text[len(prev):], s)
        except TemplateFailure:
            if role != "system":
                raise
    msgs = opening + [{"role": "assistant", "content": _S.format("A")}]
    plain = r.render(msgs, False)
    with_prompt = r.render(msgs, True)
    if not with_prompt.startswith(plain):
        raise TemplateFailure("the generation prompt is not appended at the end")
    return {"first": first, "turn": turn, "generation_prompt": with_prompt[len(plain):]}


def _from_structure(st: dict[str, Any], messages: list[dict[str, str]]) -> str:
    parts = []
    for i, m in enumerate(messages):
        pre, suf = (st["first"] if i == 0 else st["turn"])[m["role"]]
        parts += [pre, m["content"], suf]
    return "".join(parts) + st["generation_prompt"]


#: Conversations the structure must reproduce exactly (plain text and the awkward cases: empty, newlines,
#: braces, a repeated system message is left out on purpose: not every template allows it).
PROOF = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb {{ x }}"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "  c  "},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


def render_chat(template: str | None, tokens: dict[str, str]) -> dict[str, Any]:
    """The chat fields of generation.json: `chat` (the proven structure) or `chat_error`, and the single-turn
    `chat_prefix` / `chat_suffix` (None when even one message cannot be rendered)."""
    if not template:
        return {"chat_prefix": None, "chat_suffix": None, "chat": None}
    try:
        r = Renderer(template, tokens)
        pre, suf = single_turn(r)
    except TemplateFailure as e:
        return {"chat_prefix": None, "chat_suffix": None, "chat": None, "chat_error": str(e)}
    out: dict[str, Any] = {"chat_prefix": pre, "chat_suffix": suf, "chat": None}
    try:
        st = structure(r)
        for conv in PROOF:
            if any(m["role"] not in (st["first"] if i == 0 else st["turn"]) for i, m in enumerate(conv)):
                continue
            if _from_structure(st, conv) != r.render(conv, True):
                raise TemplateFailure("rebuilding sample conversations from the turn structure does not match the "
                                      "template")
        out["chat"] = {"first": {k: list(v) for k, v in st["first"].items()},
                       "turn": {k: list(v) for k, v in st["turn"].items()},
                       "generation_prompt": st["generation_prompt"]}
    except TemplateFailure as e:
        out["chat_error"] = f"multi-turn chat is not available: {e}"
    return out


def check_template_text(template: Any, where: str) -> str | None:
    """A chat template from a model file must be text (a binary or non-UTF-8 one is refused with one line)."""
    if template is None:
        return None
    if not isinstance(template, str) or "\x00" in template:
        raise UserError(f"{where}: the chat template is not text; fix or re-convert the model")
    return template
