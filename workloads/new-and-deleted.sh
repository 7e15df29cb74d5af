#!/bin/sh
# workload: new-and-deleted — files created and deleted by the new system's boots: downloaded
# and unpacked content (new files in free space), caches cleared and rebuilt, old files of
# removed features deleted, a temporary download written and deleted again in the same boot.
#
# Format: docs/workloads.md. Usage: DATA=/mnt sh new-and-deleted.sh setup|update
# Parameters (environment, with defaults):
#   DATA      mount point of the file system (required)
#   SEED      random seed; default 1
#   FILL      percent of the file system in use after setup (filler files); default 40
#   FILES     small files (8-64 KiB) at setup; default 1200
#   NEW_MIB   new data the update writes, in files of 64 KiB to 2 MiB; default 24
#   DELETED   percent of the small files the update deletes; default 25
set -eu
: "${DATA:?DATA must name the mounted file system}"
export DATA SEED="${SEED:-1}" FILL="${FILL:-40}" FILES="${FILES:-1200}" NEW_MIB="${NEW_MIB:-24}" \
    DELETED="${DELETED:-25}"

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
    perl -e "$PERL_HELPERS"'
    make_path("$ENV{DATA}/cache");
    for my $i (0 .. $ENV{FILES} - 1) {
        my $d = "$ENV{DATA}/media/d" . int($i / 100); make_path($d);
        put("$d/f$i", (1 + rnd(8)) * 8192);
    }
    put("$ENV{DATA}/cache/c$_", 131072) for 0 .. 39;
    '
    fill_to
    sync
}

update() {
    # Boot 1: old content deleted (DELETED percent of the small files), the cache cleared, a
    # temporary download written and dropped again.
    perl -e "$PERL_HELPERS"'
    for my $i (0 .. $ENV{FILES} - 1) {
        unlink("$ENV{DATA}/media/d" . int($i / 100) . "/f$i") if ($i * 37 + $ENV{SEED}) % 100 < $ENV{DELETED};
    }
    unlink("$ENV{DATA}/cache/c$_") for 0 .. 39;
    put("$ENV{DATA}/cache/download.tmp", $ENV{NEW_MIB} * 1048576 / 4);
    '
    sync
    rm -f "$DATA/cache/download.tmp"
    # New content: files of 64 KiB to 2 MiB until NEW_MIB is written, half in each of two
    # boots; then the cache rebuilt.
    for half in 1 2; do
        HALF=$half perl -e "$PERL_HELPERS"'
        make_path("$ENV{DATA}/new"); rnd(1) for 1 .. $ENV{HALF} * 1000;
        my ($left, $n) = ($ENV{NEW_MIB} * 512, 0);
        while ($left > 0) { my $kib = (1 + rnd(32)) * 64; $kib = $left if $kib > $left;
            put("$ENV{DATA}/new/n$ENV{HALF}-$n", $kib * 1024); $left -= $kib; $n++; }
        '
        sync
    done
    perl -e "$PERL_HELPERS"'put("$ENV{DATA}/cache/c$_", 65536) for 0 .. 39;'
    sync
}

case "${1:-}" in
    setup) setup ;;
    update) update ;;
    *) echo "usage: DATA=<mount point> $0 setup|update" >&2; exit 2 ;;
esac
