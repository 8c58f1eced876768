"""``python -m flexmask``: the ``flexmask`` command."""

from .cli import main

raise SystemExit(main())
