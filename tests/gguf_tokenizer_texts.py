"""Texts the GGUF tokenizer is checked on, shared by `tests/test_gguf_tokenizer.py` and
`scripts/make_llamacpp_token_ids.py` (which runs them through llama.cpp in its own virtualenv, so this module
needs nothing beyond the standard library).

Changing a list here (or `fuzz_texts`) makes `test_real_matches_llama_cpp` fail until the fixture
`tests/fixtures/smollm2_llamacpp_token_ids.json` is regenerated with that script.
"""

from __future__ import annotations

import random

#: text without special tokens: the round trip decode(encode(x)) == x must hold
PLAIN_TEXTS = [
    "Hello world",
    "Hi",
    "café naïve Zürich Ünïcödé façade résumé",
    "日本語のテキストと中文和한국어",
    "emoji 😀🎉 flags 🏳️‍🌈 family 👨‍👩‍👧 skin 👍🏽",
    "a   b    c\t\td  ",
    "   leading spaces",
    "trailing spaces   ",
    "\n\nnew\nlines\r\n\r\nwindows\n\n\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-06-01 ½ ² ١٢٣ Ⅻ",
    "x  1, y   22\n    1. item\n    2. item\n\t3",
    "I'm sure you'll see they're WE'RE it's",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "if (a[i] != b[j]) { c += d->e; } // C++ && || <<= >>",
    "<div class=\"x\">&amp;</div> https://example.com/a?b=c&d=e#f",
    "mixed\u00a0nbsp\u3000ideographic\u2028line\u2029para\u200bzw",
    "combining e\u0301 vs \u00e9, Å vs A\u030a",
    "",
    " ",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y<|im_start|>z<|endoftext|>",
    "<|im_start|><|im_start|>  <|im_end|>\n\n<file_sep><filename>a.py",
    "almost special <|im_ start|> <|im_end| > <|endoftext",
]

#: Numerals: the pre-tokenizer isolates every \p{N} character (pre='smollm'), which is where HF transformers'
#: own GGUF conversion differs from llama.cpp; so these are checked against llama.cpp only.
NUMERAL_TEXTS = [
    "0", "7", "42", "-42", "+1", "007", "1234567890123", "99999999999999999999", "12345 67890",
    "3.14159", "0.5", ".5", "5.", "-0.001", "1e-5", "6.022e23", "1,000,000", "1.000.000,50", "1_000_000",
    "1 000 000", "0x1F", "0b1010", "0o777", "v2.0.1", "version 10.15.7-rc1", "Python 3.11.7",
    "2024-06-01", "01/02/2024", "12.31.1999", "2024-06-01T12:34:56Z", "10:30", "23:59:59.999",
    "June 1st, 2nd, 3rd and 4th", "the 1990s", "'99", "+1 (555) 123-4567", "555-0100", "+44 20 7946 0958",
    "abc123def", "a1b2c3", "x1", "1x", "H2O CO2 C6H12O6", "mp3 mp4 4K 1080p", "COVID-19", "B2B",
    "$19.99", "€5", "£1,250.00", "¥100", "50%", "3/4", "1/2 cup", "2^10 = 1024", "10**9", "1<2", "a[0]=1;",
    "(1)", "[12]", "{3}", "\"42\"", "'7'", "#1", "No. 5", "1-2-3", "1--2", "1..10", "1...", "1:1",
    "٣", "١٢٣٤٥", "٣.١٤", "۱۲۳", "१२३४", "১২৩", "๑๒๓", "０１２３", "１２３ＡＢＣ", "²", "x² + y³", "H₂O", "x₁₀",
    "½", "¼ ¾", "⅓ ⅔ ⅛", "Ⅻ", "ⅳ", "① ② ③", "⑩", "🔟", "1️⃣ 2️⃣", "〇一二三", "߀߁߂", "𝟙𝟚𝟛", "𐄇",
    "1\n2\n3", "1\t2\t3", " 1", "  12", "   123", "\t1", "\n1", "1\n", "1 ", "1  ", "a 1 b 22 c 333",
    "Chapter 1: Section 2.3.4", "ISBN 978-3-16-148410-0", "192.168.0.1:8080", "pi = 3.141592653589793",
    "In 1969, 3 astronauts flew 384400 km to the Moon.",
]
#: Code: indentation runs, operators, brackets, quotes, shell and JSON punctuation.
CODE_TEXTS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\n\nx = np.arange(10, dtype=np.float32).reshape(2, 5)\nprint(x.T @ x)  # 5x5\n",
    "class Foo(Base):\n    \"\"\"Doc.\"\"\"\n\n    def __init__(self, *args, **kwargs):\n        super().__init__()\n"
    "        self._x = {'a': [1, 2], \"b\": (3,)}\n",
    "for i in range(3):\n\tfor j in range(4):\n\t\tif i == j:\n\t\t\tcontinue\n",
    "lambda x, y=0.5: x if x >= y else -y",
    "f\"{name!r:>10} {value:.3f} {pct:5.1%}\"",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; ++i) {\n"
    "        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n    return 0;\n}\n",
    "static inline uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }",
    "if (p != NULL && p->next) { *q++ = p->val; } else { q[-1] ^= 0xFF; }",
    "{\n  \"name\": \"edge-rt\",\n  \"version\": \"0.1.0\",\n  \"n\": [1, 2.5, -3e4, null, true],\n"
    "  \"nested\": {\"a\": {}}\n}",
    "{\"k\":\"v\",\"list\":[{\"id\":1},{\"id\":2}]}",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.gguf; do\n  sha256sum \"$f\" | cut -c1-16\ndone\n",
    "ls -la ~/.cache && echo $HOME > /tmp/x 2>&1 || exit 1",
    "cat <<'EOF' | grep -E '^[0-9]+$'\n1\n22\nEOF",
    "SELECT id, COUNT(*) AS n FROM t WHERE x >= 10 GROUP BY id ORDER BY n DESC LIMIT 5;",
    "key: value\nlist:\n  - 1\n  - two\n  - {a: 3}\n",
    "all: build\n\nbuild:\n\tgcc -O2 -o main main.c\n",
    "<html>\n  <body>\n    <p class=\"a b\">Hi &lt;there&gt;</p>\n  </body>\n</html>",
    "regex: ^(?:[a-z0-9._%+-]+)@[a-z0-9.-]+\\.[a-z]{2,}$",
    "    return x\n\n\n\n    return y",
    "x=1;y=2;z=x+y",
    "a->b, a::b, a=>b, a<=>b, a?.b, a??b, a!==b, a**=2, a//=3, a>>>=1",
]
#: Unicode beyond Latin: scripts, emoji sequences, combining marks, right-to-left text, odd code points.
UNICODE_TEXTS = [
    "中文测试：你好，世界！这是一个句子。", "日本語のひらがなとカタカナ、漢字。", "ｶﾀｶﾅ 半角", "한국어 문장입니다.",
    "繁體中文與简体中文", "𠜎𠜱𠝹𠱓", "emoji 👩‍💻 👨‍👩‍👧‍👦 🧑🏾‍🚀 👍🏻👍🏿 🏳️‍⚧️ 🇫🇷🇯🇵 ❤️ ☺︎",
    "😀😃😄😁😆😅🤣😂", "🫠🫶🪿", "ZWJ alone \u200d and ZWNJ \u200c", "e\u0301\u0302\u0303 a\u0308", "Z̤̈a̧l͓g̈o",
    "Tiếng Việt có dấu", "ﬁ ﬂ ﬀ ligatures", "Ǆ ǅ ǆ", "ß ẞ", "İstanbul ıi", "Ελληνικά", "Русский текст",
    "مرحبا بالعالم", "שלום עולם", "العربية 123 English", "\u202bRTL embed\u202c \u200fRLM\u200e LRM",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "ሰላም", "ᚠᛇᚻ", "∑∫√∞≠≈≤≥ ∀x∈ℝ", "→←↑↓⇒ ★☆ ♠♥", "©®™ §¶†‡",
    "\ufeffBOM first", "\ufffd replacement", "\ue000 private use", "\U0010fffd", "\x01\x02\x1b[0m\x7f", "\u00ad soft",
]
#: Whitespace runs: llama.cpp's `\s+(?!\S)` leaves the last space of a run to the next word or digit.
WHITESPACE_TEXTS = [
    "\t", "\t\t\t", "  ", "    ", " " * 17, " " * 100, "\n", "\n\n", "\n\n\n", "\n\n\n\n\n\n", "\r\n", "\r\n\r\n",
    "\r", "a\rb", "a \n b", "a\n \nb", " \t \n ", "\v\f", "word   ", "word\t", "word\n", "   word",
    "\tword", "\n\nword", "  two  spaces  ", "a\u00a0\u00a0b", "\u3000\u3000x", "\u2003em\u2009thin",
    "    1. item\n    2. item\n", "  - a\n  - b\n", "\t1\t2\n\t3\t4", "x =    1", "x\t=\t1", "  12  34  ",
    "line1\nline2\r\nline3\rline4", "end with spaces and newline   \n", " \n", "\n ", "\t\n\t\n",
]


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    """`n` random strings of 1..40 pieces from a pool that mixes letters, digits, whitespace, punctuation,
    accents, CJK, emoji, odd code points, contractions and (near-)special tokens; the same for a given seed."""
    pool = (list("abcXYZ ") * 5 + list("0123456789") + list("  \n\n\t\r'’\"`.,;:!?-_()[]{}<>/\\|@#$%^&*+=~")
            + list("éüñçÅßøœ") + list("日本語中文한국어")
            + ["😀", "🏳️‍🌈", "\u0301", "\u200d", "\u00a0", "\u3000", "\u2028", "½", "²", "٣", "Ⅻ"]
            + ["'s", "'ll", "'RE", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<|im_"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


#: The llama.cpp fixture's sections, in order (name -> texts); the fuzz texts are `fuzz_texts(1500, seed=0)`.
N_FUZZ, FUZZ_SEED = 1500, 0


def llama_cpp_sections() -> dict[str, list[str]]:
    """Every text of the llama.cpp fixture by section, as `scripts/make_llamacpp_token_ids.py` writes them."""
    return {"plain": PLAIN_TEXTS, "special": SPECIAL_TEXTS, "numerals": NUMERAL_TEXTS, "code": CODE_TEXTS,
            "unicode": UNICODE_TEXTS, "whitespace": WHITESPACE_TEXTS, "fuzz": fuzz_texts(N_FUZZ, FUZZ_SEED)}
