#!/bin/sh
# The quick start's CI job: a script with a hard-coded key that calls
# Cursor's API, as a job on a shared runner might. It trusts only the
# gateway's CA (exported by the gateway into the `ca` volume), exactly as
# jobs do after `gateway trust install`. The key is made up here, in
# Cursor's shape, so no real key is ever in this repository.
set -u
KEY="key_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
URL=https://api2.cursor.sh/aiserver.v1.ChatService/StreamChat
echo "job: calling $URL without a key"
curl -sS --retry 5 --retry-connrefused --retry-delay 1 --max-time 30 \
  --cacert /ca/gateway-ca.pem -H 'Content-Type: application/json' \
  -d '{"prompt": "hello"}' -w '\njob: HTTP %{http_code}\n' "$URL"
echo "job: calling $URL with a hard-coded key"
curl -sS --retry 5 --retry-connrefused --retry-delay 1 --max-time 30 \
  --cacert /ca/gateway-ca.pem \
  -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d '{"prompt": "summarise the build log"}' \
  -w '\njob: HTTP %{http_code}\n' \
  "$URL"
