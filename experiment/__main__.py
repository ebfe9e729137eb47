"""`python -m foedus.experiment`: the same as the `experiment` command."""

import sys

from foedus.experiment.cli import main

sys.exit(main())
