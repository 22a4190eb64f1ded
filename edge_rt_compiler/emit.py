"""Emit: the plan (schema 3, `edge_rt_exec.plan`), its name, the weights repacked in execution order and in
their formats (shared by every plan of a model and format), the tokenizer and the generation settings.

Every file is written atomically, and only under the artifact folder's lock (`locked`: a parallel sweep writes
the weights once, and a temporary file found under the lock belongs to a killed compile and is removed). A
folder holds one model: `source.json` records its source's fingerprint, and a compile of a different model into
it is refused (`check_folder`). The weights file is written once per model and format and reused only while its
header matches byte for byte (every tensor's name, format, shape and offset and the source's identity) and its
data still hashes to the sha256 the header carries; otherwise it is rewritten."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from edge_rt_exec.binfile import SafetensorsFile
from edge_rt_exec.checksum import checksum_ref
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import (
    ALIGNMENT,
    PLAN_FORMAT,
    PLAN_SUFFIX,
    SCHEMA_VERSION,
    Group,
    Op,
    Plan,
    WeightInfo,
    atomic_file,
    atomic_write,
)

from . import __version__
from .chat_template import render_chat
from .cost import Cost
from .frontends.base import ModelSource
from .memory_layout import Arena
from .partition import PartitionResult, resident_bytes
from .passes.quantize import KV_DTYPES
from .sizes import fmt_bytes
from .weights_layout import WeightsLayout

SHA_PLACEHOLDER = "0" * 64
IDENTITY_FILE = "source.json"  #: the artifact folder's model: its source's fingerprint, origin and name
#: tests only: create this file, then wait (up to a minute) with the weights half written, so that a test can
#: signal or kill a compile at a known point of the write
HOLD_ENV = "EDGE_RT_TEST_HOLD_WEIGHTS"


# ---- names --------------------------------------------------------------------------------------------------

def weights_file_name(tag: str) -> str:
    """One weights file per model and format tag ("weights-q4_1+q8_0.safetensors")."""
    return f"weights-{tag}.safetensors"


def plan_name(strategy: str, budget: int, max_context: int, tag: str, kv_dtype: str) -> str:
    """`greedy_grouping-512M-ctx2048-q4_1+q8_0.plan.json` (`-kvf16` when the KV cache is f16)."""
    kv = "" if kv_dtype == "f32" else f"-kv{kv_dtype}"
    return f"{strategy}-{fmt_bytes(budget)}-ctx{max_context}-{tag}{kv}{PLAN_SUFFIX}"


# ---- the plan -----------------------------------------------------------------------------------------------

def graph_interface(g: nx.DiGraph) -> dict[str, Any]:
    """The plan's `graph`: inputs with their symbolic dims and maxima, outputs, inline constants, roles, KV."""
    tensors = g.graph["tensors"]
    symbols = {d for i in g.graph["inputs"] for d in i["dims"] if isinstance(d, str)}
    return {
        "inputs": [dict(i) for i in g.graph["inputs"]],
        "outputs": [{"name": o, "dtype": tensors[o].dtype} for o in g.graph["outputs"]],
        "bounds": {s: v for s, v in g.graph["dims"].bounds.items() if s in symbols},
        "constants": {n: {"dtype": c.dtype, "shape": list(c.shape), "data": c.load().reshape(-1).tolist()}
                      for n, c in g.graph["constants"].items()},
        "io": dict(g.graph["io"]),
        "kv": {"mode": g.graph["kv"]["mode"], "pairs": [list(p) for p in g.graph["kv"]["pairs"]]},
    }


def make_plan(src: ModelSource, g: nx.DiGraph, layout: WeightsLayout, part: PartitionResult, arena: Arena,
              cost: Cost, *, request: Any, max_context: int, max_batch_tokens: int, reserve: int) -> Plan:
    """The `Plan` of one compile (files are filled in once they are written)."""
    schedule: list[Op] = []
    groups: list[Group] = []
    for gi, grp in enumerate(part.groups):
        start = len(schedule)
        for o in grp.ops:
            schedule.append(Op(len(schedule), o.op, o.name, o.unit, gi, list(o.inputs), list(o.outputs),
                               dict(o.attrs), list(o.scratch)))
        streamed = part.weights_mode == "streamed" and grp.streamed
        # a resident group of a streamed plan (partial residency) keeps its byte range: what it maps in place
        ranged = part.weights_mode == "streamed"
        groups.append(Group(gi, grp.units, start, len(schedule), grp.byte_start if ranged else 0,
                            grp.byte_end if ranged else 0, 0 if streamed else None, grp.flops))
    weights = {n: WeightInfo(w.offset, w.nbytes, w.format, list(w.shape), w.gather) for n, w in layout.weights.items()}
    resident = layout.file_size if part.weights_mode == "resident" else resident_bytes(part.groups)
    model = {"name": src.name, "family": g.graph["family"], "kind": g.graph["kind"], "config": dict(g.graph["config"]),
             "origin": src.origin}
    if "opset" in g.graph:
        model["opset"] = g.graph["opset"]
    return Plan(
        format=PLAN_FORMAT, schema_version=SCHEMA_VERSION, byte_order="little", compiler_version=__version__,
        model=model, graph=graph_interface(g), files={}, target=dict(request.target), strategy=part.strategy,
        requested_strategy=request.strategy, budget=request.budget, max_context=max_context,
        max_batch_tokens=max_batch_tokens, quant=request.quant, kv_dtype=KV_DTYPES[request.kv_dtype]
        if g.graph["kv"]["mode"] == "cache" else "float32", weights_mode=part.weights_mode, alignment=ALIGNMENT,
        weights=weights, groups=groups, schedule=schedule, buffers=arena.buffers,
        arena={"size": arena.size, "slots": arena.slots, "state": arena.state, "activations": arena.activations,
               "reserve": reserve, "resident_weights": resident},
        predicted={"decode_ms_per_token": round(cost.decode_ms_per_token, 3), "prefill_ms": round(cost.prefill_ms, 3),
                   "prefill_tokens": cost.prompt_tokens, "read_bytes_per_token": cost.read_bytes_per_token,
                   "peak_bytes": resident + arena.size + reserve, "notes": list(part.notes)},
    )


def checksum_groups(plan: Plan, weights: Path) -> None:
    """Fill in the checksum of every streamed group (`edge_rt_exec.checksum`) from the weights file as written,
    which the executor checks after every read of the group."""
    st = SafetensorsFile(weights)
    try:
        for g in plan.groups:
            if g.slot is not None:
                g.checksum = checksum_ref(st.file.view(g.byte_start, g.byte_end - g.byte_start, "u1",
                                                       (g.byte_end - g.byte_start,), f"group {g.index}"))
    finally:
        st.close()


def generation_settings(src: ModelSource) -> dict[str, Any]:
    """generation.json: EOS / BOS ids, the chat template rendered into a prefix and suffix, pooling."""
    gen = dict(src.generation)
    tok = {"bos_token": "", "eos_token": ""}
    if src.tokenizer_json:
        try:
            vocab = {a["id"]: a["content"] for a in json.loads(src.tokenizer_json).get("added_tokens", [])}
        except (ValueError, TypeError, KeyError):
            vocab = {}
        if gen.get("bos_token_id") in vocab:
            tok["bos_token"] = vocab[gen["bos_token_id"]]
        eos = gen.get("eos_token_ids") or []
        if eos and eos[0] in vocab:
            tok["eos_token"] = vocab[eos[0]]
    gen.update(render_chat(gen.get("chat_template"), tok))
    gen["kind"] = src.kind
    gen.setdefault("add_bos", False)
    return gen


# ---- files --------------------------------------------------------------------------------------------------

@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the artifact folder. Every write into the folder happens under it (parallel sweeps
    write the weights once), so a temporary file seen under it belongs to a killed compile."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: `atomic_file`'s temporary names: "." + the file's name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove what killed compiles left (only `atomic_file`'s own temporary names); the caller holds
    `locked(folder)`, so no live compile is writing them. Returns the names removed."""
    gone = []
    for p in folder.iterdir():
        if _TEMP.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return sorted(gone)


def _source_files(origin: Path) -> list[Path]:
    """The files whose bytes make the model: a .gguf / .onnx file (with an ONNX file's external data), or an HF
    folder's config.json, safetensors index and shards."""
    if origin.is_dir():
        return sorted([origin / "config.json", *origin.glob("*.safetensors"), *origin.glob("*.safetensors.index.json")])
    files = [origin]
    if origin.suffix.lower() == ".onnx":
        import onnx
        from onnx.external_data_helper import _get_all_tensors

        m = onnx.load(str(origin), load_external_data=False)
        locs = {e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"}
        files += sorted(origin.parent / loc for loc in locs)
    return files


def _file_sha(path: Path, start: int = 0) -> str:
    """sha256 of a file's bytes from `start` (streamed: 4 MiB of memory for any size)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def source_fingerprint(origin: Path) -> str:
    """sha256 over every source file's size and content (an HF folder's files also by name): the same model
    copied elsewhere, renamed or touched has the same fingerprint, another model (another fine-tune of the
    same shape, another seed) does not."""
    h = hashlib.sha256()
    for f in _source_files(origin):
        name = f.relative_to(origin).as_posix() if origin.is_dir() else ""
        h.update(f"{name}:{f.stat().st_size}:{_file_sha(f)}\n".encode())
    return h.hexdigest()


def check_folder(folder: Path, src: ModelSource) -> dict[str, str]:
    """The identity this compile records in `folder` (`record_source`, after the weights are in place). Refuses
    a folder that holds another model's artifacts: compiling into it would overwrite that model's weights and
    break its plans. The caller holds `locked(folder)`."""
    origin = str(Path(src.origin).resolve()) if src.origin else ""
    mine = {"model": src.name, "origin": origin, "source_key": src.source_key}
    try:
        old = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
        if not isinstance(old, dict) or len(str(old.get("fingerprint", ""))) != 64:
            old = None
    except (OSError, ValueError):
        old = None  # a folder from before source.json (or a damaged one): this compile records its model
    if old and (old.get("origin"), old.get("source_key")) == (origin, src.source_key):
        return {**mine, "fingerprint": old["fingerprint"]}  # the same, unchanged files: no need to hash them
    mine["fingerprint"] = source_fingerprint(Path(src.origin)) if origin else \
        hashlib.sha256(src.source_key.encode()).hexdigest()
    if old and old["fingerprint"] != mine["fingerprint"]:
        was = old.get("origin") or old.get("model") or "another model"
        what = f"{was} as it was before it changed" if was == origin else f"another model ({was})"
        raise UserError(f"{folder}: already holds the artifacts of {what}, not of {origin or src.name}; "
                        f"compile this one into its own folder with model.name=NAME or out_dir=DIR (or delete "
                        f"{folder} to replace the old model's artifacts)")
    return mine


def record_source(folder: Path, identity: dict[str, str]) -> None:
    """Write `source.json` (the folder's model) when it is new or changed."""
    text = json.dumps(identity, indent=1) + "\n"
    try:
        if (folder / IDENTITY_FILE).read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(folder / IDENTITY_FILE, text)


def write_error(e: OSError, where: Path) -> UserError:
    """An OS error while writing artifacts as one line: what, where, what to do."""
    place = e.filename or where
    hint = {
        errno.ENOSPC: "no space left on the device; free some space or set out_dir= to a folder on another disk",
        errno.EDQUOT: "disk quota exceeded; free some space or set out_dir= to a folder on another disk",
        errno.EROFS: "read-only filesystem; set out_dir= to a writable folder",
        errno.EACCES: "permission denied; set out_dir= to a folder you can write",
        errno.EPERM: "operation not permitted; set out_dir= to a folder you can write",
        errno.ENOTDIR: "a file is in the way of a folder; set out_dir= to a folder (or move the file away)",
        errno.EEXIST: "a file is in the way of a folder; set out_dir= to a folder (or move the file away)",
    }.get(e.errno or 0, f"{e.strerror or e}; check out_dir=")
    return UserError(f"{place}: cannot write the artifacts: {hint} (no partial file was left; existing artifacts "
                     "are untouched)")


def _existing_sha(path: Path, layout: WeightsLayout) -> tuple[str | None, str]:
    """(the data sha256 of an existing weights file, "") if it is exactly what this compile would write: its
    header equals this layout's (which names the source and every tensor's format, shape and offset) and its
    data hashes to the sha256 that header carries. Else (None, why not)."""
    if not path.exists():
        return None, ""
    if path.stat().st_size != layout.file_size:
        return None, "its size does not match this model's layout"
    try:
        st = SafetensorsFile(path)
    except UserError:
        return None, "it is not a readable safetensors file"
    try:
        sha = st.metadata.get("edge_rt_data_sha256", "")
        with open(path, "rb") as f:
            head = f.read(layout.data_start)
    finally:
        st.close()
    if len(sha) != 64 or head.replace(sha.encode(), SHA_PLACEHOLDER.encode(), 1) != layout.header:
        return None, "it was written for another version of the source, layout or formats"
    if _file_sha(path, layout.data_start) != sha:
        return None, "its data does not match the sha256 in its header (the file is corrupted)"
    return sha, ""


def _hold_for_tests() -> None:
    """The `HOLD_ENV` test hook (see there)."""
    flag = os.environ.get(HOLD_ENV)
    if flag:
        Path(flag).write_text(str(os.getpid()))
        time.sleep(60)


def write_weights(path: Path, g: nx.DiGraph, layout: WeightsLayout) -> tuple[str, bool]:
    """(data sha256, reused). The caller holds `locked(path.parent)`. An existing file is reused only when it is
    proven equal to what this compile would write (`_existing_sha`); else it is rewritten, atomically. Each weight
    is written as `Weight.stored()` gives it: raw source rows when they are already in its format, else
    quantized. The header carries the sha256 of the data section, so a reader can match a plan to its weights
    without hashing hundreds of MB."""
    sha, why = _existing_sha(path, layout)
    if sha is not None:
        return sha, True
    if why:
        print(f"{path}: {why}; rewriting it", file=sys.stderr, flush=True)
    weights = g.graph["weights"]
    total = sum(layout.weights[n].nbytes for n in layout.order)
    print(f"writing {path.name} ({total / 2**20:.1f} MB, {len(layout.order)} tensors)", file=sys.stderr,
          flush=True)
    with atomic_file(path) as f, _progress(total, path.name) as bar:
        f.write(layout.header)
        h = hashlib.sha256()
        pos = layout.data_start
        for i, name in enumerate(layout.order):
            loc = layout.weights[name]
            if loc.offset > pos:
                pad = b"\0" * (loc.offset - pos)
                f.write(pad)
                h.update(pad)
            b = weights[name].stored().tobytes()
            if len(b) != loc.nbytes:
                raise UserError(f"{weights[name].data.source}: {len(b)} bytes as {loc.format}, {loc.nbytes} "
                                "expected")
            f.write(b)
            h.update(b)
            bar.update(len(b))
            pos = loc.offset + loc.nbytes
            if i == len(layout.order) // 2:
                _hold_for_tests()
        sha = h.hexdigest()
        f.seek(0)
        f.write(layout.header.replace(SHA_PLACEHOLDER.encode(), sha.encode(), 1))
    return sha, False


@contextmanager
def _progress(total: int, what: str) -> Iterator[Any]:
    """A byte progress bar on a terminal (tqdm; nothing when stderr is not a terminal, as in CI and tests)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the compile extra brings it; without it, the one line above is all
        class _Null:
            def update(self, n: int) -> None:
                pass
        yield _Null()
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=None,
              leave=False, file=sys.stderr) as bar:
        yield bar


def write_companions(folder: Path, src: ModelSource, generation: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json and generation.json beside the plan."""
    files = {}
    if src.tokenizer_json is not None:
        atomic_write(folder / "tokenizer.json", src.tokenizer_json)
        files["tokenizer"] = "tokenizer.json"
    atomic_write(folder / "generation.json", json.dumps(generation, indent=1, ensure_ascii=False) + "\n")
    files["generation"] = "generation.json"
    return files


def write_plan(path: Path, plan: Plan) -> None:
    """The plan JSON, atomically."""
    atomic_write(path, plan_json(plan))


def plan_json(plan: Plan) -> str:
    """`plan.to_json()`, byte for byte (`json.dumps(asdict(plan), indent=1)` without `path`), written by one walk
    over the plan: `asdict` deep-copies every value and json's indented encoder is pure Python, together a fifth
    of the compile of a 100k-op graph. tests/test_plan_json.py holds the two equal."""
    out: list[str] = []
    _json_value({f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "path"}, "\n", out)
    out.append("\n")
    return "".join(out)


def _json_value(v: Any, nl: str, out: list[str]) -> None:
    """Append `v` as `json.dumps(v, indent=1)` writes it at the nesting level whose line break is `nl`
    ("\\n" + one space per level); dataclasses are written as `asdict` would make them."""
    if isinstance(v, str):
        out.append(_json_str(v))
    elif v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, int):
        out.append(int.__repr__(v))
    elif isinstance(v, float):
        out.append(_json_float(v))
    elif isinstance(v, (list, tuple)):
        if not v:
            out.append("[]")
            return
        inner = nl + " "
        sep = "[" + inner
        for x in v:
            enc = _SCALARS.get(type(x))
            if enc is not None:
                out.append(sep + enc(x))
            else:
                out.append(sep)
                _json_value(x, inner, out)
            sep = "," + inner
        out.append(nl + "]")
    elif isinstance(v, dict) or is_dataclass(v):
        if isinstance(v, dict):
            items: Any = v.items()
        else:
            names, values = _fields_of(type(v))
            items = zip(names, values(v))
        inner = nl + " "
        sep = "{" + inner
        for k, x in items:
            key = _json_str(k) if type(k) is str else _json_key(k)
            enc = _SCALARS.get(type(x))
            if enc is not None:
                out.append(sep + key + ": " + enc(x))
            else:
                out.append(sep + key + ": ")
                _json_value(x, inner, out)
            sep = "," + inner
        out.append("{}" if sep[0] == "{" else nl + "}")
    else:
        raise TypeError(f"Object of type {type(v).__name__} is not JSON serializable")


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    """A dataclass's field names, and a function giving an instance's values of them (in that order)."""
    names = tuple(f.name for f in fields(cls))
    if len(names) < 2:  # (attrgetter of one name returns the value itself, not a 1-tuple)
        return names, lambda v: tuple(getattr(v, k) for k in names)
    return names, operator.attrgetter(*names)


_json_str = json.encoder.encode_basestring_ascii  # json.dumps' own (C) string encoder, ensure_ascii=True


def _json_float(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return float.__repr__(v)


#: Encoders of the scalar types by exact type (subclasses take the general path, as json treats them).
_SCALARS: dict[type, Callable[[Any], str]] = {
    str: _json_str, int: int.__repr__, float: _json_float, bool: lambda b: "true" if b else "false",
    type(None): lambda _: "null",
}


def _json_key(k: Any) -> str:
    """A dict key as json.dumps writes it (keys are strings in JSON)."""
    if isinstance(k, str):
        return _json_str(k)
    if isinstance(k, float):
        return _json_str(_json_float(k))
    if k is True or k is False or k is None:
        return _json_str({True: "true", False: "false", None: "null"}[k])
    if isinstance(k, int):
        return _json_str(int.__repr__(k))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")
