#!/usr/bin/env bash
# Renders nginx/chatmesh.conf.template to stdout.
#
#   render-conf.sh LISTEN PREFIX NODE_ADDR...
#
#   LISTEN     public address of nginx, e.g. 127.0.0.1:8080 or 8080
#   PREFIX     absolute runtime directory (pid file, PREFIX/logs, PREFIX/temp)
#   NODE_ADDR  host:port of each node's PUBLIC listener (never the internal one)
#
# Environment: TEMPLATE (default: chatmesh.conf.template next to this script),
# NGINX_USER (the `user` directive; default: `root` when run as root, else none).
#
# Example:
#   nginx/render-conf.sh 8080 /srv/chatmesh-nginx 10.0.0.5:8081 10.0.0.6:8081 >nginx.conf
#   mkdir -p /srv/chatmesh-nginx/logs /srv/chatmesh-nginx/temp
#   nginx -t -p /srv/chatmesh-nginx/ -c "$PWD/nginx.conf"
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,16s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi

listen=$1
prefix=${2%/}
shift 2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
template=${TEMPLATE:-$here/chatmesh.conf.template}
[[ -r $template ]] || { echo "render-conf.sh: cannot read template $template" >&2; exit 1; }
[[ $prefix == /* ]] || { echo "render-conf.sh: PREFIX must be an absolute path, got '$prefix'" >&2; exit 2; }
# Written unquoted into nginx.conf: no blanks or nginx syntax characters.
[[ $prefix =~ [[:space:]\;\{\}\'\"\$] ]] && { echo "render-conf.sh: PREFIX must not contain blanks, quotes, ; { } or \$: '$prefix'" >&2; exit 2; }
[[ $listen =~ ^[^[:space:]\;]+$ ]] || { echo "render-conf.sh: bad LISTEN '$listen'" >&2; exit 2; }

if [[ -n ${NGINX_USER+set} ]]; then
    user=$NGINX_USER
elif [[ $(id -u) == 0 ]]; then
    user=root
else
    user=
fi
user_directive=
[[ -n $user ]] && user_directive="user $user;"

for addr in "$@"; do
    [[ $addr =~ ^[^[:space:]\;]+:[0-9]+$ ]] || {
        echo "render-conf.sh: node address must be host:port, got '$addr'" >&2
        exit 2
    }
done

rendered=0
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == *@UPSTREAM_SERVERS@* ]]; then
        indent=${line%%@UPSTREAM_SERVERS@*}
        for addr in "$@"; do
            printf '%sserver %s max_fails=1 fail_timeout=2s;\n' "$indent" "$addr"
        done
        rendered=1
        continue
    fi
    line=${line//@USER_DIRECTIVE@/"$user_directive"}
    line=${line//@PREFIX@/"$prefix"}
    line=${line//@LISTEN@/"$listen"}
    if [[ $line =~ @[A-Z_]+@ ]]; then
        echo "render-conf.sh: unknown placeholder ${BASH_REMATCH[0]} in $template" >&2
        exit 1
    fi
    printf '%s\n' "$line"
done <"$template"

[[ $rendered == 1 ]] || { echo "render-conf.sh: no @UPSTREAM_SERVERS@ line in $template" >&2; exit 1; }
