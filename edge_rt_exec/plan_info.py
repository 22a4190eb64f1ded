"""`edge-rt-exec inspect`: a plan's groups, arena layout and predicted cost, as text or data."""

from __future__ import annotations

from typing import Any

from .plan import Plan

MB = 1024 * 1024


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def describe(plan: Plan, verify: bool = False) -> dict[str, Any]:
    a = plan.arena
    acts = a["activations"]
    data: dict[str, Any] = {
        "plan": str(plan.path), "model": plan.model["name"], "family": plan.model["family"],
        "strategy": plan.strategy, "requested_strategy": plan.requested_strategy, "budget": plan.budget,
        "max_context": plan.max_context, "max_batch_tokens": plan.max_batch_tokens,
        "weights_mode": plan.weights_mode, "weights_size": plan.files.get("weights_size"),
        "quant": plan.quant, "kv_dtype": plan.kv_dtype, "weight_formats": plan.weight_formats(),
        "inputs": plan.graph.get("inputs", []), "outputs": plan.graph.get("outputs", []),
        "arena": {"size": a["size"], "slots": a["slots"], "state": a["state"], "activations": acts,
                  "reserve": a.get("reserve"), "resident_weights": a.get("resident_weights")},
        "groups": [{"index": g.index, "units": g.units, "ops": g.op_end - g.op_start,
                    "bytes": g.byte_end - g.byte_start, "streamed": g.slot is not None} for g in plan.groups],
        "predicted": plan.predicted, "target": plan.target, "compiler_version": plan.compiler_version,
        "schema_version": plan.schema_version,
    }
    lines = [
        f"plan        {plan.path}",
        f"model       {plan.model['name']} ({plan.model['family']}, {plan.model['kind']}), compiler "
        f"{plan.compiler_version}, schema {plan.schema_version}",
        f"strategy    {plan.strategy}" + (" (auto)" if plan.requested_strategy == "auto" else "")
        + f", weights {plan.weights_mode}, target {plan.target.get('name')} ({plan.target.get('threads')} threads)",
        f"budget      {_mb(plan.budget)}; planned peak {_mb(plan.predicted['peak_bytes'])} = arena {_mb(a['size'])}"
        f" + resident weights {_mb(a.get('resident_weights', 0))} + reserve {_mb(a.get('reserve', 0))}",
        f"context     max_context {plan.max_context}, max_batch_tokens {plan.max_batch_tokens}, KV cache "
        f"{plan.kv_dtype}",
        "weights     " + ", ".join(f"{fmt} {_mb(n)}" for fmt, n in sorted(plan.weight_formats().items()))
        + f" (quant={plan.quant})",
        "inputs      " + ", ".join(f"{i['name']} {i['dtype']} {i['dims']}" for i in plan.graph.get("inputs", [])),
        "outputs     " + ", ".join(f"{o['name']} {o['dtype']}" for o in plan.graph.get("outputs", [])),
        "arena",
    ]
    for i, s in enumerate(a["slots"]):
        lines.append(f"  slot {i}      @{s['offset']:>12}  {_mb(s['nbytes'])}")
    lines.append(f"  state       @{a['state']['offset']:>12}  {_mb(a['state']['size'])} (KV cache, constants)")
    ratio = acts["size"] / acts["lower_bound"] if acts["lower_bound"] else 1.0
    lines.append(f"  activations @{acts['offset']:>12}  {_mb(acts['size'])} ({acts['algorithm']}; "
                 f"{ratio:.3f}x the peak-live lower bound {_mb(acts['lower_bound'])})")
    lines.append(f"groups      {len(plan.groups)}")
    for g in plan.groups:
        units = g.units[0] if len(g.units) == 1 else f"{g.units[0]} .. {g.units[-1]}"
        how = f"{_mb(g.byte_end - g.byte_start)} streamed" if g.slot is not None else "resident/weightless"
        lines.append(f"  {g.index:>3}  ops {g.op_start:>4}-{g.op_end - 1:<4}  {units:<24} {how}")
    pr = plan.predicted
    lines.append(f"predicted   decode {pr['decode_ms_per_token']:.2f} ms/token, prefill {pr['prefill_ms']:.1f} ms for "
                 f"{pr['prefill_tokens']} tokens, {_mb(pr['read_bytes_per_token'])} read per token")
    for note in pr.get("notes", []):
        lines.append(f"            {note}")
    if verify:
        from .checksum import checksum
        from .weights import open_weights, verify_weights_sha

        st = open_weights(plan)
        ok = verify_weights_sha(plan, st)
        bad = [g.index for g in plan.groups if g.slot is not None and g.checksum != checksum(
            st.file.view(g.byte_start, g.byte_end - g.byte_start, "u1", (g.byte_end - g.byte_start,), "group"))]
        st.close()
        data["weights_ok"] = ok
        data["corrupt_groups"] = bad
        lines.append(f"weights     sha256 {'matches' if ok else 'DOES NOT MATCH'} the plan "
                     f"({plan.files.get('weights_sha256', '')[:16]}...)")
        if bad:
            lines.append(f"            streamed groups {bad} do not match their checksums: copy the artifact folder "
                         "again, or recompile")
    return {"data": data, "text": "\n".join(lines)}
