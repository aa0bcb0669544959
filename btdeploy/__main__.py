"""`python -m btdeploy`: the CLI where the `btdeploy` script is not installed (a checkout on PYTHONPATH)."""

from btdeploy.cli import main

raise SystemExit(main())
