"""Why a different preamble changes a reused document's K/V: where the document's tokens attend, per layer.

For two requests of an interior workload (the same document after two different one-line system prompts):
(a) the attention mass that the document's queries put on position 0, on the rest of the preamble (and on
its single heaviest token), and on the document itself, per layer, in each request; (b) how far the
document's values in request 1 are from the values request 0 computed for the same tokens (the K/V chunk
reuse would take), relative to their norm, by offset in the document. No timing: deterministic numbers.

    python benchmarks/interior_sinks.py [--workload interior-records-500] [--out benchmarks/recorded/reuse-interior-sinks]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvbench.models import load_model
from kvbench.workloads import WorkloadSpec, build_requests, for_model
from kvbench.workloads.request import common_prefix

BUCKETS = ((0, 4), (4, 32), (32, 256), (256, None))  # offsets in the document


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="interior-records-500")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/recorded/reuse-interior-sinks"))
    args = parser.parse_args()
    lm = load_model("smollm2-135m", "cpu", "float32")
    tok = for_model(lm)
    requests = build_requests(WorkloadSpec(kind=f"reuse:{args.workload}"), 2, tok, form="ids")
    lm.model.config._attn_implementation = "eager"  # attention weights need the eager kernel
    lines, rows, runs = [], [], []
    for r in requests:
        preamble = len(tok.encode(tok.decode(r.ids).split("\n\n", 1)[0] + "\n\n", add_special_tokens=False))
        out = lm.model(torch.tensor([r.ids]), output_attentions=True, use_cache=True)
        runs.append((r.ids, preamble, out))
        heaviest = []
        for layer, weights in enumerate(out.attentions):
            mass = weights[0][:, preamble + 64:len(r.ids) - 30].mean((0, 1))  # document queries, mean over heads
            top = int(mass[1:preamble].argmax()) + 1
            heaviest.append(top)
            rows.append({"request": r.index, "layer": layer, "position_0": mass[0].item(),
                         "preamble_rest": mass[1:preamble].sum().item(), "heaviest_preamble_token":
                         tok.decode([r.ids[top]]), "heaviest_position": top, "heaviest_mass": mass[top].item(),
                         "document": mass[preamble:].sum().item()})
        lines.append(f"request {r.index}: preamble {preamble} tokens: {tok.decode(r.ids[:preamble])!r}")
    lines += ["", "| layer | request | position 0 | rest of preamble | heaviest preamble token (mass) | document |",
              "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["layer"], x["request"])):
        lines.append(f"| {row['layer']} | {row['request']} | {row['position_0']:.3f} | {row['preamble_rest']:.3f} | "
                     f"{row['heaviest_preamble_token']!r} at {row['heaviest_position']} ({row['heaviest_mass']:.3f}) | "
                     f"{row['document']:.3f} |")
    (ids0, pre0, out0), (ids1, pre1, out1) = runs
    doc = common_prefix(ids0[pre0:], ids1[pre1:])  # the document (the questions differ after it)
    lines += ["", "Relative deviation of the document's values, request 1 against request 0 (mean over heads and tokens):",
              "", "| layer | " + " | ".join(f"offset {a}-{b or doc}" for a, b in BUCKETS) + " |",
              "|---|" + "---|" * len(BUCKETS)]
    deviation = []
    for layer in range(lm.config.num_hidden_layers):
        v0 = out0.past_key_values.layers[layer].values[0, :, pre0:pre0 + doc]
        v1 = out1.past_key_values.layers[layer].values[0, :, pre1:pre1 + doc]
        rel = ((v1 - v0).norm(dim=-1) / v1.norm(dim=-1)).mean(0)
        buckets = [rel[a:b].mean().item() for a, b in BUCKETS]
        deviation.append({"layer": layer, **{f"{a}-{b or doc}": x for (a, b), x in zip(BUCKETS, buckets)}})
        lines.append(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in buckets) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sinks.md").write_text(f"# {args.workload}: attention sinks and value deviation\n\n" + "\n".join(lines) + "\n")
    (args.out / "sinks.json").write_text(json.dumps({"workload": args.workload, "attention": rows,
                                                     "value_deviation": deviation}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
