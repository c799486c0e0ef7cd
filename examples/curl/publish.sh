#!/usr/bin/env bash
# Publish one app event through appevents' HTTP ingest (POST /v1/events on `appevents serve`).
#
# Usage:
#   ./publish.sh --name "Contact Created" --user user-123 \
#     --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]
#
# Environment:
#   APPEVENTS_URL      server URL (default http://127.0.0.1:8080)
#   APPEVENTS_API_KEY  one of the server's API keys (required)
#
# Prints the event id on success; exits non-zero with the server's error on stderr otherwise.
# The server answers 201 only after the broker confirmed the event.
set -euo pipefail

usage="usage: publish.sh --name NAME --user USER_ID --payload JSON [--id ID]"
fail() { echo "publish failed: $*" >&2; exit 1; }

name="" user="" payload="" id=""
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || fail "$1 needs a value"$'\n'"$usage"
  case "$1" in
    --name) name="$2" ;;
    --user) user="$2" ;;
    --payload) payload="$2" ;;
    --id) id="$2" ;;
    *) fail "unexpected argument $1"$'\n'"$usage" ;;
  esac
  shift 2
done
if [ -z "$name" ] || [ -z "$user" ] || [ -z "$payload" ]; then
  fail "--name, --user and --payload are required"$'\n'"$usage"
fi
[ -n "${APPEVENTS_API_KEY:-}" ] || fail "set APPEVENTS_API_KEY to one of the server's API keys"
url="${APPEVENTS_URL:-http://127.0.0.1:8080}"

# The id is the idempotency key: the same id never runs a workflow twice, which is what makes
# the retries below (and any retry of yours) safe. Choose it here rather than letting the
# server pick one, so a retry carries the same id.
if [ -z "$id" ]; then
  id="$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen | tr '[:upper:]' '[:lower:]')"
fi

# A JSON string literal. The payload is sent as given: the server checks it.
json_string() {
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}
body="{\"id\":$(json_string "$id"),\"name\":$(json_string "$name"),\"user_id\":$(json_string "$user"),\"payload\":$payload}"

response="$(mktemp)"
trap 'rm -f "$response"' EXIT
# --retry: 503 (broker unavailable) and network errors are retried; the fixed id makes it safe.
status="$(curl --silent --show-error --retry 3 --max-time 30 \
  --output "$response" --write-out '%{http_code}' \
  --header "Authorization: Bearer $APPEVENTS_API_KEY" \
  --header 'Content-Type: application/json' \
  --data-binary "$body" \
  "$url/v1/events")" || fail "cannot reach $url: curl exited $?"

if [ "$status" != 201 ]; then
  fail "HTTP $status: $(cat "$response")"
fi
echo "$id"
