//! Typed device-mapper targets: each has a params type whose `Display` is its table line
//! (what `DM_TABLE_LOAD` takes and `DM_TABLE_STATUS` with `DM_STATUS_TABLE_FLAG` prints) and
//! whose `FromStr` parses it back, plus a status type parsing the kernel's status line.
//!
//! Devices are always written as `major:minor`: with no udev there may be no node to name, and
//! the kernel prints `major:minor` back.

use std::fmt;
use std::str::FromStr;

use crate::error::ErrorKind;
use crate::units::{DevId, Sectors};

/// A table or status line could not be parsed, or a table is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A target's text does not have the documented shape.
    #[error("cannot parse {target} {what}: {text:?}")]
    Parse {
        /// Target type.
        target: &'static str,
        /// "table line" or "status".
        what: &'static str,
        /// The text.
        text: String,
    },
    /// A table has no lines.
    #[error("a table needs at least one target")]
    Empty,
    /// Targets must cover the device from sector 0 without gaps or overlaps.
    #[error("target {index} starts at sector {start}, expected {expected}")]
    NotContiguous {
        /// Line index.
        index: usize,
        /// Its start.
        start: u64,
        /// Where the previous line ended.
        expected: u64,
    },
    /// A target has length 0 or the table end overflows.
    #[error("target {index} has a bad length")]
    BadLength {
        /// Line index.
        index: usize,
    },
}

impl TableError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Parse { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Invalid,
        }
    }
}

fn perr(target: &'static str, what: &'static str, text: &str) -> TableError {
    TableError::Parse { target, what, text: text.to_owned() }
}

fn words(s: &str) -> Vec<&str> {
    s.split_ascii_whitespace().collect()
}

fn dev(target: &'static str, what: &'static str, text: &str, w: &str) -> Result<DevId, TableError> {
    w.parse().map_err(|_| perr(target, what, text))
}

fn num<T: FromStr>(
    target: &'static str,
    what: &'static str,
    text: &str,
    w: &str,
) -> Result<T, TableError> {
    w.parse().map_err(|_| perr(target, what, text))
}

const TABLE: &str = "table line";
const STATUS: &str = "status";

// ---------------------------------------------------------------------------------------------
// linear

/// `linear <dev> <offset>`: maps to `dev` starting at `offset` sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearParams {
    /// Underlying device.
    pub device: DevId,
    /// Start sector on it.
    pub offset: Sectors,
}

impl fmt::Display for LinearParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.device, self.offset)
    }
}

impl FromStr for LinearParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        match words(s)[..] {
            [d, o] => Ok(Self {
                device: dev("linear", TABLE, s, d)?,
                offset: Sectors::new(num("linear", TABLE, s, o)?),
            }),
            _ => Err(perr("linear", TABLE, s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// snapshot-origin

/// `snapshot-origin <origin>`: the origin of one or more snapshots; writes copy the old chunk
/// to each snapshot's COW store first. Its status line is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOriginParams {
    /// The origin device.
    pub origin: DevId,
}

impl fmt::Display for SnapshotOriginParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)
    }
}

impl FromStr for SnapshotOriginParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        match words(s)[..] {
            [d] => Ok(Self { origin: dev("snapshot-origin", TABLE, s, d)? }),
            _ => Err(perr("snapshot-origin", TABLE, s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// snapshot / snapshot-merge

/// The exception store of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `P`: metadata kept on the COW device (survives reboots).
    Persistent,
    /// `PO`: persistent, and an overflowing snapshot stays readable ("Overflow") instead of
    /// becoming invalid.
    PersistentOverflow,
    /// `N`: transient (lost on reboot).
    Transient,
}

impl Persistence {
    fn as_str(self) -> &'static str {
        match self {
            Self::Persistent => "P",
            Self::PersistentOverflow => "PO",
            Self::Transient => "N",
        }
    }
    fn parse(w: &str) -> Option<Self> {
        match w {
            "P" | "p" => Some(Self::Persistent),
            "PO" | "Po" | "pO" | "po" => Some(Self::PersistentOverflow),
            "N" | "n" => Some(Self::Transient),
            _ => None,
        }
    }
}

/// `snapshot <origin> <cow> <P|PO|N> <chunk sectors> [<#features> <feature>...]`; the same line
/// with target type `snapshot-merge` merges the exceptions back into the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotParams {
    /// The origin device (the raw device, not the snapshot-origin device).
    pub origin: DevId,
    /// The COW (exception store) device.
    pub cow: DevId,
    /// Store kind.
    pub persistence: Persistence,
    /// Chunk size in sectors (a power of two).
    pub chunk: Sectors,
    /// Optional features (`discard_zeroes_cow`, `discard_passdown_origin`), as printed.
    pub features: Vec<String>,
}

impl fmt::Display for SnapshotParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.origin, self.cow, self.persistence.as_str(), self.chunk)?;
        if !self.features.is_empty() {
            write!(f, " {}", self.features.len())?;
            for feat in &self.features {
                write!(f, " {feat}")?;
            }
        }
        Ok(())
    }
}

fn parse_snapshot(target: &'static str, s: &str) -> Result<SnapshotParams, TableError> {
    let w = words(s);
    if w.len() < 4 {
        return Err(perr(target, TABLE, s));
    }
    let features = match w.get(4) {
        None => Vec::new(),
        Some(n) => {
            let n: usize = num(target, TABLE, s, n)?;
            if w.len() != 5 + n {
                return Err(perr(target, TABLE, s));
            }
            w[5..].iter().map(|f| (*f).to_owned()).collect()
        }
    };
    Ok(SnapshotParams {
        origin: dev(target, TABLE, s, w[0])?,
        cow: dev(target, TABLE, s, w[1])?,
        persistence: Persistence::parse(w[2]).ok_or_else(|| perr(target, TABLE, s))?,
        chunk: Sectors::new(num(target, TABLE, s, w[3])?),
        features,
    })
}

impl FromStr for SnapshotParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        parse_snapshot("snapshot", s)
    }
}

/// Status of a `snapshot` or `snapshot-merge` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// `<allocated>/<total> <metadata>`: sectors of the COW store in use (data and
    /// metadata), its size, and the metadata share.
    Active {
        /// Sectors allocated in the COW store.
        allocated: Sectors,
        /// Size of the COW store.
        total: Sectors,
        /// Sectors of metadata among `allocated`.
        metadata: Sectors,
    },
    /// `Invalid`: the snapshot was dropped (COW full, or an I/O error).
    Invalid,
    /// `Merge failed`.
    MergeFailed,
    /// `Overflow`: a `PO` snapshot ran out of space; reads still work.
    Overflow,
    /// `Unknown`: the store cannot report usage.
    Unknown,
}

impl SnapshotStatus {
    /// For `snapshot-merge`: all exceptions merged (only metadata left allocated).
    pub fn merge_complete(&self) -> bool {
        matches!(self, Self::Active { allocated, metadata, .. } if allocated == metadata)
    }
}

impl FromStr for SnapshotStatus {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        let t = s.trim();
        match t {
            "Invalid" => return Ok(Self::Invalid),
            "Merge failed" => return Ok(Self::MergeFailed),
            "Overflow" => return Ok(Self::Overflow),
            "Unknown" => return Ok(Self::Unknown),
            _ => {}
        }
        let bad = || perr("snapshot", STATUS, s);
        let (usage, meta) = t.split_once(' ').ok_or_else(bad)?;
        let (a, tot) = usage.split_once('/').ok_or_else(bad)?;
        Ok(Self::Active {
            allocated: Sectors::new(a.parse().map_err(|_| bad())?),
            total: Sectors::new(tot.parse().map_err(|_| bad())?),
            metadata: Sectors::new(meta.trim().parse().map_err(|_| bad())?),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// bow

/// `bow <dev> [1 block_size:<N>]` (Android's dm-bow; see dm-bow-format.md §1). Its INFO status
/// is empty and its TABLE status is a range dump, not this line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BowParams {
    /// Underlying device.
    pub device: DevId,
    /// Optional block size in bytes (power of two, 512..=4096).
    pub block_size: Option<u32>,
}

impl fmt::Display for BowParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.device)?;
        if let Some(bs) = self.block_size {
            write!(f, " 1 block_size:{bs}")?;
        }
        Ok(())
    }
}

impl FromStr for BowParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        match words(s)[..] {
            [d] => Ok(Self { device: dev("bow", TABLE, s, d)?, block_size: None }),
            [d, "1", opt] => {
                let bs = opt.strip_prefix("block_size:").ok_or_else(|| perr("bow", TABLE, s))?;
                Ok(Self {
                    device: dev("bow", TABLE, s, d)?,
                    block_size: Some(num("bow", TABLE, s, bs)?),
                })
            }
            _ => Err(perr("bow", TABLE, s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// log-writes

/// `log-writes <dev> <log dev>`: passes I/O to `dev` and logs every write, flush, FUA and
/// discard (plus `mark <label>` messages) to `log dev` (see [`crate::logwrites`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWritesParams {
    /// Data device.
    pub device: DevId,
    /// Log device.
    pub log_device: DevId,
}

impl fmt::Display for LogWritesParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.device, self.log_device)
    }
}

impl FromStr for LogWritesParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        match words(s)[..] {
            [d, l] => Ok(Self {
                device: dev("log-writes", TABLE, s, d)?,
                log_device: dev("log-writes", TABLE, s, l)?,
            }),
            _ => Err(perr("log-writes", TABLE, s)),
        }
    }
}

/// log-writes status: `<logged entries> <highest log sector in use>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogWritesStatus {
    /// Entries logged so far.
    pub logged_entries: u64,
    /// Last 512-byte sector of the log device written or reserved.
    pub last_log_sector: Sectors,
}

impl FromStr for LogWritesStatus {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        match words(s)[..] {
            [e, n] => Ok(Self {
                logged_entries: num("log-writes", STATUS, s, e)?,
                last_log_sector: Sectors::new(num("log-writes", STATUS, s, n)?),
            }),
            _ => Err(perr("log-writes", STATUS, s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// flakey

/// A dm-flakey behaviour during the down interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlakeyFeature {
    /// Writes are silently dropped (reported as done); reads work.
    DropWrites,
    /// Writes fail with EIO; reads work.
    ErrorWrites,
    /// Corrupt byte `nth` (1-based) of every matching bio: direction `r`/`w`, value, bio flags.
    CorruptBioByte {
        /// Byte index, 1-based.
        nth: u32,
        /// `'r'` or `'w'`.
        direction: char,
        /// Value written.
        value: u8,
        /// Only bios with these `bi_opf` flags.
        flags: u32,
    },
}

/// `flakey <dev> <offset> <up secs> <down secs> [<#args> <feature>...]`: works for `up`
/// seconds, then misbehaves for `down` seconds (without features: all I/O fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeyParams {
    /// Underlying device.
    pub device: DevId,
    /// Start sector on it.
    pub offset: Sectors,
    /// Seconds of normal behaviour per cycle.
    pub up_interval: u32,
    /// Seconds of failure per cycle.
    pub down_interval: u32,
    /// What happens while down.
    pub features: Vec<FlakeyFeature>,
}

impl fmt::Display for FlakeyParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.device, self.offset, self.up_interval, self.down_interval)?;
        if self.features.is_empty() {
            return Ok(());
        }
        let argc: usize = self
            .features
            .iter()
            .map(|ft| if matches!(ft, FlakeyFeature::CorruptBioByte { .. }) { 5 } else { 1 })
            .sum();
        write!(f, " {argc}")?;
        for ft in &self.features {
            match ft {
                FlakeyFeature::DropWrites => write!(f, " drop_writes")?,
                FlakeyFeature::ErrorWrites => write!(f, " error_writes")?,
                FlakeyFeature::CorruptBioByte { nth, direction, value, flags } => {
                    write!(f, " corrupt_bio_byte {nth} {direction} {value} {flags}")?
                }
            }
        }
        Ok(())
    }
}

impl FromStr for FlakeyParams {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        let t = "flakey";
        let w = words(s);
        if w.len() < 4 {
            return Err(perr(t, TABLE, s));
        }
        let mut features = Vec::new();
        if let Some(n) = w.get(4) {
            let n: usize = num(t, TABLE, s, n)?;
            let args = &w[5..];
            if args.len() != n {
                return Err(perr(t, TABLE, s));
            }
            let mut i = 0;
            while i < args.len() {
                match args[i] {
                    "drop_writes" => features.push(FlakeyFeature::DropWrites),
                    "error_writes" => features.push(FlakeyFeature::ErrorWrites),
                    "corrupt_bio_byte" if i + 4 < args.len() => {
                        let direction = match args[i + 2] {
                            "r" => 'r',
                            "w" => 'w',
                            _ => return Err(perr(t, TABLE, s)),
                        };
                        features.push(FlakeyFeature::CorruptBioByte {
                            nth: num(t, TABLE, s, args[i + 1])?,
                            direction,
                            value: num(t, TABLE, s, args[i + 3])?,
                            flags: num(t, TABLE, s, args[i + 4])?,
                        });
                        i += 4;
                    }
                    _ => return Err(perr(t, TABLE, s)),
                }
                i += 1;
            }
        }
        Ok(Self {
            device: dev(t, TABLE, s, w[0])?,
            offset: Sectors::new(num(t, TABLE, s, w[1])?),
            up_interval: num(t, TABLE, s, w[2])?,
            down_interval: num(t, TABLE, s, w[3])?,
            features,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Target, TargetLine, Table

/// One target of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `linear`.
    Linear(LinearParams),
    /// `snapshot-origin`.
    SnapshotOrigin(SnapshotOriginParams),
    /// `snapshot`.
    Snapshot(SnapshotParams),
    /// `snapshot-merge`.
    SnapshotMerge(SnapshotParams),
    /// `bow` (Android kernels only).
    Bow(BowParams),
    /// `log-writes`.
    LogWrites(LogWritesParams),
    /// `flakey`.
    Flakey(FlakeyParams),
    /// Any other target, passed through verbatim (e.g. `zero`, `error`).
    Other {
        /// Target type name.
        target_type: String,
        /// Parameter string.
        params: String,
    },
}

impl Target {
    /// The kernel's target type name.
    pub fn target_type(&self) -> &str {
        match self {
            Self::Linear(_) => "linear",
            Self::SnapshotOrigin(_) => "snapshot-origin",
            Self::Snapshot(_) => "snapshot",
            Self::SnapshotMerge(_) => "snapshot-merge",
            Self::Bow(_) => "bow",
            Self::LogWrites(_) => "log-writes",
            Self::Flakey(_) => "flakey",
            Self::Other { target_type, .. } => target_type,
        }
    }

    /// The parameter string.
    pub fn params(&self) -> String {
        match self {
            Self::Linear(p) => p.to_string(),
            Self::SnapshotOrigin(p) => p.to_string(),
            Self::Snapshot(p) | Self::SnapshotMerge(p) => p.to_string(),
            Self::Bow(p) => p.to_string(),
            Self::LogWrites(p) => p.to_string(),
            Self::Flakey(p) => p.to_string(),
            Self::Other { params, .. } => params.clone(),
        }
    }

    /// Parses a target from its type name and table-line parameters.
    pub fn parse(target_type: &str, params: &str) -> Result<Self, TableError> {
        Ok(match target_type {
            "linear" => Self::Linear(params.parse()?),
            "snapshot-origin" => Self::SnapshotOrigin(params.parse()?),
            "snapshot" => Self::Snapshot(params.parse()?),
            "snapshot-merge" => Self::SnapshotMerge(parse_snapshot("snapshot-merge", params)?),
            "bow" => Self::Bow(params.parse()?),
            "log-writes" => Self::LogWrites(params.parse()?),
            "flakey" => Self::Flakey(params.parse()?),
            other => Self::Other { target_type: other.to_owned(), params: params.to_owned() },
        })
    }
}

/// One line of a table: `<start> <length> <type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLine {
    /// First sector of the mapped device this target covers.
    pub start: Sectors,
    /// Sectors covered.
    pub length: Sectors,
    /// The target.
    pub target: Target,
}

impl TargetLine {
    /// A line.
    pub fn new(start: Sectors, length: Sectors, target: Target) -> Self {
        Self { start, length, target }
    }
}

impl fmt::Display for TargetLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start,
            self.length,
            self.target.target_type(),
            self.target.params()
        )
    }
}

impl FromStr for TargetLine {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        let bad = || perr("table", TABLE, s);
        let mut it = s.trim().splitn(4, ' ');
        let start = it.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let length = it.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let ty = it.next().filter(|w| !w.is_empty()).ok_or_else(bad)?;
        let params = it.next().unwrap_or("");
        Ok(Self { start, length, target: Target::parse(ty, params)? })
    }
}

/// A validated table: targets cover `[0, size)` contiguously, each with a nonzero length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    lines: Vec<TargetLine>,
    read_only: bool,
}

impl Table {
    /// Validates the lines.
    pub fn new(lines: Vec<TargetLine>) -> Result<Self, TableError> {
        if lines.is_empty() {
            return Err(TableError::Empty);
        }
        let mut expected = 0u64;
        for (index, l) in lines.iter().enumerate() {
            if l.start.get() != expected {
                return Err(TableError::NotContiguous { index, start: l.start.get(), expected });
            }
            if l.length.get() == 0 {
                return Err(TableError::BadLength { index });
            }
            expected =
                expected.checked_add(l.length.get()).ok_or(TableError::BadLength { index })?;
        }
        Ok(Self { lines, read_only: false })
    }

    /// A one-line table covering `[0, length)`.
    pub fn single(length: Sectors, target: Target) -> Result<Self, TableError> {
        Self::new(vec![TargetLine::new(Sectors::new(0), length, target)])
    }

    /// Loads the table read-only (`DM_READONLY_FLAG`).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether the table is loaded read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The lines.
    pub fn lines(&self) -> &[TargetLine] {
        &self.lines
    }

    /// Total size of the mapped device.
    pub fn size(&self) -> Sectors {
        self.lines
            .last()
            .map_or(Sectors::new(0), |l| Sectors::new(l.start.get().saturating_add(l.length.get())))
    }

    /// The distinct target types, in order of first use.
    pub fn target_types(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for l in &self.lines {
            let t = l.target.target_type();
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

impl FromStr for Table {
    type Err = TableError;
    /// Parses `dmsetup table` output (one line per target).
    fn from_str(s: &str) -> Result<Self, TableError> {
        let lines = s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<TargetLine>, _>>()?;
        Self::new(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DevId {
        s.parse().unwrap()
    }

    // Kernel strings: captured from Debian's 6.1 kernel in the virtual device (tests/vm_dm.rs
    // and tests/vm_snapshot.rs print them and parse them live again).
    const LINEAR_TABLE: &str = "7:0 0";
    const SNAPSHOT_TABLE: &str = "7:0 254:1 P 8";
    const SNAPSHOT_PO_TABLE: &str = "7:1 7:2 PO 8";
    const SNAPSHOT_START: &str = "24/32768 16";
    const SNAPSHOT_USED: &str = "20688/32768 96";
    const SNAPSHOT_EMPTY_TRANSIENT: &str = "0/512 0";
    const FLAKEY_DROP: &str = "7:0 16384 0 3600 1 drop_writes ";
    const FLAKEY_ERROR: &str = "7:0 16384 0 3600 1 error_writes ";
    const FLAKEY_PLAIN: &str = "7:0 16384 3600 0 0 ";
    const LOG_WRITES_STATUS: &str = "10 58";

    #[test]
    fn captured_kernel_strings_parse() {
        assert_eq!(
            LINEAR_TABLE.parse::<LinearParams>().unwrap().to_string(),
            LINEAR_TABLE,
            "linear prints back identically"
        );
        let snap: SnapshotParams = SNAPSHOT_TABLE.parse().unwrap();
        assert_eq!(snap.to_string(), SNAPSHOT_TABLE);
        let po: SnapshotParams = SNAPSHOT_PO_TABLE.parse().unwrap();
        assert_eq!(po.persistence, Persistence::PersistentOverflow);
        assert_eq!(po.to_string(), SNAPSHOT_PO_TABLE);
        let used: SnapshotStatus = SNAPSHOT_USED.parse().unwrap();
        assert_eq!(
            used,
            SnapshotStatus::Active {
                allocated: Sectors::new(20688),
                total: Sectors::new(32768),
                metadata: Sectors::new(96)
            }
        );
        assert!(!SNAPSHOT_START.parse::<SnapshotStatus>().unwrap().merge_complete());
        assert!(SNAPSHOT_EMPTY_TRANSIENT.parse::<SnapshotStatus>().unwrap().merge_complete());
        let drop: FlakeyParams = FLAKEY_DROP.parse().unwrap();
        assert_eq!(drop.features, vec![FlakeyFeature::DropWrites]);
        assert_eq!(
            (drop.offset, drop.up_interval, drop.down_interval),
            (Sectors::new(16384), 0, 3600)
        );
        let err: FlakeyParams = FLAKEY_ERROR.parse().unwrap();
        assert_eq!(err.features, vec![FlakeyFeature::ErrorWrites]);
        let plain: FlakeyParams = FLAKEY_PLAIN.parse().unwrap();
        assert!(plain.features.is_empty());
        assert_eq!(plain.to_string(), "7:0 16384 3600 0");
        let lw: LogWritesStatus = LOG_WRITES_STATUS.parse().unwrap();
        assert_eq!((lw.logged_entries, lw.last_log_sector), (10, Sectors::new(58)));
    }

    #[test]
    fn linear_round_trip() {
        let p: LinearParams = "7:0 2048".parse().unwrap();
        assert_eq!(p, LinearParams { device: d("7:0"), offset: Sectors::new(2048) });
        assert_eq!(p.to_string(), "7:0 2048");
        assert!("7:0".parse::<LinearParams>().is_err());
    }

    #[test]
    fn snapshot_lines_and_statuses() {
        let p: SnapshotParams = "7:0 254:1 P 8".parse().unwrap();
        assert_eq!(p.persistence, Persistence::Persistent);
        assert_eq!(p.chunk, Sectors::new(8));
        assert_eq!(p.to_string(), "7:0 254:1 P 8");
        let po: SnapshotParams = "7:0 254:1 PO 16 1 discard_zeroes_cow".parse().unwrap();
        assert_eq!(po.persistence, Persistence::PersistentOverflow);
        assert_eq!(po.features, vec!["discard_zeroes_cow".to_owned()]);
        assert_eq!(po.to_string(), "7:0 254:1 PO 16 1 discard_zeroes_cow");
        let n: SnapshotParams = "7:0 7:1 N 8".parse().unwrap();
        assert_eq!(n.persistence, Persistence::Transient);

        let s: SnapshotStatus = "16/40960 16".parse().unwrap();
        assert_eq!(
            s,
            SnapshotStatus::Active {
                allocated: Sectors::new(16),
                total: Sectors::new(40960),
                metadata: Sectors::new(16)
            }
        );
        assert!(s.merge_complete());
        let s: SnapshotStatus = "2072/40960 24".parse().unwrap();
        assert!(!s.merge_complete());
        assert_eq!("Invalid".parse::<SnapshotStatus>().unwrap(), SnapshotStatus::Invalid);
        assert_eq!("Merge failed".parse::<SnapshotStatus>().unwrap(), SnapshotStatus::MergeFailed);
        assert_eq!("Overflow".parse::<SnapshotStatus>().unwrap(), SnapshotStatus::Overflow);
        assert!("12 of 40".parse::<SnapshotStatus>().is_err());
    }

    #[test]
    fn bow_line_matches_android() {
        let p = BowParams { device: d("253:3"), block_size: Some(4096) };
        assert_eq!(p.to_string(), "253:3 1 block_size:4096");
        assert_eq!(p.to_string().parse::<BowParams>().unwrap(), p);
        let p = BowParams { device: d("253:3"), block_size: None };
        assert_eq!(p.to_string(), "253:3");
        assert!("253:3 1 blocksize:4096".parse::<BowParams>().is_err());
    }

    #[test]
    fn log_writes_line_and_status() {
        let p: LogWritesParams = "7:1 7:2".parse().unwrap();
        assert_eq!(p.to_string(), "7:1 7:2");
        let s: LogWritesStatus = "23 1183".parse().unwrap();
        assert_eq!(s.logged_entries, 23);
        assert_eq!(s.last_log_sector, Sectors::new(1183));
    }

    #[test]
    fn flakey_features() {
        let p = FlakeyParams {
            device: d("7:0"),
            offset: Sectors::new(0),
            up_interval: 0,
            down_interval: 3600,
            features: vec![FlakeyFeature::DropWrites],
        };
        assert_eq!(p.to_string(), "7:0 0 0 3600 1 drop_writes");
        assert_eq!(p.to_string().parse::<FlakeyParams>().unwrap(), p);
        let c: FlakeyParams = "7:0 0 5 5 5 corrupt_bio_byte 32 r 1 0".parse().unwrap();
        assert_eq!(
            c.features,
            vec![FlakeyFeature::CorruptBioByte { nth: 32, direction: 'r', value: 1, flags: 0 }]
        );
        assert_eq!(c.to_string(), "7:0 0 5 5 5 corrupt_bio_byte 32 r 1 0");
        let plain: FlakeyParams = "7:0 0 60 0".parse().unwrap();
        assert!(plain.features.is_empty());
        assert!("7:0 0 1 1 2 drop_writes".parse::<FlakeyParams>().is_err());
    }

    #[test]
    fn tables_must_be_contiguous() {
        let lin = |s, l| {
            TargetLine::new(
                Sectors::new(s),
                Sectors::new(l),
                Target::Linear(LinearParams { device: d("7:0"), offset: Sectors::new(s) }),
            )
        };
        assert!(Table::new(vec![lin(0, 8), lin(8, 8)]).is_ok());
        assert_eq!(
            Table::new(vec![lin(0, 8), lin(9, 8)]).unwrap_err(),
            TableError::NotContiguous { index: 1, start: 9, expected: 8 }
        );
        assert_eq!(Table::new(vec![]).unwrap_err(), TableError::Empty);
        assert_eq!(Table::new(vec![lin(0, 0)]).unwrap_err(), TableError::BadLength { index: 0 });
    }

    #[test]
    fn dmsetup_style_table_round_trips() {
        let text = "0 2048 linear 7:0 0\n2048 2048 linear 7:1 4096\n4096 8 zero \n";
        let t: Table = text.parse().unwrap();
        assert_eq!(t.size(), Sectors::new(4104));
        assert_eq!(t.target_types(), vec!["linear", "zero"]);
        assert_eq!(
            t.lines()[2].target,
            Target::Other { target_type: "zero".into(), params: String::new() }
        );
        let again: Table = t.to_string().parse().unwrap();
        assert_eq!(again, t);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn dev() -> impl Strategy<Value = DevId> {
        (0u64..4096, 0u64..(1 << 20)).prop_map(|(a, b)| DevId::new(a, b).unwrap())
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            (dev(), any::<u32>()).prop_map(|(d, o)| Target::Linear(LinearParams {
                device: d,
                offset: Sectors::new(o.into())
            })),
            dev().prop_map(|d| Target::SnapshotOrigin(SnapshotOriginParams { origin: d })),
            (dev(), dev(), 0..3u8, 0..8u32).prop_map(|(o, c, p, k)| {
                let persistence = [
                    Persistence::Persistent,
                    Persistence::PersistentOverflow,
                    Persistence::Transient,
                ][usize::from(p)];
                Target::Snapshot(SnapshotParams {
                    origin: o,
                    cow: c,
                    persistence,
                    chunk: Sectors::new(8 << k),
                    features: vec![],
                })
            }),
            (dev(), proptest::option::of(9u32..13)).prop_map(|(d, b)| Target::Bow(BowParams {
                device: d,
                block_size: b.map(|s| 1 << s)
            })),
            (dev(), dev())
                .prop_map(|(d, l)| Target::LogWrites(LogWritesParams { device: d, log_device: l })),
            (dev(), any::<u32>(), 0..100u32, 0..100u32, 0..3u8).prop_map(|(d, o, u, w, f)| {
                let features = match f {
                    0 => vec![],
                    1 => vec![FlakeyFeature::DropWrites],
                    _ => vec![FlakeyFeature::ErrorWrites],
                };
                Target::Flakey(FlakeyParams {
                    device: d,
                    offset: Sectors::new(o.into()),
                    up_interval: u,
                    down_interval: w + 1,
                    features,
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn tables_print_and_parse_back(targets in proptest::collection::vec((1u64..1 << 30, target()), 1..6)) {
            let mut start = 0u64;
            let mut lines = Vec::new();
            for (len, t) in targets {
                lines.push(TargetLine::new(Sectors::new(start), Sectors::new(len), t));
                start += len;
            }
            let table = Table::new(lines).unwrap();
            let again: Table = table.to_string().parse().unwrap();
            prop_assert_eq!(again, table);
        }

        #[test]
        fn status_parsers_never_panic(s in "\\PC*") {
            let _ = s.parse::<SnapshotStatus>();
            let _ = s.parse::<LogWritesStatus>();
            let _ = s.parse::<FlakeyParams>();
            let _ = s.parse::<SnapshotParams>();
            let _ = s.parse::<TargetLine>();
        }
    }
}
