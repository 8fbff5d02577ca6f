"""``python -m pullback_widgets``: the ``pullback-widgets`` command."""

import sys

from .cli import main

sys.exit(main())
