"""The plan: the contract between the compiler and the executor.

A plan is pure data (JSON): no code, no pickles. The executor owns this schema and its reader; the compiler
imports it to write plans. Every field is checked on load; every byte range is bounded by the sizes the plan
declares, and the weights' ranges by the real file size (in `weights.py`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UserError

PLAN_FORMAT = "edge-rt-plan"
SCHEMA_VERSION = 3  #: 3: streamed groups carry a checksum of their bytes (`Group.checksum`)
PLAN_SUFFIX = ".plan.json"
ALIGNMENT = 64
#: In an op's `inputs`, a name starting with this refers to a weight (a key of `Plan.weights`), not a buffer.
WEIGHT_REF = "@"


@dataclass
class Buffer:
    """A region of the arena. `shape` is the planned maximum (activations are planned for the largest shape
    any run may give them; a run views the first elements with its own shape)."""

    name: str
    kind: str  #: "slot" | "state" (KV cache) | "const" (inline constants) | "input" | "activation" | "scratch"
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]
    first: int = -1  #: first op index that uses it (-1: lives for the whole run)
    last: int = -1  #: last op index that uses it


@dataclass
class Op:
    """One step of the schedule: an op of the executor's registry (`edge_rt_exec.ops`)."""

    index: int
    op: str  #: op name in the registry ("Linear", "LayerNormalization", "CausalAttention", ...)
    name: str
    unit: int
    group: int
    inputs: list[str]  #: positional: a buffer name, WEIGHT_REF + weight name, or "" for an absent input
    outputs: list[str]  #: positional: a buffer name, or "" for an absent optional output
    attrs: dict[str, Any] = field(default_factory=dict)
    scratch: list[str] = field(default_factory=list)  #: op-local scratch buffers, in the op's order

    def weight_inputs(self) -> list[tuple[int, str]]:
        """(position, weight name) of every input that is a weight."""
        return [(i, t[1:]) for i, t in enumerate(self.inputs) if t.startswith(WEIGHT_REF)]

    def buffer_inputs(self) -> list[str]:
        return [t for t in self.inputs if t and not t.startswith(WEIGHT_REF)]


@dataclass
class Group:
    """Consecutive ops whose weights are read (streamed) or mapped (resident) together."""

    index: int
    units: list[str]
    op_start: int
    op_end: int  #: exclusive
    byte_start: int  #: absolute range in the weights file covering the group's slot-loaded weights
    byte_end: int
    slot: int | None  #: weight slot the group is read into; None when resident or weightless
    flops_per_token: int = 0
    #: checksum of bytes [byte_start, byte_end) (`edge_rt_exec.checksum`: 32 hex digits), checked after every
    #: read of the group into its slot; None when the group is not read into a slot
    checksum: str | None = None


@dataclass
class WeightInfo:
    """A weight tensor in the weights file (absolute offsets) and the format its bytes are in."""

    offset: int
    nbytes: int
    format: str  #: a key of `edge_rt_exec.formats.FORMATS` ("f32", "f16", "q8_0", "q4_0", "q4_1")
    shape: list[int]  #: logical shape (a linear weight is `[out, in]` whatever its format)
    gather: bool = False  #: only rows are gathered from it (embedding tables): never loaded into a slot


@dataclass
class Plan:
    format: str
    schema_version: int
    byte_order: str
    compiler_version: str
    #: name, family, kind ("decoder" | "encoder" | "graph"), config (the family's; {} for graphs), origin
    model: dict[str, Any]
    #: the graph's interface: `inputs` [{name, dtype, dims}] (dims: ints or symbol names), `outputs`
    #: [{name, dtype}], `bounds` {symbol: maximum}, `constants` {name: {dtype, shape, data}} (small inline
    #: values copied into their "const" buffers at load), `io` {role: buffer} (roles: ids, positions, type_ids,
    #: mask, logits, embeddings) and `kv` {mode: "cache" | "past_present" | "none", pairs: [[past, present]]}
    graph: dict[str, Any]
    files: dict[str, Any]  #: weights, weights_sha256, weights_size, tokenizer, generation
    target: dict[str, Any]
    strategy: str
    requested_strategy: str
    budget: int
    max_context: int
    max_batch_tokens: int
    quant: str  #: the compile's quant= setting ("keep", "f32", "q4_1", ...)
    kv_dtype: str  #: "float32" | "float16"
    weights_mode: str  #: "resident" | "streamed"
    alignment: int
    weights: dict[str, WeightInfo]
    groups: list[Group]
    schedule: list[Op]
    buffers: dict[str, Buffer]
    arena: dict[str, Any]  #: size, slots, state, activations (size, lower_bound, algorithm), reserve
    predicted: dict[str, Any]
    path: Path | None = None  #: where it was loaded from (not serialised)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @property
    def folder(self) -> Path:
        assert self.path is not None
        return self.path.parent

    def file(self, key: str) -> Path:
        """A companion file of the plan (weights, tokenizer, generation): a plain name inside the plan's folder
        (no path separators, no `..`, not a symlink that leads out of the folder)."""
        name = self.files.get(key)
        where = self.path or "plan"
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name:
            raise UserError(f"{where}: files.{key} = {name!r} is not a file name inside the artifact folder; the "
                            "plan is corrupt, recompile it")
        p = self.folder / name
        if p.is_symlink() and p.resolve().parent != self.folder.resolve():
            raise UserError(f"{p}: a symlink that leads out of the artifact folder; refusing it")
        return p

    def weight_formats(self) -> dict[str, int]:
        """Bytes per weight format ({"q4_1": ..., "f32": ...}), for messages and names."""
        out: dict[str, int] = {}
        for w in self.weights.values():
            out[w.format] = out.get(w.format, 0) + w.nbytes
        return out


_REQUIRED = {
    "format": str, "schema_version": int, "byte_order": str, "compiler_version": str, "model": dict,
    "graph": dict, "files": dict, "target": dict, "strategy": str, "requested_strategy": str, "budget": int,
    "max_context": int, "max_batch_tokens": int, "quant": str, "kv_dtype": str, "weights_mode": str,
    "alignment": int, "weights": dict, "groups": list, "schedule": list, "buffers": dict, "arena": dict,
    "predicted": dict,
}


def _typed(where: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object")
    try:
        return cls(**raw)
    except TypeError as e:
        raise UserError(f"{where}: {e}; the plan is corrupt or from another edge-rt version") from None


def plan_from_dict(raw: Any, where: str) -> Plan:
    """Build a `Plan` from parsed JSON, checking every field (no code runs, whatever the file holds)."""
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise UserError(f"{where}: not an edge-rt plan (no \"format\": \"{PLAN_FORMAT}\"); "
                        "pass a *.plan.json written by edge-rt-compile")
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise UserError(f"{where}: plan schema version {version} is newer than this executor supports "
                        f"({SCHEMA_VERSION}); upgrade edge-rt on the device or recompile with a matching compiler")
    if version < SCHEMA_VERSION:
        raise UserError(f"{where}: plan schema version {version} is older than this executor's "
                        f"({SCHEMA_VERSION}); recompile the plan with edge-rt-compile")
    for key, typ in _REQUIRED.items():
        if not isinstance(raw.get(key), typ) or (typ is int and isinstance(raw.get(key), bool)):
            raise UserError(f"{where}: field '{key}' is missing or not a {typ.__name__}; the plan is corrupt")
    if raw["byte_order"] != "little" or sys.byteorder != "little":
        raise UserError(f"{where}: plan byte order is {raw['byte_order']!r} but this machine is "
                        f"{sys.byteorder}-endian; edge-rt supports little-endian devices only")
    fields = dict(raw)
    fields["weights"] = {k: _typed(f"{where}: weight {k}", WeightInfo, v) for k, v in raw["weights"].items()}
    fields["groups"] = [_typed(f"{where}: group {i}", Group, g) for i, g in enumerate(raw["groups"])]
    fields["schedule"] = [_typed(f"{where}: op {i}", Op, o) for i, o in enumerate(raw["schedule"])]
    fields["buffers"] = {k: _typed(f"{where}: buffer {k}", Buffer, v) for k, v in raw["buffers"].items()}
    plan = _typed(where, Plan, fields)
    from .plan_check import check_plan

    check_plan(plan, where)
    return plan


def resolve_plan_path(path: str | Path) -> Path:
    """A plan file, or a folder holding exactly one plan."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(f"*{PLAN_SUFFIX}"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise UserError(f"{p}: no *{PLAN_SUFFIX} in this folder; compile one with edge-rt-compile")
        names = ", ".join(f.name for f in found[:8]) + (" ..." if len(found) > 8 else "")
        raise UserError(f"{p}: {len(found)} plans in this folder ({names}); pass one plan file")
    if not p.exists():
        raise UserError(f"{p}: plan not found; pass a *{PLAN_SUFFIX} file or its folder")
    return p


#: Largest plan file read (an ONNX plan carries its small constants inline; SmolLM2's is ~0.5 MB).
MAX_PLAN_BYTES = 256 << 20


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice in one object")
        d[k] = v
    return d


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a FIFO or device would block or never end)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open the {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: the {what} is not a regular file")
        if st.st_size > limit:
            raise UserError(f"{path}: the {what} has {st.st_size} bytes, more than the {limit} accepted")
        chunks, total = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            total += len(b)
            if total > limit:
                raise UserError(f"{path}: the {what} is larger than the {limit} bytes accepted")
            chunks.append(b)
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)


def parse_json(data: bytes, where: str, what: str) -> Any:
    """JSON with duplicate keys refused and nesting bounded (Python's parser recurses)."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{where}: the {what} is not valid JSON ({e.__class__.__name__}: {str(e)[:200]})") from None


def load_plan(path: str | Path) -> Plan:
    """Read and verify a plan (schema version, byte order, every reference, range and lifetime)."""
    p = resolve_plan_path(path)
    raw = parse_json(read_regular(p, MAX_PLAN_BYTES, "plan"), str(p), "plan")
    plan = plan_from_dict(raw, str(p))
    plan.path = p
    return plan


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file object whose content appears at `path` only when the block ends without error: written to a
    temporary name in the same folder, fsynced, then renamed over `path` (STYLE.md #10). On any error or
    Ctrl-C the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # artifacts are copied to devices; mkstemp's 0600 would surprise
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
