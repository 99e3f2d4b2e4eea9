"""``python -m streamcheck`` runs the ``streamcheck`` command line."""

from streamcheck.cli import main

raise SystemExit(main())
