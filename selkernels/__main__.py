"""``python -m selkernels bench|demo``."""

from .cli import main

raise SystemExit(main())
