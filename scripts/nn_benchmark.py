"""Forward and forward+backward time and peak memory of AgentSelfAttention against full SDPA
self-attention (same projections), at growing sequence lengths.

    python scripts/nn_benchmark.py            # 4k, 16k, 65k tokens; dim 512, 8 heads, 256 agents, bf16
Without CUDA it runs tiny sizes on the CPU, only to check that the script works.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from agentsd.nn import AgentSelfAttention
from timing import median_ms


class FullSelfAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--agents", type=int, default=256)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="outputs/nn")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:
        args.lengths, args.reps, args.dim, args.agents = [256, 1024], 2, 64, 16
    layers = {
        "full SDPA": FullSelfAttention(args.dim),
        "agent (talking heads, gate)": AgentSelfAttention(args.dim, num_agent_tokens=args.agents),
        "agent (plain)": AgentSelfAttention(args.dim, num_agent_tokens=args.agents, talking_heads=False, gate=False),
    }
    rows = []
    for length in args.lengths:
        x = torch.randn(1, length, args.dim, device=device, dtype=dtype, requires_grad=True)
        for name, layer in layers.items():
            layer = layer.to(device, dtype)
            forward = lambda: layer(x)  # noqa: E731
            backward = lambda: layer(x).sum().backward()  # noqa: E731
            with torch.no_grad():
                forward_ms = median_ms(forward, args.reps)
            train_ms = median_ms(backward, args.reps)
            peak = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                backward()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            rows.append(dict(tokens=length, layer=name, forward_ms=forward_ms, train_ms=train_ms, peak_gb=peak))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke test)"
    lines = [f"Measured on {name}, torch {torch.__version__}, {datetime.date.today()}, {dtype}, batch 1, dim {args.dim}, "
             f"8 heads of 64, {args.agents} agents.", "",
             "| tokens | layer | forward ms | forward+backward ms | peak GB (fwd+bwd) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "n/a"
        lines.append(f"| {r['tokens']} | {r['layer']} | {r['forward_ms']:.2f} | {r['train_ms']:.2f} | {peak} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nn.md").write_text("\n".join(lines) + "\n")
    (out / "nn.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
