"""Chat prompts on the device, without a template engine.

The compiler renders the model's jinja chat template at compile time into its structure (see
`edge_rt_compiler.chat_template`): what wraps each turn by role, what the first turn adds (a BOS token, the
default system prompt some templates insert), and the generation prompt. It checks that structure against the
real template on sample conversations and writes it to `generation.json` as `chat`. Here a conversation of any
length is rebuilt from it.

`generation.json` fields used: `chat` = {`first`: {role: [prefix, suffix]}, `turn`: {role: [prefix, suffix]},
`generation_prompt`: str}, or for a template whose structure could not be proven, only the single-turn
`chat_prefix` / `chat_suffix` around one user message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    first: dict[str, tuple[str, str]]  #: wrapper of the conversation's first turn, by role
    turn: dict[str, tuple[str, str]]  #: wrapper of every later turn, by role
    generation_prompt: str

    @classmethod
    def from_generation(cls, gen: dict[str, Any]) -> ChatFormat | None:
        c = gen.get("chat")
        if not isinstance(c, dict):
            return None
        try:
            first = {r: (str(p), str(s)) for r, (p, s) in c["first"].items()}
            turn = {r: (str(p), str(s)) for r, (p, s) in c["turn"].items()}
            return cls(first, turn, str(c["generation_prompt"]))
        except (KeyError, TypeError, ValueError):
            return None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        parts = []
        for i, m in enumerate(messages):
            wrap = (self.first if i == 0 else self.turn).get(m["role"])
            if wrap is None:
                raise UserError(f"message {i}: role {m['role']!r} is not one the model's chat template takes "
                                f"({', '.join(self.turn)})")
            parts += [wrap[0], m["content"], wrap[1]]
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI-style messages -> [{role, content}] with roles and text checked (one line on error)."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI content parts: only text parts are meaningful here
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise UserError(f"message {i}: only text content parts are supported")
            content = "".join(texts)
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string")
        out.append({"role": role, "content": content})
    return out


def render_chat(gen: dict[str, Any], messages: list[dict[str, str]], model: str) -> str:
    """The prompt text of a conversation ending with the generation prompt."""
    fmt = ChatFormat.from_generation(gen)
    if fmt is not None:
        return fmt.render(messages)
    pre, suf = gen.get("chat_prefix"), gen.get("chat_suffix")
    if pre is None or suf is None:
        raise UserError(f"{model} has no usable chat template ({gen.get('chat_error', 'none in the model')}); use "
                        "a plain prompt (run without --chat, or /v1/completions)")
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise UserError(f"{model}'s chat template takes one user message only "
                        f"({gen.get('chat_error', 'its structure could not be derived')})")
    return pre + messages[0]["content"] + suf


def chat_loop(session: Any, params: Any, max_tokens: int, system: str | None, stop: list[str], stdin: Any,
              stdout: Any, stderr: Any) -> int:
    """`edge-rt-exec chat`: read a line, answer it, keep the conversation (and its KV cache) for the next one.

    `/reset` starts over, `/exit` (or end of input) quits. When the conversation no longer fits the plan's
    context with room for a reply, the oldest turns (after the system prompt) are dropped, and it says so.
    """
    ctx = session.plan.max_context
    base = [{"role": "system", "content": system}] if system is not None else []
    messages = list(base)
    print(f"edge-rt chat: {session.name}, context {ctx} tokens, replies up to {max_tokens} tokens. /reset starts "
          "over, /exit quits.", file=stderr, flush=True)
    while True:
        stdout.write("> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            stdout.write("\n")
            break
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(base)
            if session.decoder is not None:
                session.decoder.reset()
            print("[conversation cleared]", file=stderr, flush=True)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = session.encode_chat(messages)
        dropped = 0
        while len(ids) + min(max_tokens, 64) > ctx and len(messages) > len(base) + 1:
            del messages[len(base):len(base) + 2]  # the oldest exchange (user + assistant)
            dropped += 1
            ids = session.encode_chat(messages)
        if dropped:
            print(f"[context full: dropped the {dropped} oldest exchange(s) to fit {ctx} tokens]", file=stderr,
                  flush=True)
        if len(ids) >= ctx:
            print(f"[this message needs {len(ids)} tokens, more than the plan's context of {ctx}; shorten it]",
                  file=stderr, flush=True)
            messages.pop()
            continue
        try:
            r = session.generate(ids, max_tokens=min(max_tokens, ctx - len(ids)), params=params,
                                 on_text=lambda t: (stdout.write(t), stdout.flush()), stop=stop)
        except KeyboardInterrupt:
            messages.pop()
            session.decoder.reset()
            print("\n[interrupted]", file=stderr, flush=True)
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": r.text})
        print(f"[{len(r.tokens)} tokens at {r.decode_tok_s:.1f} tok/s; prompt {r.prompt_tokens} tokens, "
              f"{r.cached_tokens} reused from the KV cache, prefill {r.prefill_ms:.0f} ms]", file=stderr, flush=True)
    return 0
