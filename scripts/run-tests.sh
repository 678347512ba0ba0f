#!/usr/bin/env bash
# make test: the whole suite in two pytest processes at once. Tests marked `wallclock`
# mostly wait on the clock (a link cut for minutes, hanging links, fixed-length soaks) and
# use little CPU, so they run beside the rest instead of adding their waiting to the
# suite's length. Both runs use
# their own temporary directories and ephemeral ports. The last line adds up both runs.
set -u
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
waiting_log="$(mktemp)"
trap 'rm -f "$waiting_log" "$waiting_log.main"' EXIT

"$PY" -m pytest -q -p no:cacheprovider --durations=10 -m wallclock "$@" >"$waiting_log" 2>&1 &
waiting_pid=$!
"$PY" -m pytest -q -p no:cacheprovider --durations=25 -m "not wallclock" "$@" | tee "$waiting_log.main"
main_rc=${PIPESTATUS[0]}
wait "$waiting_pid"
waiting_rc=$?
echo
echo "=== tests marked wallclock (ran beside the others) ==="
cat "$waiting_log"

# pytest exits 5 when a selection holds no test: not a failure for the wallclock half.
[ "$waiting_rc" -eq 5 ] && waiting_rc=0
summary_files=("$waiting_log.main" "$waiting_log")
passed=0; failed=0; skipped=0; errors=0
for f in "${summary_files[@]}"; do
  last="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)' "$f" | tail -n 1)"
  p=$(grep -oE '[0-9]+ passed' <<<"$last" | grep -oE '[0-9]+'); passed=$((passed + ${p:-0}))
  x=$(grep -oE '[0-9]+ failed' <<<"$last" | grep -oE '[0-9]+'); failed=$((failed + ${x:-0}))
  s=$(grep -oE '[0-9]+ skipped' <<<"$last" | grep -oE '[0-9]+'); skipped=$((skipped + ${s:-0}))
  e=$(grep -oE '[0-9]+ errors?' <<<"$last" | grep -oE '[0-9]+'); errors=$((errors + ${e:-0}))
done
echo "total: $passed passed, $((failed + errors)) failed, $skipped skipped"
[ "$main_rc" -eq 0 ] && [ "$waiting_rc" -eq 0 ]
