#!/usr/bin/env bash
# `make demo`, `make demo-torch` and their twins: one aggregator and the plan's collaborators on
# this host over mutual TLS, each a process of VENV's foedus; the collaborators' logs in FOLDER.
# Exits with the first failure's status, and stops the others when the aggregator fails. Sites
# that trained with DP-SGD (`make demo-dp`): the epsilon each has spent, from metrics.jsonl.
# Usage: plans/demo.sh VENV PLAN FOLDER NAME (NAME: the make target, for the failure line)
set -u
venv=$1 plan=$2 folder=$3 name=$4
rm -rf "$folder/output"
mkdir -p "$folder"
names=$("$venv/bin/python" -c 'import sys; from foedus.plans import load_plan; print(*load_plan(sys.argv[1]).collaborators)' "$plan") || exit 2
"$venv/bin/aggregator" start --plan "$plan" --log-level warning & agg=$!
pids=""
for collaborator in $names; do
  "$venv/bin/collaborator" start -n "$collaborator" --plan "$plan" --log-level warning 2>"$folder/$collaborator.log" &
  pids="$pids $!"
done
trap 'kill $agg $pids 2>/dev/null' INT TERM EXIT
status=0
wait $agg || status=$?
if [ $status -ne 0 ]; then kill $pids 2>/dev/null; fi
for pid in $pids; do
  wait $pid || { code=$?; [ $status -ne 0 ] || status=$code; }
done
trap - INT TERM EXIT
if [ $status -ne 0 ]; then echo "$name: a process failed (exit $status); logs in $folder/"; fi
if [ $status -eq 0 ]; then
  "$venv/bin/python" - "$plan" <<'EOF' || status=$?
import sys
from foedus.history.rows import read_rows
from foedus.plans import load_plan
from foedus.privacy.site_budget import SiteBudget

plan = load_plan(sys.argv[1])
spent = {}  # each site's budget after its last training round (DP-SGD at the site)
for row in read_rows(plan.aggregator.output_dir / "metrics.jsonl"):
    for site, tasks in row.sites.items():
        budget = SiteBudget.from_metrics(tasks.get("train", {}))
        if budget is not None:
            spent[site] = budget
for site, budget in sorted(spent.items()):
    print(f"{site}: this site's privacy budget (DP-SGD): {budget.text()}")
EOF
fi
exit $status
