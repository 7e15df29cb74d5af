#!/bin/sh
# SWUpdate shell script, listed in sw-description's `scripts` with type "shellscript".
# SWUpdate calls it with "preinst" before and "postinst" after installing the images (newer
# versions also "postfailure" after a failed installation). postinst asks for the /data
# checkpoint; a non-zero exit fails the update.
hook=${CHECKPOINTD_HOOK:-/usr/lib/checkpointd/checkpointd-hook}

case $1 in
    postinst) exec "$hook" start ;;
    preinst | postfailure) exit 0 ;;
    *)
        echo "checkpointd.sh: unknown SWUpdate phase '$1'" >&2
        exit 1
        ;;
esac
