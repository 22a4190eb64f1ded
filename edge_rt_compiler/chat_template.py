"""The model's jinja chat template, rendered at compile time into its structure, so the device needs no template
engine (`edge_rt_exec.chat` rebuilds any conversation from it).

A conversation renders turn by turn: for most templates the rendering of the first k messages is a prefix of
the rendering of the first k + 1, and each turn is `prefix(role) + content + suffix(role)`; the first turn may
differ (a BOS token, a default system prompt inserted before a first user message). The structure is read
off renderings with sentinel contents and then proven: several conversations are rendered both by the real
template and from the structure, and must be identical. A template that fails that keeps only the single-turn
prefix/suffix around one user message (as before), and says why.

Templates are user input: they render in jinja2's immutable sandbox, with `range`, string/list repetition and
powers capped, an operation limit per rendering (template lines executed, loop iterations included: it holds in
any thread, a joblib worker's or a server's too) and, on the main thread, a wall-clock limit as well, so a hostile
template is recorded as `chat_error` in bounded time instead of running forever.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any

from edge_rt_exec.errors import UserError

#: Wall-clock seconds one rendering may take.
RENDER_SECONDS = 2.0
#: Largest `range()` a template may build.
MAX_RANGE = 10_000
#: Longest output a rendering may produce (characters); also the longest string or list `*` may build.
MAX_OUTPUT = 1 << 20
#: Template lines one rendering may execute (each loop iteration counts): real chat templates take a few hundred.
MAX_STEPS = 1_000_000
#: Largest exponent `**` may take (beyond it an integer power is a memory bomb, not arithmetic).
MAX_EXPONENT = 1024

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


class _TooManySteps(Exception):
    pass


class _StepLimit:
    """Counts the lines jinja's compiled template code executes (`sys.settrace`, in this thread only, on the
    template's own frames only) and stops the rendering past `limit`: an operation limit that needs no signal."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def on_call(self, frame: Any, event: str, arg: Any) -> Any:
        return self.on_line if frame.f_code.co_filename == "<template>" else None

    def on_line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise _TooManySteps()
        return self.on_line


@contextmanager
def _step_limit(limit: int):  # noqa: ANN202
    old = sys.gettrace()
    sys.settrace(_StepLimit(limit).on_call)
    try:
        yield
    finally:
        sys.settrace(old)


def _environment() -> Any:
    import jinja2.sandbox

    def capped_range(*args: int) -> range:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise jinja2.sandbox.SecurityError(f"range of {len(r)} items (more than {MAX_RANGE})")
        return r

    class Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                        raise jinja2.sandbox.SecurityError(f"a repetition of {len(seq) * n} items (more than "
                                                           f"{MAX_OUTPUT})")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise jinja2.sandbox.SecurityError(f"an exponent of {right} (more than {MAX_EXPONENT})")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True)
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
            with _time_limit(RENDER_SECONDS), _step_limit(MAX_STEPS):
                text = self.tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except _TemplateTimeout:
            raise TemplateFailure(f"rendering took more than {RENDER_SECONDS:g} s") from None
        except _TooManySteps:
            raise TemplateFailure(f"rendering ran more than {MAX_STEPS} template steps (a loop too long)") from None
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
