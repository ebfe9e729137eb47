"""`python -m director`: the same as the `director` command."""

import sys

from director.cli import main

sys.exit(main())
