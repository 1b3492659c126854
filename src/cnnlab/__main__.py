"""`python -m cnnlab ...` runs the CLI (also what `torchrun -m cnnlab` launches)."""

import sys

from .cli import main

sys.exit(main())
