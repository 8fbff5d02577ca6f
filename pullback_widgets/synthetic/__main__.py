"""``python -m pullback_widgets.synthetic train``: here, not in the package's own module, which
pullback_widgets has imported by then (runpy warns before running such a module again)."""

import sys

from . import _main

sys.exit(_main())
