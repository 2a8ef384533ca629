"""`python -m triolytics` is the `triolytics` command."""

from triolytics.cli import main

raise SystemExit(main())
