//! Reads the log that the kernel's dm-log-writes target writes, works out
//! the states a disk may hold after a power cut at any point of it, and
//! writes such a state onto a copy of the device.
//!
//! The log format is the kernel's (`drivers/md/dm-log-writes.c`): a super
//! block at byte 0 (magic, version, number of entries, the device's
//! logical block size), then from the second block on one entry per
//! completed request, in completion order: a block holding the entry
//! header (and, for a mark, its name), followed by the written data for a
//! write. Writes are logged when they complete, and a flush is logged
//! after every write that completed before it was issued.
//!
//! A crash after entry `k` leaves on the disk every write that a flush
//! logged before `k` made durable, every FUA write up to `k`, and any
//! subset of the other writes up to `k`, each possibly torn at a sector
//! boundary (a disk writes whole sectors atomically, nothing larger). See
//! [`crash_states`] for which of these states are enumerated.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `WRITE_LOG_MAGIC` of the kernel.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only log format version the kernel writes.
pub const VERSION: u64 = 1;
/// The request carried REQ_PREFLUSH: every write logged before it is durable.
pub const FLAG_FLUSH: u64 = 1;
/// The request carried REQ_FUA: its own data is durable once logged.
pub const FLAG_FUA: u64 = 1 << 1;
/// A discard: no data in the log; replayed as zeros.
pub const FLAG_DISCARD: u64 = 1 << 2;
/// A mark inserted with `dmsetup message DEV 0 mark NAME`.
pub const FLAG_MARK: u64 = 1 << 3;
/// The request carried REQ_META (informational).
pub const FLAG_METADATA: u64 = 1 << 4;
const ENTRY_HEADER: usize = 32;

/// Why a log cannot be read or replayed.
#[derive(Debug)]
pub enum Error {
    /// Reading the log or writing the target failed.
    Io {
        /// The file.
        path: String,
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// The log is not a dm-log-writes log, or is inconsistent.
    BadLog {
        /// The log file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A state specification names entries the log does not have.
    BadSpec {
        /// The specification.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, what, source } => write!(f, "{path}: {what}: {source}"),
            Error::BadLog { path, reason } => {
                write!(f, "{path}: not a usable dm-log-writes log: {reason}")
            }
            Error::BadSpec { spec, reason } => write!(f, "state '{spec}': {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// One logged request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: usize,
    /// First sector written, in units of the log's sector size.
    pub sector: u64,
    /// Sectors written (or discarded).
    pub nr_sectors: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The name of a mark.
    pub mark: Option<String>,
    /// Byte offset of the data in the log file.
    data_offset: u64,
}

impl Entry {
    /// Whether replaying this entry changes the device.
    pub fn writes(&self) -> bool {
        self.nr_sectors > 0 && self.flags & FLAG_MARK == 0
    }

    /// The flags as text, `-` for none.
    pub fn flag_names(&self) -> String {
        let names: Vec<&str> = [
            (FLAG_FLUSH, "FLUSH"),
            (FLAG_FUA, "FUA"),
            (FLAG_DISCARD, "DISCARD"),
            (FLAG_MARK, "MARK"),
            (FLAG_METADATA, "META"),
        ]
        .iter()
        .filter(|(bit, _)| self.flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            "-".into()
        } else {
            names.join("|")
        }
    }
}

/// A parsed log.
pub struct Log {
    file: File,
    path: String,
    /// The device's logical block size, the unit of every sector number.
    pub sector_size: u64,
    /// Every entry, in log order.
    pub entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Log {
    /// Reads and checks the log at `path`: every entry and its data must
    /// lie within the file.
    pub fn open(path: &Path) -> Result<Log, Error> {
        let shown = path.display().to_string();
        let io = |what: &str| {
            let shown = shown.clone();
            let what = what.to_string();
            move |source| Error::Io {
                path: shown,
                what,
                source,
            }
        };
        let bad = |reason: String| Error::BadLog {
            path: shown.clone(),
            reason,
        };
        let file = File::open(path).map_err(io("opening the log"))?;
        let len = file.metadata().map_err(io("reading its size"))?.len();
        let mut sup = [0u8; 28];
        if len < 512 {
            return Err(bad(format!("{len} bytes, shorter than its super block")));
        }
        file.read_exact_at(&mut sup, 0)
            .map_err(io("reading the super block"))?;
        if le64(&sup, 0) != MAGIC {
            return Err(bad(format!("magic {:#x}, not {MAGIC:#x}", le64(&sup, 0))));
        }
        if le64(&sup, 8) != VERSION {
            return Err(bad(format!("version {}, not {VERSION}", le64(&sup, 8))));
        }
        let count = le64(&sup, 16);
        let sector_size = u64::from(u32::from_le_bytes([sup[24], sup[25], sup[26], sup[27]]));
        if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(bad(format!("sector size {sector_size}")));
        }
        if count > len / sector_size {
            return Err(bad(format!("{count} entries do not fit in {len} bytes")));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut pos = sector_size;
        let mut head = vec![0u8; sector_size as usize];
        for index in 0..count as usize {
            if pos + sector_size > len {
                return Err(bad(format!(
                    "entry {index} at byte {pos} lies past the end"
                )));
            }
            file.read_exact_at(&mut head, pos)
                .map_err(io("reading an entry"))?;
            let (sector, nr_sectors, flags, data_len) = (
                le64(&head, 0),
                le64(&head, 8),
                le64(&head, 16),
                le64(&head, 24),
            );
            let mut mark = None;
            if flags & FLAG_MARK != 0 {
                let n = usize::try_from(data_len)
                    .ok()
                    .filter(|n| *n <= head.len() - ENTRY_HEADER)
                    .ok_or_else(|| bad(format!("entry {index}: mark of {data_len} bytes")))?;
                mark = Some(
                    String::from_utf8_lossy(&head[ENTRY_HEADER..ENTRY_HEADER + n]).into_owned(),
                );
            }
            pos += sector_size;
            let data_offset = pos;
            if flags & (FLAG_DISCARD | FLAG_MARK) == 0 {
                let bytes = nr_sectors
                    .checked_mul(sector_size)
                    .filter(|b| pos.checked_add(*b).is_some_and(|end| end <= len))
                    .ok_or_else(|| {
                        bad(format!("entry {index}: {nr_sectors} sectors past the end"))
                    })?;
                pos += bytes;
            }
            entries.push(Entry {
                index,
                sector,
                nr_sectors,
                flags,
                mark,
                data_offset,
            });
        }
        Ok(Log {
            file,
            path: shown,
            sector_size,
            entries,
        })
    }

    /// Writes entry `e` to `target`, only its first `sectors` sectors when
    /// given; a discard writes zeros.
    fn apply(
        &self,
        e: &Entry,
        sectors: Option<u64>,
        target: &File,
        tname: &str,
    ) -> Result<(), Error> {
        let n = sectors.unwrap_or(e.nr_sectors).min(e.nr_sectors);
        let mut buf = vec![0u8; (n * self.sector_size) as usize];
        if e.flags & FLAG_DISCARD == 0 {
            self.file
                .read_exact_at(&mut buf, e.data_offset)
                .map_err(|source| Error::Io {
                    path: self.path.clone(),
                    what: format!("reading the data of entry {}", e.index),
                    source,
                })?;
        }
        target
            .write_all_at(&buf, e.sector * self.sector_size)
            .map_err(|source| Error::Io {
                path: tname.into(),
                what: format!("writing entry {} at sector {}", e.index, e.sector),
                source,
            })
    }

    /// Writes the entries `state` names onto `target`, in log order, and
    /// flushes it.
    pub fn replay(&self, state: &[Applied], target: &Path) -> Result<(), Error> {
        let tname = target.display().to_string();
        let t = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|source| Error::Io {
                path: tname.clone(),
                what: "opening the target".into(),
                source,
            })?;
        for a in state {
            let e = self.entries.get(a.index).ok_or_else(|| Error::BadSpec {
                spec: a.to_string(),
                reason: format!("the log has {} entries", self.entries.len()),
            })?;
            self.apply(e, a.sectors, &t, &tname)?;
        }
        t.sync_all().map_err(|source| Error::Io {
            path: tname,
            what: "flushing the target".into(),
            source,
        })
    }
}

/// One entry of a crash state: written whole, or its first `sectors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Applied {
    /// The entry.
    pub index: usize,
    /// A torn write: only this many leading sectors reached the disk.
    pub sectors: Option<u64>,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sectors {
            Some(s) => write!(f, "{}:{s}", self.index),
            None => write!(f, "{}", self.index),
        }
    }
}

/// A state specification as `states` prints it: `-` for none, else
/// comma-separated entries `I`, ranges `I-J`, and torn writes `I:SECTORS`.
pub fn format_spec(writes: &[Applied]) -> String {
    if writes.is_empty() {
        return "-".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < writes.len() {
        let a = writes[i];
        let mut j = i;
        while a.sectors.is_none()
            && j + 1 < writes.len()
            && writes[j + 1].sectors.is_none()
            && writes[j + 1].index == writes[j].index + 1
        {
            j += 1;
        }
        out.push(if j > i + 1 {
            format!("{}-{}", a.index, writes[j].index)
        } else {
            a.to_string()
        });
        if j == i + 1 {
            out.push(writes[j].to_string());
        }
        i = j + 1;
    }
    out.join(",")
}

/// Parses what [`format_spec`] writes.
pub fn parse_spec(spec: &str) -> Result<Vec<Applied>, Error> {
    let bad = |reason: &str| Error::BadSpec {
        spec: spec.into(),
        reason: reason.into(),
    };
    if spec == "-" {
        return Ok(Vec::new());
    }
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad("not a number"));
    let mut out = Vec::new();
    for part in spec.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (num(a)? as usize, num(b)? as usize);
            if a > b {
                return Err(bad("range runs backwards"));
            }
            out.extend((a..=b).map(|index| Applied {
                index,
                sectors: None,
            }));
        } else if let Some((i, s)) = part.split_once(':') {
            out.push(Applied {
                index: num(i)? as usize,
                sectors: Some(num(s)?),
            });
        } else {
            out.push(Applied {
                index: num(part)? as usize,
                sectors: None,
            });
        }
    }
    if out.windows(2).any(|w| w[0].index >= w[1].index) {
        return Err(bad("entries must be in increasing order"));
    }
    Ok(out)
}

/// How a crash state came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every request up to the crash reached the disk.
    Prefix,
    /// Only what flushes and FUA made durable did.
    DurableOnly,
    /// What was durable plus a random subset of the rest, some torn.
    Subset,
    /// Everything up to the crash except one write that was not yet
    /// durable: what a device that reordered that one write leaves.
    AllButOne,
}

/// One state a power cut can leave.
#[derive(Clone, Debug)]
pub struct CrashState {
    /// A name unique within one enumeration.
    pub name: String,
    /// How it came about.
    pub kind: Kind,
    /// The crash came after this many entries had completed.
    pub after: usize,
    /// The last mark (of those counted) before the crash.
    pub mark: Option<String>,
    /// What to write onto the device's starting content, in log order.
    pub writes: Vec<Applied>,
}

/// Which states [`crash_states`] enumerates.
#[derive(Clone, Debug)]
pub struct Options {
    /// Random subsets per crash point where writes are not yet durable.
    pub subsets: usize,
    /// Seed of the subset choice (the same seed gives the same states).
    pub seed: u64,
    /// Only marks whose name starts with this count as `mark`.
    pub mark_prefix: String,
    /// Inside a run of more than `run_points + 2` plain writes that follow
    /// each other on the device (one large write split into pages), the
    /// prefixes ending after its first and last write and at this many
    /// evenly spaced writes between them; `None`: after every write.
    pub run_points: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            subsets: 8,
            seed: 1,
            mark_prefix: String::new(),
            run_points: None,
        }
    }
}

/// splitmix64: a small, seedable generator for choosing test states (not
/// for anything secret).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The writes among the first `after` entries that a crash right after
/// them is sure to leave (flushed or FUA), and those it may leave.
pub fn durable_and_optional(entries: &[Entry], after: usize) -> (Vec<usize>, Vec<usize>) {
    let done = &entries[..after];
    let barrier = done.iter().rposition(|e| e.flags & FLAG_FLUSH != 0);
    let mut durable = Vec::new();
    let mut optional = Vec::new();
    for e in done.iter().filter(|e| e.writes()) {
        // A flush makes what was logged before it durable; a flush that
        // carries data makes its own data durable only with FUA.
        let flushed = barrier.is_some_and(|b| e.index < b);
        if flushed || e.flags & FLAG_FUA != 0 {
            durable.push(e.index);
        } else {
            optional.push(e.index);
        }
    }
    (durable, optional)
}

/// The crash states of a log:
/// - after every entry (and before the first), everything so far on disk;
/// - right before every flush, every counted mark and at the end (where
///   the most writes are at risk), only what was durable; everything but
///   one of the writes at risk, for each of them (a write that a later one
///   depends on, left unflushed, shows here whatever the random choice);
///   and `opts.subsets` random choices of the writes at risk, each chosen
///   write torn at a random sector with probability 1/4.
///
/// States that write the same entries with the same mark are listed once.
pub fn crash_states(entries: &[Entry], opts: &Options) -> Vec<CrashState> {
    let counted = |e: &Entry| {
        e.mark
            .as_deref()
            .is_some_and(|m| m.starts_with(&opts.mark_prefix))
    };
    let mark_at = |after: usize| {
        entries[..after]
            .iter()
            .rev()
            .find(|e| counted(e))
            .and_then(|e| e.mark.clone())
    };
    let mut seen: HashSet<(Vec<Applied>, Option<String>)> = HashSet::new();
    let mut out = Vec::new();
    let mut push = |kind: Kind, after: usize, writes: Vec<Applied>, name: String| {
        let mark = mark_at(after);
        if seen.insert((writes.clone(), mark.clone())) {
            out.push(CrashState {
                name,
                kind,
                after,
                mark,
                writes,
            });
        }
    };
    let whole = |i: &usize| Applied {
        index: *i,
        sectors: None,
    };
    let skipped = thinned_prefixes(entries, opts.run_points);
    for after in 0..=entries.len() {
        if skipped.contains(&after) {
            continue;
        }
        let writes = entries[..after]
            .iter()
            .filter(|e| e.writes())
            .map(|e| whole(&e.index))
            .collect();
        push(Kind::Prefix, after, writes, format!("prefix-{after}"));
    }
    let mut rng = SplitMix(opts.seed);
    for after in 0..=entries.len() {
        let at_risk_end = after == entries.len()
            || entries[after].flags & FLAG_FLUSH != 0
            || counted(&entries[after]);
        if !at_risk_end {
            continue;
        }
        let (durable, optional) = durable_and_optional(entries, after);
        if optional.is_empty() {
            continue;
        }
        let mut only: Vec<Applied> = durable.iter().map(whole).collect();
        only.sort();
        push(
            Kind::DurableOnly,
            after,
            only.clone(),
            format!("durable-{after}"),
        );
        for &left_out in &optional {
            let mut writes = only.clone();
            writes.extend(optional.iter().filter(|&&i| i != left_out).map(whole));
            writes.sort();
            push(
                Kind::AllButOne,
                after,
                writes,
                format!("all-but-{left_out}-{after}"),
            );
        }
        for n in 0..opts.subsets {
            let mut writes = only.clone();
            for &i in &optional {
                if rng.below(2) == 0 {
                    continue;
                }
                let sectors = entries[i].nr_sectors;
                let torn = (sectors > 1 && rng.below(4) == 0).then(|| 1 + rng.below(sectors - 1));
                writes.push(Applied {
                    index: i,
                    sectors: torn,
                });
            }
            writes.sort();
            push(Kind::Subset, after, writes, format!("subset-{after}-{n}"));
        }
    }
    out
}

/// Whether `e` is a plain write: data, no flush, FUA, discard or mark.
fn plain_write(e: &Entry) -> bool {
    e.writes() && e.flags & (FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD) == 0
}

/// The crash points (entries completed) inside long runs of adjacent
/// plain writes that [`Options::run_points`] leaves out.
pub fn thinned_prefixes(entries: &[Entry], run_points: Option<usize>) -> HashSet<usize> {
    let mut out = HashSet::new();
    let Some(points) = run_points else {
        return out;
    };
    let mut start = 0;
    while start < entries.len() {
        let mut end = start + 1;
        if plain_write(&entries[start]) {
            while end < entries.len()
                && plain_write(&entries[end])
                && entries[end].sector == entries[end - 1].sector + entries[end - 1].nr_sectors
            {
                end += 1;
            }
        }
        // The run is entries[start..end]; the crash point after entry i is i + 1.
        let len = end - start;
        if len > points + 2 {
            let kept: HashSet<usize> = (0..points)
                .map(|k| start + 1 + (k + 1) * (len - 2) / (points + 1))
                .chain([start, end - 1])
                .collect();
            out.extend((start..end).filter(|i| !kept.contains(i)).map(|i| i + 1));
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests;
