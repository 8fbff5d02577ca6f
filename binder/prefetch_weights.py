"""Download the torchvision weights of the paper's models into torch hub's cache.

Run by ``binder/postBuild``; also useful on any machine that will later be offline::

    python binder/prefetch_weights.py

Never fails the build: a model whose weights cannot be fetched is reported, and notebook 06
falls back to the embedded EfficientNet-Lite0. Exit status is always 0.
"""

from __future__ import annotations

import socket
import sys

PAPER_MODELS = ("resnet50", "vgg11_bn", "densenet121")
# A stalled connection would otherwise block the build until Binder's own timeout.
SOCKET_TIMEOUT_S = 60


def main() -> int:
    from pullback_widgets import load_model
    from pullback_widgets.models import WeightsUnavailableError

    socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    missing = []
    for name in PAPER_MODELS:
        try:
            load_model(name)
        except WeightsUnavailableError as error:
            missing.append(name)
            print(f"prefetch_weights: {name}: {error}", file=sys.stderr)
        else:
            print(f"prefetch_weights: {name}: weights cached")
    if missing:
        print(f"prefetch_weights: could not fetch {', '.join(missing)} (offline?); notebook 06 "
              "will fall back to the embedded efficientnet_lite0. The build goes on.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
