"""Print the ids OpenFL 1.9 derives from a workspace plan, as JSON: run in OpenFL's virtualenv.

    python plan_ids.py plan/plan.yaml    (from the workspace folder)

OpenFL names the federation `<plan file name>_<first 8 hex digits of the plan's SHA-384>` and its
aggregator `aggregator_<federation uuid>`; a foedus plan must carry both to talk to OpenFL peers.
"""

import json
import sys
from pathlib import Path

from openfl.federated import Plan

plan = Plan.parse(plan_config_path=Path(sys.argv[1]).absolute())
print(
    json.dumps({"federation_uuid": plan.federation_uuid, "aggregator_uuid": plan.aggregator_uuid})
)
