#!/usr/bin/env bash
# `make demo-service`: foedus as a service on this machine. Certificates from `pki setup
# --director`, a director and three envoys on 127.0.0.1, the digits experiment submitted with
# `experiment submit`, its metrics followed live, the best model downloaded, everything stopped
# (on success, failure or Ctrl-C), and one last line: the final accuracy and the model's path.
# While the experiment runs it prints the director's dashboard's URL and saves a screenshot of it
# taken in headless Chromium (skipped, saying so, where Debian's chromium is missing).
# Outputs (certificates, state, logs, model) under build/service/; run from the repository root.
# PORT_BASE=51000 moves every port it uses (50350-50359) by PORT_BASE - 50000: the director,
# envoy and user configs it runs are copies in build/service/config/ (plans/demo_ports.py).
set -euo pipefail

here=plans/service
out=build/service
config=$out/config
bin=.venv/bin
root=$(pwd -P)
export FOEDUS_EXPERIMENT_CONFIG=$config/ada.yaml

pids=()
leftovers() {
    # The director's aggregators and the envoys' collaborators run in sessions of their own (they
    # survive their parent's kill -9); ours are the ones whose command line names our state.
    local proc command
    for proc in /proc/[0-9]*; do
        command=$(tr '\0' ' ' 2>/dev/null <"$proc/cmdline") || continue
        if [[ $command == *"$root/$out/"* ]]; then echo "${proc#/proc/}"; fi
    done
}
stop_all() {
    local pid tries
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for tries in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # A site held for the screenshot (SIGSTOP) is let go first: a stopped process hears no TERM.
    for pid in $(leftovers); do kill -CONT "$pid" 2>/dev/null || true; done
    for pid in $(leftovers); do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    for tries in $(seq 50); do [ -z "$(leftovers)" ] && break; sleep 0.1; done
    for pid in $(leftovers); do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}
fail() {
    echo "demo-service: $*; logs in $out/" >&2
    exit 1
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

[ -z "$(leftovers)" ] || fail "processes of an earlier run still use $out/ (pids: $(leftovers | xargs))"
rm -rf "$out/director" "$out/envoys" "$out"/*.log "$out/metrics.txt" "$out/best_model.pbuf" \
    "$out/dashboard-token" "$out/dashboard.png" "$config"
mkdir -p "$out/envoys"
$bin/python -m foedus.plans.demo_ports --base "${PORT_BASE:-50000}" --out "$config" \
    $here/director.yaml $here/alice.yaml $here/bob.yaml $here/carol.yaml $here/ada.yaml >/dev/null
read -r director_port dashboard_port < <($bin/python -c '
import sys; from pathlib import Path; from foedus.plans.loader import read_yaml
director = read_yaml(Path(sys.argv[1]))
print(director["listen"]["port"], director["dashboard"]["address"].rpartition(":")[2])' "$config/director.yaml")

$bin/pki setup --director $config/director.yaml

$bin/director start --config $config/director.yaml --log-level warning 2>"$out/director.log" &
pids+=($!)
for site in alice bob carol; do
    $bin/envoy start -n $site --config $config/$site.yaml --log-level warning 2>"$out/envoy-$site.log" &
    pids+=($!)
done

echo "demo-service: a director on 127.0.0.1:$director_port and envoys alice, bob, carol; waiting for them"
online=0
deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
    online=$($bin/experiment --json envoys 2>/dev/null |
        $bin/python -c 'import json, sys; print(sum(e.get("online", False) for e in json.load(sys.stdin).get("envoys", [])))' 2>/dev/null) || online=0
    [ "$online" = 3 ] && break
    sleep 0.5
done
[ "$online" = 3 ] || fail "the three envoys did not come online within 60 s"
$bin/experiment envoys
(umask 077 && $bin/director dashboard-token --config $config/director.yaml ada >"$out/dashboard-token")

# The digits rounds take hundredths of a second each, so the experiment could end before a browser
# has drawn its page: from the second closed round until the screenshot is saved, carol's
# collaborator is held (SIGSTOP). With straggler wait_for_all no round closes without her, and
# once let go (SIGCONT) she carries on where she was. Its own log: $out/screenshot.log.
group_of() {
    # The process group (a session of its own) of the process whose command line has "$1".
    local proc words pgid
    for proc in /proc/[0-9]*; do
        mapfile -d '' words 2>/dev/null <"$proc/cmdline" || continue  # a builtin: no process each
        if [[ "${words[*]}" == *"$1"* ]] && read -r _ _ _ _ pgid _ 2>/dev/null <"$proc/stat"; then
            echo "$pgid"
            return
        fi
    done
}
screenshot() {
    local id=$1 metrics=$out/director/experiments/$1/output/metrics.jsonl shot status=0 carol="" tries rows
    $bin/python -m foedus.plans.service.screenshot --url "$dashboard" --token-file "$out/dashboard-token" \
        --certificate "$out/certs/aggregator/aggregator.crt" --experiment "$id" --rounds 2 \
        -o "$root/$out/dashboard.png" &
    shot=$!
    # Found while her first round runs, held as soon as the second closes: each bounded (60 s).
    for tries in $(seq 300); do
        kill -0 "$shot" 2>/dev/null || break  # skipped or failed: nothing to hold for
        carol=$(group_of "collaborator start -n carol --plan $root/$out/")
        [ -n "$carol" ] && break
        sleep 0.2
    done
    for tries in $(seq 3000); do
        [ -n "$carol" ] && kill -0 "$shot" 2>/dev/null || break
        mapfile -t rows 2>/dev/null <"$metrics" || rows=()
        if [ ${#rows[@]} -ge 2 ]; then
            kill -STOP -- "-$carol" 2>/dev/null || carol=""
            break
        fi
        sleep 0.02
    done
    wait "$shot" || status=$?
    [ -z "$carol" ] || kill -CONT -- "-$carol" 2>/dev/null || true
    return $status
}

id=$($bin/experiment --json submit $here/digits.yaml --name digits |
    $bin/python -c 'import json, sys; print(json.load(sys.stdin)["experiment_id"])')
dashboard=https://localhost:$dashboard_port/
echo "demo-service: dashboard: $dashboard (token in $out/dashboard-token)"
screenshot "$id" >"$out/screenshot.log" 2>&1 &
shooter=$!
pids+=($shooter)
echo "demo-service: submitted experiment $id; its metrics as each round closes:"
$bin/experiment metrics "$id" --follow | tee "$out/metrics.txt"
$bin/experiment wait "$id" >/dev/null || fail "experiment $id did not complete: $($bin/experiment status "$id" | sed -n 4p)"
wait "$shooter" || fail "the dashboard's screenshot failed: $(tail -1 "$out/screenshot.log")"
echo "demo-service: $(tail -1 "$out/screenshot.log")"

$bin/experiment download "$id" --model best -o "$out/best_model.pbuf"
accuracy=$($bin/experiment --json metrics "$id" | $bin/python -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin if line.strip()]
print("%.4f" % rows[-1]["metrics"]["aggregated_model_validation"]["accuracy"])')
stop_all
[ -z "$(leftovers)" ] || fail "processes still running after the stop: $(leftovers | xargs)"
echo "demo-service: experiment $id completed: final accuracy $accuracy; best model saved to $out/best_model.pbuf"
