#!/bin/sh
# workload: fill-levels — the same mixed update on a file system filled to different levels:
# media (large files) and app data (small files) fill it to FILL percent; the update rewrites
# parts of existing files in place, replaces a settings file by rename in each of two boots,
# deletes small files and adds new ones. The fuller the file system, the less free space dm-bow
# and the snapshot's COW file have, and the more the allocator reuses what was just freed.
#
# Format: docs/workloads.md. Usage: DATA=/mnt sh fill-levels.sh setup|update
# bench-variants: FILL=50 FILL=80 FILL=95
# Parameters (environment, with defaults):
#   DATA         mount point of the file system (required)
#   SEED         random seed; default 1
#   FILL         percent of the file system in use after setup; default 50
#   REWRITE_MIB  data rewritten in place, in pieces of 4-64 KiB; default 8
#   NEW_MIB      new data, in files of 256 KiB; default 4
#   DELETED      small files deleted; default 60
set -eu
: "${DATA:?DATA must name the mounted file system}"
export DATA SEED="${SEED:-1}" FILL="${FILL:-50}" REWRITE_MIB="${REWRITE_MIB:-8}" \
    NEW_MIB="${NEW_MIB:-4}" DELETED="${DELETED:-60}"
# KiB still to write to reach FILL percent (df: size and used, KiB).
TO_FILL=$(df -Pk "$DATA" | awk -v fill="$FILL" 'NR == 2 { print int($2 * fill / 100 - $3) }')
export TO_FILL

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

setup() {
    perl -e "$PERL_HELPERS"'
    make_path("$ENV{DATA}/media", "$ENV{DATA}/appdata", "$ENV{DATA}/system");
    put("$ENV{DATA}/system/settings.xml", 262144);
    # A fifth of the target in small app files (16-64 KiB), the rest in 4 MiB media files.
    my $small = int($ENV{TO_FILL} / 5); my $i = 0;
    while ($small > 0) { my $kib = (1 + rnd(4)) * 16; put("$ENV{DATA}/appdata/s$i", $kib * 1024); $small -= $kib + 4; $i++; }
    my $want = $ENV{TO_FILL} - int($ENV{TO_FILL} / 5); $i = 0;
    while ($want > 0) { my $n = $want < 4096 ? $want : 4096; put("$ENV{DATA}/media/m$i", $n * 1024); $want -= $n + 4; $i++; }
    '
    sync
}

update() {
    perl -e "$PERL_HELPERS"'
    my @media = map { "$ENV{DATA}/media/m$_" } 0 .. (scalar(() = glob("$ENV{DATA}/media/m*")) - 1);
    my $small = scalar(() = glob("$ENV{DATA}/appdata/s*"));
    # In-place rewrites: pieces of 4-64 KiB at random offsets of random media files.
    my $left = $ENV{REWRITE_MIB} * 256;
    while ($left > 0) {
        my $f = $media[rnd(scalar @media)]; my $blocks = int((-s $f) / 4096);
        my $n = 1 + rnd(16); $n = $left if $n > $left; $n = $blocks if $n > $blocks;
        overwrite($f, rnd($blocks - $n + 1), $n); $left -= $n;
    }
    system("sync") == 0 or die;
    # Settings replaced by rename, once in each of two boots.
    for my $boot (1, 2) { put("$ENV{DATA}/system/settings.xml.tmp", 262144);
        rename("$ENV{DATA}/system/settings.xml.tmp", "$ENV{DATA}/system/settings.xml") or die; }
    # Deletions, then new files.
    for my $k (0 .. $ENV{DELETED} - 1) { unlink("$ENV{DATA}/appdata/s" . int(($k * $small / $ENV{DELETED} + $ENV{SEED}) % $small)); }
    make_path("$ENV{DATA}/new");
    for my $k (0 .. $ENV{NEW_MIB} * 4 - 1) { put("$ENV{DATA}/new/n$k", 262144); }
    '
    sync
}

case "${1:-}" in
    setup) setup ;;
    update) update ;;
    *) echo "usage: DATA=<mount point> $0 setup|update" >&2; exit 2 ;;
esac
