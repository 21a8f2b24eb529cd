"""opero's benchmark, run from a checkout: a thin entry point over ``python -m opero bench``.

Every case lives in the package, in :mod:`opero._bench` (one module per group),
so there is one harness: this script forwards its arguments, and
``python benches/run.py --quick --only cache_hit`` is exactly
``python -m opero bench --quick --only cache_hit``. ``--help`` lists the groups.
"""

from __future__ import annotations

import sys

from opero.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
