"""`python -m experiment`: the same as the `experiment` command."""

import sys

from experiment.cli import main

sys.exit(main())
