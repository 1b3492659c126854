"""`python -m benchmarks`, run from the repository root: the subcommands of benchmarks.training.
See BENCHMARKS.md for what each one measures."""

import sys

from benchmarks.training import main

sys.exit(main())
