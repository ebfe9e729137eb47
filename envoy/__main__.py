"""`python -m envoy`: the envoy command."""

import sys

from envoy.cli import main

sys.exit(main())
