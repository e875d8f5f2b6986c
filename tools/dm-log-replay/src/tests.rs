//! Logs written here in the kernel's layout, read back, enumerated and
//! replayed.

use super::*;
use std::io::Write;

const SS: u64 = 512;

/// One request as the kernel logs it.
enum Req {
    Write {
        sector: u64,
        fill: u8,
        sectors: u64,
        flags: u64,
    },
    Flush,
    Discard {
        sector: u64,
        sectors: u64,
    },
    Mark(&'static str),
}

fn w(sector: u64, fill: u8, sectors: u64) -> Req {
    Req::Write {
        sector,
        fill,
        sectors,
        flags: 0,
    }
}

/// A log file in the layout of `drivers/md/dm-log-writes.c`.
fn log_bytes(reqs: &[Req]) -> Vec<u8> {
    let block = |head: [u64; 4], extra: &[u8]| {
        let mut b = vec![0u8; SS as usize];
        for (i, v) in head.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[32..32 + extra.len()].copy_from_slice(extra);
        b
    };
    let mut sup = vec![0u8; SS as usize];
    sup[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    sup[8..16].copy_from_slice(&VERSION.to_le_bytes());
    sup[16..24].copy_from_slice(&(reqs.len() as u64).to_le_bytes());
    sup[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
    let mut out = sup;
    for r in reqs {
        match r {
            Req::Write {
                sector,
                fill,
                sectors,
                flags,
            } => {
                out.extend(block([*sector, *sectors, *flags, 0], &[]));
                // Each sector filled with `fill` plus its number, so a torn
                // or misplaced write shows.
                for s in 0..*sectors {
                    out.extend(std::iter::repeat_n(fill.wrapping_add(s as u8), SS as usize));
                }
            }
            Req::Flush => out.extend(block([0, 0, FLAG_FLUSH, 0], &[])),
            Req::Discard { sector, sectors } => {
                out.extend(block([*sector, *sectors, FLAG_DISCARD, 0], &[]))
            }
            Req::Mark(name) => {
                out.extend(block([0, 0, FLAG_MARK, name.len() as u64], name.as_bytes()))
            }
        }
    }
    out
}

fn write_log(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join("log");
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dm-log-replay-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sample() -> Vec<Req> {
    vec![
        w(0, 0x10, 2),     // 0
        w(8, 0x20, 1),     // 1
        Req::Flush,        // 2
        Req::Mark("km-1"), // 3
        Req::Write {
            sector: 4,
            fill: 0x30,
            sectors: 1,
            flags: FLAG_FUA,
        }, // 4
        w(16, 0x40, 4),    // 5
        Req::Discard {
            sector: 0,
            sectors: 1,
        }, // 6
        Req::Mark("other"), // 7
    ]
}

#[test]
fn entries_are_read_as_the_kernel_lays_them_out() {
    let d = tmpdir("read");
    let log = Log::open(&write_log(&d, &log_bytes(&sample()))).unwrap();
    assert_eq!(log.sector_size, SS);
    let summary: Vec<(u64, u64, String, Option<&str>)> = log
        .entries
        .iter()
        .map(|e| (e.sector, e.nr_sectors, e.flag_names(), e.mark.as_deref()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, 2, "-".into(), None),
            (8, 1, "-".into(), None),
            (0, 0, "FLUSH".into(), None),
            (0, 0, "MARK".into(), Some("km-1")),
            (4, 1, "FUA".into(), None),
            (16, 4, "-".into(), None),
            (0, 1, "DISCARD".into(), None),
            (0, 0, "MARK".into(), Some("other")),
        ]
    );
}

#[test]
fn a_replay_writes_the_named_entries_and_tears_where_told() {
    let d = tmpdir("replay");
    let log = Log::open(&write_log(&d, &log_bytes(&sample()))).unwrap();
    let target = d.join("dev");
    std::fs::write(&target, vec![0xeeu8; 32 * SS as usize]).unwrap();
    log.replay(&parse_spec("0,5:3").unwrap(), &target).unwrap();
    let dev = std::fs::read(&target).unwrap();
    let sector = |n: usize| &dev[n * SS as usize..(n + 1) * SS as usize];
    assert!(sector(0).iter().all(|&b| b == 0x10));
    assert!(sector(1).iter().all(|&b| b == 0x11));
    assert!(
        sector(8).iter().all(|&b| b == 0xee),
        "entry 1 was not named"
    );
    assert!(sector(16).iter().all(|&b| b == 0x40));
    assert!(sector(18).iter().all(|&b| b == 0x42));
    assert!(
        sector(19).iter().all(|&b| b == 0xee),
        "entry 5 was torn after 3 sectors"
    );
    log.replay(&parse_spec("6").unwrap(), &target).unwrap();
    assert!(
        std::fs::read(&target).unwrap()[..SS as usize]
            .iter()
            .all(|&b| b == 0),
        "a discard reads as zeros"
    );
}

#[test]
fn what_a_crash_keeps_follows_flushes_and_fua() {
    let d = tmpdir("durable");
    let log = Log::open(&write_log(&d, &log_bytes(&sample()))).unwrap();
    // Before the flush is logged nothing is durable.
    assert_eq!(durable_and_optional(&log.entries, 2), (vec![], vec![0, 1]));
    // After it, what came before; the FUA write is durable by itself,
    // the plain write after the flush is not; a discard is at risk too.
    assert_eq!(
        durable_and_optional(&log.entries, 8),
        (vec![0, 1, 4], vec![5, 6])
    );
}

#[test]
fn crash_states_cover_every_prefix_and_what_may_be_lost_with_the_mark_of_the_moment() {
    let d = tmpdir("states");
    let log = Log::open(&write_log(&d, &log_bytes(&sample()))).unwrap();
    let opts = Options {
        subsets: 16,
        seed: 7,
        mark_prefix: "km-".into(),
        run_points: None,
    };
    let states = crash_states(&log.entries, &opts);
    let spec = |name: &str| {
        let s = states
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no state {name}"));
        (format_spec(&s.writes), s.mark.clone())
    };
    let has = |writes: &str, mark: Option<&str>| {
        states
            .iter()
            .any(|s| format_spec(&s.writes) == writes && s.mark.as_deref() == mark)
    };
    assert_eq!(spec("prefix-0"), ("-".into(), None));
    assert_eq!(spec("prefix-2"), ("0,1".into(), None));
    assert_eq!(spec("prefix-4"), ("0,1".into(), Some("km-1".into())));
    assert_eq!(spec("prefix-7"), ("0,1,4-6".into(), Some("km-1".into())));
    // After a mark that does not count, nothing differs: listed once.
    assert!(!states.iter().any(|s| s.name == "prefix-8"));
    // At the end only the flushed writes and the FUA one are sure; the
    // "other" mark does not count.
    // (the same writes as prefix-5, so listed under that name).
    assert!(has("0,1,4", Some("km-1")));
    assert!(
        has("0,1,4,5", Some("km-1")) || has("0,1,4,6", Some("km-1")),
        "{states:#?}"
    );
    // Before the flush both writes may be lost, or either one.
    assert!(has("0", None) && has("1", None), "{states:#?}");
    for s in &states {
        let (durable, optional) = durable_and_optional(&log.entries, s.after);
        let idx: Vec<usize> = s.writes.iter().map(|a| a.index).collect();
        assert!(
            durable.iter().all(|i| idx.contains(i)),
            "{} loses a durable write",
            s.name
        );
        assert!(
            idx.iter()
                .all(|i| durable.contains(i) || optional.contains(i)),
            "{} writes an entry from after the crash",
            s.name
        );
        for a in &s.writes {
            if let Some(n) = a.sectors {
                assert!(
                    n >= 1 && n < log.entries[a.index].nr_sectors,
                    "{}: tear {a}",
                    s.name
                );
                assert!(
                    !durable.contains(&a.index),
                    "{}: a durable write torn",
                    s.name
                );
            }
        }
    }
    let subsets: Vec<_> = states.iter().filter(|s| s.kind == Kind::Subset).collect();
    assert!(
        subsets
            .iter()
            .any(|s| s.writes.iter().any(|a| a.sectors.is_some())),
        "no torn write among {} subsets",
        subsets.len()
    );
    let keys: HashSet<_> = states
        .iter()
        .map(|s| (s.writes.clone(), s.mark.clone()))
        .collect();
    assert_eq!(keys.len(), states.len(), "a state is listed twice");
    // The same seed gives the same states.
    let again: Vec<String> = crash_states(&log.entries, &opts)
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(
        again,
        states.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn specs_round_trip_and_bad_ones_are_refused() {
    for spec in ["-", "0", "0,1", "0-5", "0-2,4,6:3,7-9", "3:1,4:2"] {
        assert_eq!(format_spec(&parse_spec(spec).unwrap()), spec);
    }
    for spec in ["", "x", "3-1", "2,1", "1,1", "1:"] {
        assert!(
            matches!(parse_spec(spec), Err(Error::BadSpec { .. })),
            "{spec}"
        );
    }
}

#[test]
fn logs_that_are_not_whole_are_refused_with_the_reason() {
    let d = tmpdir("bad");
    let good = log_bytes(&sample());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("magic", {
            let mut b = good.clone();
            b[0] ^= 1;
            b
        }),
        ("version", {
            let mut b = good.clone();
            b[8] = 2;
            b
        }),
        ("sector size", {
            let mut b = good.clone();
            b[24..28].copy_from_slice(&100u32.to_le_bytes());
            b
        }),
        ("do not fit", {
            let mut b = good.clone();
            b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("past the end", good[..good.len() - SS as usize].to_vec()),
        ("mark of", {
            let mut b = good.clone();
            let at = (7 * SS + 24) as usize;
            b[at..at + 8].copy_from_slice(&9999u64.to_le_bytes());
            b
        }),
        ("shorter", good[..100].to_vec()),
    ];
    for (want, bytes) in cases {
        match Log::open(&write_log(&d, &bytes)) {
            Err(e @ Error::BadLog { .. }) => assert!(e.to_string().contains(want), "{want}: {e}"),
            Err(e) => panic!("{want}: {e}"),
            Ok(_) => panic!("{want}: accepted"),
        }
    }
}

#[test]
fn long_runs_of_adjacent_writes_are_sampled_and_everything_else_kept() {
    // A flush, 20 adjacent one-sector writes, one elsewhere, 3 adjacent.
    let mut reqs = vec![Req::Flush];
    reqs.extend((0..20).map(|i| w(100 + i, 1, 1)));
    reqs.push(w(5, 2, 1));
    reqs.extend((0..3).map(|i| w(300 + i, 3, 1)));
    let d = tmpdir("runs");
    let log = Log::open(&write_log(&d, &log_bytes(&reqs))).unwrap();
    assert!(thinned_prefixes(&log.entries, None).is_empty());
    let skipped = thinned_prefixes(&log.entries, Some(4));
    // The run is entries 1..=20: kept after its first (2) and last (21)
    // and 4 between; the short run and the lone write are kept whole.
    assert_eq!(skipped.len(), 20 - 6, "{skipped:?}");
    for kept in [0, 1, 2, 21, 22, 23, 24, 25] {
        assert!(!skipped.contains(&kept), "{kept} left out");
    }
    let opts = Options {
        subsets: 0,
        run_points: Some(4),
        ..Options::default()
    };
    let prefixes = crash_states(&log.entries, &opts)
        .iter()
        .filter(|s| s.kind == Kind::Prefix)
        .count();
    assert_eq!(
        prefixes,
        log.entries.len() + 1 - skipped.len() - 1,
        "the flush adds no new state"
    );
}

#[test]
fn every_write_at_risk_is_left_out_once_without_any_random_choice() {
    let d = tmpdir("all-but-one");
    let log = Log::open(&write_log(&d, &log_bytes(&sample()))).unwrap();
    let opts = Options {
        subsets: 0,
        seed: 7,
        mark_prefix: "km-".into(),
        run_points: None,
    };
    let states = crash_states(&log.entries, &opts);
    let has = |writes: &str, kind: Kind| {
        states
            .iter()
            .any(|s| format_spec(&s.writes) == writes && s.kind == kind)
    };
    // Before the flush, writes 0 and 1 are at risk: each one is left out
    // once (the later one on disk without the earlier is what a missing
    // flush between them shows).
    assert!(has("1", Kind::AllButOne), "{states:#?}");
    // (Write 0 alone is also a prefix, so it is listed as one.)
    assert!(has("0", Kind::Prefix), "{states:#?}");
    for s in states.iter().filter(|s| s.kind == Kind::AllButOne) {
        let (durable, optional) = durable_and_optional(&log.entries, s.after);
        assert_eq!(
            s.writes.len(),
            durable.len() + optional.len() - 1,
            "{}: not all but one",
            s.name
        );
        assert!(s.writes.iter().all(|a| a.sectors.is_none()), "{}", s.name);
    }
}
