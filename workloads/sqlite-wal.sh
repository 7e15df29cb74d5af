#!/bin/sh
# workload: sqlite-wal — SQLite databases in WAL mode churned by the new system's boots: many
# small transactions (each commit appends to the -wal file and syncs it), automatic checkpoints
# that copy the WAL back into the database file in place and start the WAL over from its
# beginning, as apps' and system services' databases do.
#
# Format: docs/workloads.md. Usage: DATA=/mnt sh sqlite-wal.sh setup|update
# Parameters (environment, with defaults):
#   DATA      mount point of the file system (required)
#   SEED      random seed; default 1
#   FILL      percent of the file system in use after setup (filler files); default 40
#   DBS       databases; default 6
#   ROWS      rows per database at setup (~0.5 KiB each); default 6000
#   TXNS      transactions per database in the update; default 300
set -eu
: "${DATA:?DATA must name the mounted file system}"
export DATA SEED="${SEED:-1}" FILL="${FILL:-40}" DBS="${DBS:-6}" ROWS="${ROWS:-6000}" \
    TXNS="${TXNS:-300}"

# Bulk file work runs in one perl process (Debian's perl-base is always there): under the
# virtual device every process started costs ~0.1 s.
PERL_HELPERS='
use strict; use warnings; use IO::Handle; use File::Path qw(make_path);
my $x = ($ENV{SEED} * 7919 + 17) % 2147483648;
sub rnd { $x = ($x * 1103515245 + 12345) % 2147483648; return ($x >> 8) % $_[0]; }
open(my $u, "<", "/dev/urandom") or die; read($u, my $rbuf, 1 << 20) == 1 << 20 or die;
# put(path, bytes): a new file of that size, written and fsynced.
sub put { my ($p, $len) = @_; open(my $f, ">", $p) or die "$p: $!";
    while ($len > 0) { my $n = $len < 1044480 ? $len : 1044480;
        print $f substr($rbuf, rnd(4096), $n) or die; $len -= $n; }
    $f->flush; $f->sync or die "$p: $!"; close($f) or die "$p: $!"; }
# overwrite(path, block, count): count 4 KiB blocks rewritten in place from block on.
sub overwrite { my ($p, $b, $n) = @_; open(my $f, "+<", $p) or die "$p: $!";
    sysseek($f, $b * 4096, 0) or die; syswrite($f, substr($rbuf, rnd(4096), $n * 4096)) == $n * 4096 or die "$p: $!";
    close($f) or die "$p: $!"; }
'

# fill_to: filler files of 4 MiB (the last one smaller) until the file system is FILL% full.
fill_to() {
    TO_FILL=$(df -Pk "$DATA" | awk -v fill="$FILL" 'NR == 2 { print int($2 * fill / 100 - $3) }')
    TO_FILL=$TO_FILL perl -e "$PERL_HELPERS"'
    make_path("$ENV{DATA}/filler"); my ($want, $i) = ($ENV{TO_FILL}, 0);
    while ($want > 0) { my $n = $want < 4096 ? $want : 4096; put("$ENV{DATA}/filler/$i", $n * 1024); $want -= $n + 4; $i++; }
    '
}

setup() {
    mkdir -p "$DATA/db"
    d=0
    while [ "$d" -lt "$DBS" ]; do
        {
            echo "PRAGMA page_size=4096; PRAGMA journal_mode=WAL;"
            echo "CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT, b BLOB, t INT);"
            echo "CREATE INDEX kv_t ON kv(t);"
            echo "BEGIN;"
            echo "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $ROWS)"
            echo "INSERT INTO kv SELECT i, hex(randomblob(100)), randomblob(250), i FROM n;"
            echo "COMMIT; PRAGMA wal_checkpoint(TRUNCATE);"
        } | sqlite3 "$DATA/db/db$d.sqlite" > /dev/null
        d=$(( d + 1 ))
    done
    fill_to
    sync
}

update() {
    d=0
    while [ "$d" -lt "$DBS" ]; do
        # One connection per database and boot-long churn: each transaction updates a few rows
        # spread over the table (rows picked by a seeded LCG in SQL), inserts one, deletes one.
        awk -v txns="$TXNS" -v rows="$ROWS" -v seed="$SEED" -v db="$d" 'BEGIN {
            print "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
            x = (seed * 7919 + db * 104729) % 2147483648
            for (t = 0; t < txns; t++) {
                print "BEGIN;"
                for (u = 0; u < 4; u++) {
                    x = (x * 1103515245 + 12345) % 2147483648
                    printf "UPDATE kv SET v = hex(randomblob(100)), t = t + 1 WHERE k = %d;\n", 1 + int(x / 256) % rows
                }
                printf "INSERT INTO kv(v, b, t) VALUES(hex(randomblob(100)), randomblob(250), %d);\n", t
                x = (x * 1103515245 + 12345) % 2147483648
                printf "DELETE FROM kv WHERE k = %d;\n", 1 + int(x / 256) % rows
                print "COMMIT;"
            }
        }' | sqlite3 "$DATA/db/db$d.sqlite" > /dev/null
        d=$(( d + 1 ))
    done
    sync
}

case "${1:-}" in
    setup) setup ;;
    update) update ;;
    *) echo "usage: DATA=<mount point> $0 setup|update" >&2; exit 2 ;;
esac
