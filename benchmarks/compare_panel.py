"""The PullbackExplorer's panels on EfficientNet-Lite0 and the photo "coffee": the time of one
pullback from a recorded session (what a temperature change costs) and of each Compare
method through the evaluation's adapters (what the panel computes once per image, target and
method), and the time per step of a hidden unit's ascent.

    python benchmarks/compare_panel.py      # median of 3 runs each, after one warm-up
"""

from __future__ import annotations

import statistics
import time

import torch

import pullback_widgets as pw
from pullback_widgets.evaluation.methods import build_method, method_settings
from pullback_widgets.widgets.explorer import COMPARE_METHODS

REPEATS = 3


def median_seconds(run) -> tuple[float, float, float]:
    run()  # warm-up
    times = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    torch.set_num_threads(2)
    model = pw.load_model("efficientnet_lite0")
    image = pw.sample_image("coffee")
    session = pw.PullbackSession(model, image, layers=["blocks.5"])
    target = int(session.logits[0].argmax())
    classes = torch.tensor([target])
    print("| panel | settings | median s | min | max |")
    print("|---|---|---|---|---|")
    rows = [("pullback (recorded session, new T)", "",
             lambda: session.pullback(target, temperature=0.5))]
    for label, name in COMPARE_METHODS.items():
        explain = build_method(name, model)
        rows.append((label, method_settings(name, model),
                     lambda explain=explain: explain(model, image, classes)))
    for label, settings, run in rows:
        median, low, high = median_seconds(run)
        print(f"| {label} | {settings} | {median:.3f} | {low:.3f} | {high:.3f} |", flush=True)
    unit = pw.Unit("blocks.5", 40)
    for start in ("grey", "photo"):
        begin = pw.ascent.ascent_start(start, 224, photo=image)
        median, low, high = median_seconds(lambda begin=begin: pw.pullback_ascent(
            model, begin, unit, steps=3, step_size=20.0, eps=200.0, progress=False))
        # 3 steps are 4 forwards and 3 backwards: the time per step, forward and backward.
        print(f"| hidden-unit ascent from {start}, per step | blocks.5 ch 40, 3 steps | "
              f"{median / 3:.3f} | {low / 3:.3f} | {high / 3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
