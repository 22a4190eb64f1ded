"""Rebuild a Hugging Face `tokenizers` tokenizer.json from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one:

- `tokenizer.ggml.model`: the algorithm. "gpt2" = byte-level BPE (supported here); "llama" = SentencePiece
  (not supported yet).
- `tokenizer.ggml.tokens` / `.merges` / `.token_type`: vocabulary (index = id), BPE merges ("a b", best
  first) and llama.cpp token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
- `tokenizer.ggml.pre`: the name of the pre-tokenizer. llama.cpp maps the name to a list of regexes
  (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`); each regex splits every piece left by the previous one into
  its matches and the unmatched gaps between them. That is exactly a `Split(Regex, "isolated")` pre-tokenizer
  in `tokenizers`, so a pre value becomes `Sequence[Split(re1), Split(re2), ..., ByteLevel(use_regex=False)]`.
  (HF transformers' GGUF converter does the same for the pre values it knows.)

llama.cpp matches control, unknown and user-defined tokens whole in the input text before the BPE runs (with
`parse_special`); they become added tokens here: control/unknown ones `special`, user-defined ones not.
When the file says BOS (or EOS) is added, a `TemplateProcessing` post-processor adds it, so
`Tokenizer.encode(text)` (add_special_tokens=True) equals llama.cpp's `tokenize(text, add_special=True,
parse_special=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edge_rt_exec.errors import UserError

__all__ = ["tokenizer_json_from_gguf", "default_add_bos", "PRE_TOKENIZER_REGEXES", "SUPPORTED_TOKENIZER_MODELS"]

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp token types (enum llama_token_type)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# --- pre-tokenizer regexes, copied from llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp) ---------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

#: `tokenizer.ggml.pre` value -> the regexes llama.cpp applies, in order.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    # LLAMA_VOCAB_PRE_TYPE_GPT2 / MPT / OLMO
    **{k: (_GPT2,) for k in ("gpt-2", "phi-2", "mpt", "olmo")},
    # STARCODER / REFACT / COMMAND_R / SMOLLM / CODESHELL / EXAONE / MINERVA: digits split one by one first
    **{k: (r"\p{N}", _GPT2) for k in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                       "minerva-7b")},
    # LLAMA3 / DBRX / SMAUG
    **{k: (_LLAMA3,) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe")},
    # QWEN2 / STABLELM2
    **{k: (_QWEN2,) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
}
# pre values for which llama.cpp sets `ignore_merges` (a whole pre-token found in the vocab is used as is)
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})
# pre values for which llama.cpp adds BOS when the file does not say (tokenizer.ggml.add_bos_token missing)
_ADD_BOS_BY_DEFAULT = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})

# Token texts llama.cpp always treats as control (end-of-generation auto-detection in llama_vocab::load).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "<|end_of_text|>", "<end_of_utterance>",
})

_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
)


def _metadata_from(reader_or_metadata: Any) -> dict[str, Any]:
    """The tokenizer keys as plain Python values, from a `gguf.GGUFReader` or a mapping of metadata."""
    if isinstance(reader_or_metadata, Mapping):
        return {k: reader_or_metadata[k] for k in _KEYS if k in reader_or_metadata}
    fields = getattr(reader_or_metadata, "fields", None)
    if not isinstance(fields, Mapping):
        raise TypeError("tokenizer_json_from_gguf expects a gguf.GGUFReader or a mapping of GGUF metadata, "
                        f"got {type(reader_or_metadata).__name__}")
    out: dict[str, Any] = {}
    for k in _KEYS:
        f = fields.get(k)
        if f is None:
            continue
        try:
            out[k] = f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise UserError(f"GGUF metadata key '{k}' cannot be decoded ({type(e).__name__}: {e}); "
                            "the file is corrupt, re-download or re-convert it") from None
    return out


def default_add_bos(tokenizer_model: str, pre: str | None) -> bool:
    """llama.cpp's choice when `tokenizer.ggml.add_bos_token` is missing (llama_vocab::impl::load)."""
    if tokenizer_model in ("llama", "bert"):  # SentencePiece, WordPiece
        return True
    if tokenizer_model == "gpt2":
        return pre in _ADD_BOS_BY_DEFAULT
    return False


def _check_id(meta: dict[str, Any], key: str, n_vocab: int, where: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: GGUF metadata '{key}' is {v!r}, expected a token id; fix or re-convert the file")
    if not 0 <= v < n_vocab:
        raise UserError(f"{where}: GGUF metadata '{key}' = {v} is outside the vocabulary (0..{n_vocab - 1}); "
                        "fix or re-convert the file")
    return v


def tokenizer_json_from_gguf(reader_or_metadata: Any, *, where: str = "GGUF file") -> str:
    """A tokenizer.json (as a string) equivalent to llama.cpp's tokenizer for this GGUF.

    `reader_or_metadata` is a `gguf.GGUFReader` or a mapping from GGUF metadata keys to Python values
    (strings, ints, bools, lists). `where` names the file in error messages.
    """
    meta = _metadata_from(reader_or_metadata)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise UserError(f"{where}: GGUF metadata key 'tokenizer.ggml.model' is missing; the file has no tokenizer, "
                        "re-convert it with llama.cpp's convert_hf_to_gguf.py")
    if model == "llama":
        raise UserError(f"{where}: tokenizer.ggml.model = 'llama' (SentencePiece) is not supported yet; "
                        f"supported: {list(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE) - use the HF folder instead")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UserError(f"{where}: tokenizer.ggml.model = {model!r} is not supported; "
                        f"supported: {list(SUPPORTED_TOKENIZER_MODELS)} - use the HF folder instead")
    return _byte_level_bpe(meta, where)


def _byte_level_bpe(meta: dict[str, Any], where: str) -> str:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{where}: GGUF metadata key 'tokenizer.ggml.tokens' is missing or not a list of strings; "
                        "re-convert the file")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise UserError(f"{where}: GGUF metadata key 'tokenizer.ggml.merges' is missing or not a list of strings "
                        "(a 'gpt2' tokenizer needs it); re-convert the file")
    n_vocab = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_TYPE_NORMAL] * n_vocab
    if not isinstance(types, list) or len(types) < n_vocab:
        raise UserError(f"{where}: GGUF metadata 'tokenizer.ggml.token_type' has "
                        f"{len(types) if isinstance(types, list) else type(types).__name__} entries for {n_vocab} "
                        "tokens; re-convert the file")
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        pre = "default"  # llama.cpp warns "missing pre-tokenizer type, using: 'default'"
    if pre not in PRE_TOKENIZER_REGEXES:
        raise UserError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported; supported: "
                        f"{sorted(PRE_TOKENIZER_REGEXES)} - use the HF folder instead")

    # vocabulary (llama.cpp renames empty tokens and refuses duplicates)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t == "":
            t = f"[EMPTY_{i}]"
        if t in vocab:
            raise UserError(f"{where}: token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} and {i}); "
                            "re-convert the file")
        vocab[t] = i
    texts = list(vocab)

    # merges: "a b" split at the first space after position 0, as llama.cpp does; merges HF cannot represent
    # (a part or the result missing from the vocabulary) can never fire in llama.cpp either and are dropped.
    merge_list: list[str] = []
    for m in merges:
        pos = m.find(" ", 1)
        if pos < 0:
            continue
        a, b = m[:pos], m[pos + 1:]
        if a in vocab and b in vocab and (a + b) in vocab and " " not in b:
            merge_list.append(f"{a} {b}")

    # added tokens: control / unknown -> special; user-defined -> plain added token
    added = []
    for i, (t, ty) in enumerate(zip(texts, types)):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN) or t in _EOG_TEXTS:
            special = True
        elif ty == TOKEN_TYPE_USER_DEFINED:
            special = False
        else:
            continue
        added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": special})

    # pre-tokenizer
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in PRE_TOKENIZER_REGEXES[pre]]
    pre_tok = {"type": "Sequence", "pretokenizers": [
        *splits, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    # post-processor: BOS / EOS as llama.cpp adds them with add_special=True
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = default_add_bos("gpt2", pre)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = _check_id(meta, "tokenizer.ggml.bos_token_id", n_vocab, where)
    eos = _check_id(meta, "tokenizer.ggml.eos_token_id", n_vocab, where)
    special_tokens: dict[str, dict] = {}

    def template(seq: str, type_id: int) -> list[dict]:
        out: list[dict] = []
        if add_bos and bos is not None:
            out.append({"SpecialToken": {"id": texts[bos], "type_id": type_id}})
        out.append({"Sequence": {"id": seq, "type_id": type_id}})
        if add_eos and eos is not None:
            out.append({"SpecialToken": {"id": texts[eos], "type_id": type_id}})
        return out

    for tid, on in ((bos, add_bos), (eos, add_eos)):
        if on and tid is not None:
            special_tokens[texts[tid]] = {"id": texts[tid], "ids": [tid], "tokens": [texts[tid]]}
    single, pair = template("A", 0), template("A", 0) + template("B", 1)
    if special_tokens:
        post: dict[str, Any] = {"type": "TemplateProcessing", "single": single, "pair": pair,
                                "special_tokens": special_tokens}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

    bpe: dict[str, Any] = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
        "vocab": vocab, "merges": merge_list,
    }
    if pre in _IGNORE_MERGES:
        bpe["ignore_merges"] = True

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": bpe,
    }
    return json.dumps(doc, ensure_ascii=False)
