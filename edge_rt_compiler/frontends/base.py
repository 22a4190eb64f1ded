"""What every frontend produces: the model's graph IR (built through `ir.GraphBuilder`) and what ships beside
the plan (tokenizer, generation settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from edge_rt_exec.errors import UserError

from ..families.base import TransformerConfig


@dataclass
class ModelSource:
    """A frontend's output: the IR, plus everything the emitter needs besides it."""

    name: str
    graph: nx.DiGraph  #: the IR as the frontend built it (passes run next)
    source_key: str  #: identifies the source bytes; equal keys mean the repacked weights can be reused
    max_position: int  #: the longest context the model supports
    config: TransformerConfig | None = None  #: transformer families; None for ONNX graphs
    tokenizer_json: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  #: source tensors deliberately not used (buffers)
    origin: str = ""  #: the file or folder it was read from
    default_context: int | None = None  #: the maximum context when the preset and request set none

    @property
    def kind(self) -> str:
        return str(self.graph.graph["kind"])


def read_tokenizer(path: Path) -> str | None:
    """A model's tokenizer.json as text, or None when there is none; a binary, non-UTF-8 or non-tokenizer file is
    one line (the executor loads it with `tokenizers`, so it is checked here with the same library)."""
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8); fix or re-download the "
                        "tokenizer") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the tokenizer ({e.strerror or e}); check the file") from None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception for any malformed file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: not a valid tokenizer.json ({reason}); fix or re-download the tokenizer") from None
    return text


def token_id(v: Any, key: str, where: Path | str, vocab_size: int | None = None) -> int | None:
    """A special-token id from a model's settings: None, or a whole number inside the vocabulary."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (vocab_size is not None and v >= vocab_size):
        bound = f" below {vocab_size}" if vocab_size is not None else ""
        raise UserError(f"{where}: '{key}' = {repr(v)[:40]}, expected a token id (a whole number >= 0{bound}); "
                        "fix the value or re-download the model")
    return v


def token_ids(v: Any, key: str, where: Path | str, vocab_size: int | None = None) -> list[int]:
    """One token id or a list of them (HF's eos_token_id)."""
    return [i for x in (v if isinstance(v, list) else [v]) if (i := token_id(x, key, where, vocab_size)) is not None]
