"""The zoo at a glance: every head over the encoders known to work, with parameters and GFLOPs.

Models are built on the `meta` device: shapes without memory or compute, so listing the whole
zoo at 512x1024 takes seconds. GFLOPs are torch's count (`FlopCounterMode`), which counts a
multiply-add as two FLOPs: GFLOPs = 2 x GMACs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from fakd_deploy.models.heads import HEADS
from fakd_deploy.models.segmenter import build_model

# timm encoders that build at output strides 8, 16 and 32 (the tests check each).
ENCODERS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet18d",
    "resnet34d",
    "resnet50d",
    "resnet101d",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "resnet10t",
    "mobilenetv3_small_100",
    "mobilenetv3_small_050",
    "lcnet_050",
)


def list_models(
    input_size: tuple[int, int] = (512, 1024),
    heads: Sequence[str] | None = None,
    encoders: Sequence[str] | None = None,
    output_stride: int = 8,
    num_classes: int = 19,
) -> list[dict[str, Any]]:
    """One row per head x encoder, with the default head width and no aux head."""
    rows = []
    for name in heads or HEADS:
        for encoder in encoders or ENCODERS:
            with torch.device("meta"):
                model = build_model(name, num_classes, encoder, output_stride).eval()
                params = sum(p.numel() for p in model.parameters())
                flops = count_flops(model, input_size)
            rows.append(
                {
                    "name": name,
                    "encoder": encoder,
                    "output_stride": output_stride,
                    "input_size": tuple(input_size),
                    "params_m": params / 1e6,
                    "gflops": flops / 1e9,
                }
            )
    return rows


def count_flops(model: torch.nn.Module, input_size: tuple[int, int]) -> int:
    """torch's FLOP count (2 per multiply-add) of one forward pass at batch 1."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *input_size, device=device))
    return counter.get_total_flops()


def models_table(rows: Sequence[dict[str, Any]]) -> Table:
    height, width = rows[0]["input_size"] if rows else (0, 0)
    table = Table(title=f"model zoo ({len(rows)} models)")
    table.add_column("model", no_wrap=True)
    table.add_column("encoder", no_wrap=True)
    table.add_column("OS", justify="right")
    table.add_column("params (M)", justify="right")
    table.add_column(f"GFLOPs @ {height}x{width}\n(torch: 2 x MACs)", justify="right")
    for row in rows:
        table.add_row(
            row["name"],
            row["encoder"],
            str(row["output_stride"]),
            f"{row['params_m']:.2f}",
            f"{row['gflops']:.1f}",
        )
    return table
