"""`python -m foedus.director`: the same as the `director` command."""

import sys

from foedus.director.cli import main

sys.exit(main())
