"""`python -m trce.cli ...` (what `accelerate launch -m trce.cli` runs)."""

import sys

from trce.cli import main

sys.exit(main())
