"""`python -m ftdist`: the same CLI as the `ftdist` command."""

from ftdist.cli import main

raise SystemExit(main())
