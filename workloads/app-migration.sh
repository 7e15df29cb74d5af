#!/bin/sh
# workload: app-migration — apps' data migrated by the new system in place: each migrated app's
# SQLite database gets a schema change that rewrites every row (rollback journal), and its data
# files are rewritten where they are (a header and scattered 4 KiB pages, as a format upgrade
# does); one large file is re-encoded whole, in place.
#
# Format: docs/workloads.md. Usage: DATA=/mnt sh app-migration.sh setup|update
# Parameters (environment, with defaults):
#   DATA      mount point of the file system (required)
#   SEED      random seed; default 1
#   FILL      percent of the file system in use after setup (filler files); default 40
#   APPS      apps with data; default 24
#   MIGRATED  apps the update migrates; default 12
#   PAGES     scattered 4 KiB pages rewritten per migrated data file; default 64
set -eu
: "${DATA:?DATA must name the mounted file system}"
export DATA SEED="${SEED:-1}" FILL="${FILL:-40}" APPS="${APPS:-24}" MIGRATED="${MIGRATED:-12}" \
    PAGES="${PAGES:-64}"

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
    a=0
    while [ "$a" -lt "$APPS" ]; do
        mkdir -p "$DATA/data/app$a/databases" "$DATA/data/app$a/files"
        {
            echo "PRAGMA page_size=4096; BEGIN;"
            echo "CREATE TABLE msg(id INTEGER PRIMARY KEY, thread INT, body TEXT, extra BLOB);"
            echo "CREATE INDEX msg_thread ON msg(thread);"
            echo "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $(( 1500 + a * 100 )))"
            echo "INSERT INTO msg SELECT i, i % 37, hex(randomblob(120)), randomblob(300) FROM n;"
            echo "COMMIT;"
        } | sqlite3 "$DATA/data/app$a/databases/main.db"
        a=$(( a + 1 ))
    done
    perl -e "$PERL_HELPERS"'
    for my $a (0 .. $ENV{APPS} - 1) {
        put("$ENV{DATA}/data/app$a/files/blob0", (1024 + rnd(3072)) * 1024);
        put("$ENV{DATA}/data/app$a/files/blob1", (256 + rnd(1024)) * 1024);
    }
    '
    fill_to
    sync
}

update() {
    k=0
    while [ "$k" -lt "$MIGRATED" ]; do
        a=$(( k * APPS / MIGRATED ))
        # Schema migration: a new column filled for every row, then an index rebuilt.
        {
            echo "BEGIN;"
            echo "ALTER TABLE msg ADD COLUMN flags INT DEFAULT 0;"
            echo "UPDATE msg SET flags = (id * $SEED) % 7, extra = randomblob(300);"
            echo "DROP INDEX msg_thread; CREATE INDEX msg_thread ON msg(thread, flags);"
            echo "COMMIT;"
        } | sqlite3 "$DATA/data/app$a/databases/main.db"
        k=$(( k + 1 ))
    done
    perl -e "$PERL_HELPERS"'
    # Format upgrade of the migrated apps data files: a new header, scattered pages, fsync.
    for my $k (0 .. $ENV{MIGRATED} - 1) {
        my $a = int($k * $ENV{APPS} / $ENV{MIGRATED});
        for my $f ("$ENV{DATA}/data/app$a/files/blob0", "$ENV{DATA}/data/app$a/files/blob1") {
            my $blocks = int((-s $f) / 4096);
            overwrite($f, 0, 4);
            overwrite($f, rnd($blocks), 1) for 1 .. $ENV{PAGES};
            open(my $h, "<", $f) or die; $h->sync or die "$f: $!"; close($h);
        }
    }
    # One large file re-encoded whole, in place (same size, same blocks).
    my $f = "$ENV{DATA}/data/app0/files/blob0"; my $blocks = int((-s $f) / 4096);
    for (my $b = 0; $b < $blocks; $b += 64) { overwrite($f, $b, $blocks - $b < 64 ? $blocks - $b : 64); }
    '
    sync
}

case "${1:-}" in
    setup) setup ;;
    update) update ;;
    *) echo "usage: DATA=<mount point> $0 setup|update" >&2; exit 2 ;;
esac
