"""Which temperature should a model default to? Ascent efficiency over a sweep of T.

    python benchmarks/temperature_study.py [--model efficientnet_lite0] [--steps 5]

For every sample photo, pullback ascent towards the predicted class (the paper's settings in
[0, 1] units: 5 steps of 10, eps 50) at each T, and the same loop on plain gradients. Reports
the target-logit gain per photo and its mean; the default T of a model is the one with the
largest mean gain (benchmarks/results/temperature_study.md records the run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pullback_widgets as pw
from pullback_widgets.model_helpers import predict

TEMPERATURES = (0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 10.0)


def study(model_name: str, steps: int, gate: str) -> str:
    model = pw.load_model(model_name)
    images = torch.cat([pw.sample_image(name) for name in pw.SAMPLE_IMAGES])
    targets = predict(model, images).argmax(1)
    rows = [("plain gradient", pw.pullback_ascent(model, images, targets, steps=steps,
                                                  method="gradient", progress=False))]
    for temperature in TEMPERATURES:
        rows.append((f"pullback T={temperature:g}", pw.pullback_ascent(
            model, images, targets, steps=steps, temperature=temperature, gate=gate,
            progress=False)))
        print(rows[-1][0], f"{float(rows[-1][1].gain.mean()):+.2f}", flush=True)
    header = "| method | " + " | ".join(pw.SAMPLE_IMAGES) + " | mean gain | mean final p |"
    lines = [f"Target-logit gain after {steps} steps (step 10, eps 50, [0, 1] units), "
             f"{model_name}, gate {gate}, each photo's predicted class, "
             f"{torch.get_num_threads()} CPU thread(s): the plain gradient's row moves with "
             "the thread count (its hard gates flip on rounding, and five steps of 10 amplify "
             "it).", "", header,
             "|" + "---|" * (len(pw.SAMPLE_IMAGES) + 3)]
    for name, result in rows:
        gains = " | ".join(f"{g:+.2f}" for g in result.gain.tolist())
        lines.append(f"| {name} | {gains} | {float(result.gain.mean()):+.2f} | "
                     f"{float(result.probs[-1].mean()):.2f} |")
    best = max(rows[1:], key=lambda row: float(row[1].gain.mean()))
    lines += ["", f"Largest mean gain: {best[0]}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gate", default="sigmoid")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/temperature_study.md"))
    args = parser.parse_args()
    text = study(args.model, args.steps, args.gate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
