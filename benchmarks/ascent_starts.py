"""Hidden-unit ascent from grey and noise on EfficientNet-Lite0: which eps and steps show
structure, and the time per step.

For units in an early block (blocks.1) and a late one (blocks.5), from grey and from noise,
pullback ascent and gradient ascent, over a few (steps, step size, eps) settings, it reports:
the unit's activation gain (final minus start; its spatial mean), the RMS change per pixel,
and the high-frequency fraction of the change (its energy left after subtracting a 5x5 box
blur, over its whole energy: near 1 is pixel noise, lower is structure at the scale of
objects). It writes the final frames to benchmarks/results/ascent_starts/ (not tracked) to
look at; benchmarks/results/ascent_starts.md holds a run's table and what the frames showed.

    python benchmarks/ascent_starts.py            # about 7 minutes on two heavily loaded CPU cores
"""

from __future__ import annotations

import itertools
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pullback_widgets as pw
from pullback_widgets.ascent import ascent_start

# Two units (an early and a late block), two settings: the paper's (5, 10, 50) and one with
# room to grow from a blank start (10, 20, 200). The machine this ran on is shared: keep it short.
UNITS = [("blocks.1", 3), ("blocks.5", 40)]
SETTINGS = [(5, 10.0, 50.0), (10, 20.0, 200.0)]
OUT = pathlib.Path(__file__).parent / "results" / "ascent_starts"


def high_frequency_fraction(diff: torch.Tensor) -> float:
    blurred = F.avg_pool2d(diff, 5, stride=1, padding=2, count_include_pad=False)
    return float(((diff - blurred) ** 2).sum() / (diff ** 2).sum().clamp_min(1e-30))


def main() -> None:
    torch.set_num_threads(2)
    model = pw.load_model("efficientnet_lite0")
    OUT.mkdir(parents=True, exist_ok=True)
    print("| unit | start | method | steps | step | eps | gain | RMS change | HF fraction "
          "| s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (layer, channel), start, (steps, step, eps), method in itertools.product(
            UNITS, ("grey", "noise"), SETTINGS, ("pullback", "gradient")):
        image = ascent_start(start, 224, seed=0)
        began = time.perf_counter()
        result = pw.pullback_ascent(model, image, pw.Unit(layer, channel), steps=steps,
                                    step_size=step, eps=eps, method=method, progress=False)
        per_step = (time.perf_counter() - began) / (steps + 1)
        diff = result.diff
        rms = float(diff.pow(2).mean().sqrt())
        print(f"| {layer} ch {channel} | {start} | {method} | {steps} | {step:g} | {eps:g} | "
              f"{float(result.gain[0]):+.3f} | {rms:.3f} | {high_frequency_fraction(diff):.2f} "
              f"| {per_step:.2f} |", flush=True)
        pixels = (result.images[-1][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(
            OUT / f"{layer}_{channel}_{start}_{method}_{steps}_{step:g}_{eps:g}.png")


if __name__ == "__main__":
    main()
