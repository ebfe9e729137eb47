"""`python -m foedus.envoy`: the envoy command."""

import sys

from foedus.envoy.cli import main

sys.exit(main())
