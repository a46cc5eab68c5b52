#!/bin/bash
# neurostream-probe [PATH] [PORT]: GET http://127.0.0.1:PORT/PATH (default /ready, port 9100 or
# $NEUROSTREAM_PROBE_PORT) with bash's /dev/tcp alone, so the runtime image needs neither curl nor
# wget. Exits 0 on HTTP 200, 1 otherwise; prints the status line and the body (the service says why
# it is not ready or not healthy), which `docker inspect` shows in the container's health log;
# `neurostream-probe /status` prints the JSON status.
set -u
path="${1:-/ready}"
port="${2:-${NEUROSTREAM_PROBE_PORT:-9100}}"

if ! exec 3<>"/dev/tcp/127.0.0.1/$port"; then
    echo "neurostream-probe: nothing listens on 127.0.0.1:$port"
    exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
response="$(timeout 5 cat <&3)"
exec 3<&-

status="${response%%$'\r'*}"
status="${status%%$'\n'*}"
body="${response#*$'\r\n\r\n'}"
[ "$body" = "$response" ] && body=""
printf '%s\n%s\n' "$status" "$body"
case "$status" in
    "HTTP/1."?" 200"*) exit 0 ;;
    *) exit 1 ;;
esac
