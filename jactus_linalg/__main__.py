"""``python -m jactus_linalg``: the ``jactus`` command line (see :mod:`jactus_linalg.cli`)."""

from jactus_linalg.cli import main

raise SystemExit(main())
