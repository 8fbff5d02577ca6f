"""Vision transformers: the pullback's cost against the plain gradient, and how alike they are.

    python benchmarks/vit.py [--model vit_tiny_patch16_224] [--repeats 7] [--threads 1]
                             [--out benchmarks/results/vit.md]

timm's model with random weights (no download), at 224 px, on the CPU. Costs are medians of
``--repeats`` timings, the operations interleaved so that machine noise hits them alike; the
ratios, not the seconds, are what to compare. Similarity: over the packaged sample photos, the
cosine between the pullback and the plain gradient of the predicted class, and the Pearson
correlation of their per-pixel magnitudes (|.| summed over RGB), per rule and temperature.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import timm
import torch
from speed import _timed, plain_gradient

import pullback_widgets as pw

RULES = ("detached", "differentiated")


def costs(model, x, repeats: int) -> dict[str, float]:
    """Median seconds per operation on ``x`` (1, 3, 224, 224)."""
    session = pw.PullbackSession(model, x)
    operations = {
        "gradient": lambda: plain_gradient(model, x, 1),
        **{f"pullback {rule}": (lambda rule=rule: pw.excitation_pullback(
            model, x, 1, attention_weights=rule)) for rule in RULES},
        "session update": lambda: session.pullback(1, temperature={"attention": 1.01}),
    }
    for fn in operations.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(repeats):
        for name, fn in operations.items():
            times[name].append(_timed(fn, "cpu")[0])  # wall-clock seconds
    return {name: statistics.median(ts) for name, ts in times.items()}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def similarity(model, images: torch.Tensor, temperatures) -> list[tuple[str, str, float, float]]:
    """(rule, T, mean cosine, mean magnitude correlation) over ``images`` (N, 3, H, W)."""
    gradients = [plain_gradient(model, image[None], int(model(image[None]).argmax()))
                 for image in images]
    rows = []
    for rule in RULES:
        sessions = [pw.PullbackSession(model, image[None], attention_weights=rule)
                    for image in images]
        for temperature in temperatures:
            cosines, correlations = [], []
            for session, gradient in zip(sessions, gradients):
                target = int(session.logits.argmax())
                pullback = session.pullback(target, temperature=temperature)
                cosines.append(float(torch.nn.functional.cosine_similarity(
                    pullback.flatten(), gradient.flatten(), dim=0)))
                correlations.append(_pearson(pullback.abs().sum(1), gradient.abs().sum(1)))
            label = "model defaults" if temperature is None else f"{temperature:g}"
            rows.append((rule, label, statistics.mean(cosines), statistics.mean(correlations)))
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.cat([pw.sample_image(name) for name in pw.SAMPLE_IMAGES])
    t = costs(model, images[:1], args.repeats)
    lines = [
        f"{args.model}, random weights, 224 px, batch 1, CPU, {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved repeats.",
        "",
        "| gradient (ms) | pullback detached ÷ gradient | pullback differentiated ÷ gradient "
        "| session update ÷ gradient |",
        "|---|---|---|---|",
        f"| {t['gradient'] * 1e3:.0f} | {t['pullback detached'] / t['gradient']:.2f} | "
        f"{t['pullback differentiated'] / t['gradient']:.2f} | "
        f"{t['session update'] / t['gradient']:.2f} |",
        "",
        f"Pullback against the plain gradient of the predicted class, mean over the "
        f"{len(images)} sample photos (every kind at T, or the model defaults: GELU 1.0, "
        "attention 1.0):",
        "",
        "| attention rule | T | cosine | magnitude correlation |",
        "|---|---|---|---|",
    ]
    for rule, label, cosine, correlation in similarity(model, images, (None, 0.3, 3.0)):
        lines.append(f"| {rule} | {label} | {cosine:.3f} | {correlation:.3f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
