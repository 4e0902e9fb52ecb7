"""`python -m qgpt_code.evals ...` is `qgpt eval ...`."""

from qgpt_code.evals.cli import main

raise SystemExit(main())
