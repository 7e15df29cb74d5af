#!/bin/sh
# workload: package-databases — the package manager's databases rewritten by the new system's
# first boots: packages.xml and packages.list replaced by write-to-temp + rename (as Android's
# PackageManager and AtomicFile do), a SQLite package database updated in rollback-journal mode,
# and the updated packages' compiled code (oat/odex) replaced.
#
# Format: docs/workloads.md. Usage: DATA=/mnt sh package-databases.sh setup|update
# Parameters (environment, with defaults):
#   DATA      mount point of the file system (required)
#   SEED      random seed (setup and update each take their own); default 1
#   FILL      percent of the file system in use after setup (filler files); default 40
#   PACKAGES  installed packages; default 160
#   UPDATED   packages whose code the update recompiles; default 48
#   BOOTS     boots of the new system, each rewriting the databases; default 2
set -eu
: "${DATA:?DATA must name the mounted file system}"
export DATA SEED="${SEED:-1}" FILL="${FILL:-40}" PACKAGES="${PACKAGES:-160}" \
    UPDATED="${UPDATED:-48}" BOOTS="${BOOTS:-2}"

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

# packages_xml BOOT: the whole packages.xml, one <package> element per package.
packages_xml() {
    awk -v n="$PACKAGES" -v boot="$1" -v seed="$SEED" 'BEGIN {
        print "<?xml version=\"1.0\" encoding=\"utf-8\" standalone=\"yes\" ?>\n<packages>"
        for (i = 0; i < n; i++) {
            printf "<package name=\"com.example.app%d\" codePath=\"/data/app/app%d\" version=\"%d\" ", i, i, 1000 + boot
            printf "ft=\"%08x\" it=\"%08x\" ut=\"%08x\" userId=\"%d\">\n", (seed * 1000003 + i) % 2147483648, i * 7919, boot * 104729 + i, 10000 + i
            for (p = 0; p < 24; p++) printf "  <item name=\"android.permission.PERM_%d_%d\" granted=\"true\" flags=\"%d\" />\n", i, p, (i * p + boot) % 64
            printf "  <sigs count=\"1\" schemeVersion=\"3\"><cert index=\"%d\" key=\"308203%08x%08x\" /></sigs>\n</package>\n", i, (seed * 31 + i) % 2147483648, boot
        }
        print "</packages>"
    }'
}

# packages_list BOOT: packages.list, one line per package.
packages_list() {
    awk -v n="$PACKAGES" -v b="$1" 'BEGIN { for (i = 0; i < n; i++) printf "com.example.app%d %d 0 /data/data/app%d default:targetSdkVersion=33 3003,%d\n", i, 10000 + i, i, b }'
}

# replace FILE: FILE.tmp (already written) synced, then renamed over FILE (AtomicFile).
replace() {
    sync "$1.tmp"
    mv "$1.tmp" "$1"
}

setup() {
    perl -e "$PERL_HELPERS"'
    for my $i (0 .. $ENV{PACKAGES} - 1) {
        make_path("$ENV{DATA}/app/app$i/oat", "$ENV{DATA}/data/app$i/shared_prefs");
        put("$ENV{DATA}/app/app$i/base.apk", (128 + rnd(512)) * 1024);
        put("$ENV{DATA}/app/app$i/oat/base.odex", (64 + rnd(384)) * 1024);
        put("$ENV{DATA}/data/app$i/shared_prefs/prefs.xml", (1 + rnd(32)) * 512);
    }
    '
    mkdir -p "$DATA/system"
    packages_xml 0 > "$DATA/system/packages.xml"
    packages_list 0 > "$DATA/system/packages.list"
    {
        echo "PRAGMA page_size=4096; BEGIN;"
        echo "CREATE TABLE pkg(name TEXT PRIMARY KEY, version INT, path TEXT, meta BLOB);"
        echo "CREATE TABLE perm(pkg TEXT, name TEXT, granted INT, flags INT);"
        echo "CREATE INDEX perm_pkg ON perm(pkg);"
        awk -v n="$PACKAGES" 'BEGIN { for (i = 0; i < n; i++) {
            printf "INSERT INTO pkg VALUES(%c%d%c, 1000, %c/data/app/app%d%c, randomblob(1500));\n", 39, i, 39, 39, i, 39
            for (p = 0; p < 24; p++) printf "INSERT INTO perm VALUES(%c%d%c, %cPERM_%d%c, 1, %d);\n", 39, i, 39, 39, p, 39, p } }'
        echo "COMMIT;"
    } | sqlite3 "$DATA/system/packages.db"
    fill_to
    sync
}

update() {
    boot=1
    while [ "$boot" -le "$BOOTS" ]; do
        packages_xml "$boot" > "$DATA/system/packages.xml.tmp"
        replace "$DATA/system/packages.xml"
        packages_list "$boot" > "$DATA/system/packages.list.tmp"
        replace "$DATA/system/packages.list"
        {
            echo "BEGIN;"
            echo "UPDATE pkg SET version = version + 1, meta = randomblob(1500);"
            echo "UPDATE perm SET flags = flags + $boot WHERE (rowid + $SEED) % 3 = 0;"
            awk -v n="$PACKAGES" -v b="$boot" 'BEGIN { for (i = 0; i < n; i += 8) printf "INSERT INTO perm VALUES(%c%d%c, %cNEW_%d%c, 1, 0);\n", 39, i, 39, 39, b, 39 }'
            echo "COMMIT;"
        } | sqlite3 "$DATA/system/packages.db"
        if [ "$boot" -eq 1 ]; then
            # The new system recompiles the updated packages' code: a new odex replaces the old
            # one (freed), and the app's prefs are rewritten the same way.
            perl -e "$PERL_HELPERS"'
            for my $k (0 .. $ENV{UPDATED} - 1) {
                my $p = int($k * $ENV{PACKAGES} / $ENV{UPDATED});
                my $odex = "$ENV{DATA}/app/app$p/oat/base.odex";
                put("$odex.tmp", -s $odex); rename("$odex.tmp", $odex) or die;
                my $prefs = "$ENV{DATA}/data/app$p/shared_prefs/prefs.xml";
                put("$prefs.tmp", (2 + $p % 4) * 1024); rename("$prefs.tmp", $prefs) or die;
            }
            '
        fi
        sync
        boot=$(( boot + 1 ))
    done
}

case "${1:-}" in
    setup) setup ;;
    update) update ;;
    *) echo "usage: DATA=<mount point> $0 setup|update" >&2; exit 2 ;;
esac
