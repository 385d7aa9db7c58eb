"""`python -m vitkit ...` (also what torchrun launches)."""

import sys

from vitkit.cli.main import main

sys.exit(main())
