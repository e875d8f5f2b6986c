//! Password-based key derivation for keyslots (PBKDF2, Argon2i, Argon2id),
//! the limits that keep a hostile header from exhausting the host, and the
//! benchmarks that pick cryptsetup-strength parameters.

use std::time::{Duration, Instant};

use super::argon2_memory::Argon2Memory;
use super::hash::HashAlg;
use crate::secret::SecretBytes;

/// Argon2 variant named by a LUKS2 keyslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Argon2Variant {
    /// `argon2i`.
    Argon2i,
    /// `argon2id`.
    Argon2id,
}

impl Argon2Variant {
    /// The name as the LUKS2 JSON spells it.
    pub fn name(self) -> &'static str {
        match self {
            Argon2Variant::Argon2i => "argon2i",
            Argon2Variant::Argon2id => "argon2id",
        }
    }
}

/// A keyslot's KDF and its cost parameters (salt kept separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// Underlying hash.
        hash: HashAlg,
        /// Iteration count.
        iterations: u32,
    },
    /// Argon2 (version 0x13).
    Argon2 {
        /// i or id.
        variant: Argon2Variant,
        /// Passes over memory.
        time: u32,
        /// Memory in KiB.
        memory_kib: u32,
        /// Lanes.
        parallel: u32,
    },
}

/// Upper bounds on the work a header may ask for before we even try its
/// passphrase. The defaults are cryptsetup's own maxima; a smaller memory
/// bound can come from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfLimits {
    /// Largest accepted PBKDF2 iteration count.
    pub max_pbkdf2_iterations: u32,
    /// Largest accepted Argon2 memory cost in KiB.
    pub max_argon2_memory_kib: u32,
    /// Largest accepted Argon2 time cost.
    pub max_argon2_time: u32,
    /// Largest accepted Argon2 lane count.
    pub max_argon2_parallel: u32,
    /// Longest a single KDF (a keyslot's or a digest's) may be estimated to
    /// run on this machine before it is refused without running
    /// ([`Kdf::check_time`]); `None`: no bound.
    pub max_time: Option<Duration>,
}

impl Default for KdfLimits {
    fn default() -> Self {
        KdfLimits {
            max_pbkdf2_iterations: u32::MAX,
            max_argon2_memory_kib: 4 * 1024 * 1024,
            max_argon2_time: u32::MAX,
            max_argon2_parallel: 16,
            max_time: Some(unlock_time_limit()),
        }
    }
}

/// The bound on one KDF's estimated run time when the configuration sets
/// none: cryptsetup's defaults take 2 s on the machine that formatted, so
/// a minute leaves room for a much slower machine.
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(60);

static UNLOCK_TIME_LIMIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets this process's bound on one KDF's estimated run time (`[kdf]
/// max_unlock_seconds`); the first call wins. This layer only offers the
/// hook: the configuration decides.
pub fn set_unlock_time_limit(limit: Duration) {
    let _ = UNLOCK_TIME_LIMIT.set(limit);
}

/// This process's bound on one KDF's estimated run time.
pub fn unlock_time_limit() -> Duration {
    UNLOCK_TIME_LIMIT.get().copied().unwrap_or(DEFAULT_MAX_TIME)
}

/// How fast this machine runs the KDFs, measured once per process and
/// hash: seconds per PBKDF2 iteration (one output block), and seconds per
/// KiB of one Argon2 pass over one lane.
mod speed {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use super::super::hash::HashAlg;

    /// Measurements last at least this long, so that timer resolution and
    /// a stray context switch do not dominate.
    const MIN_SAMPLE: Duration = Duration::from_millis(8);

    pub fn pbkdf2_iteration_secs(hash: HashAlg) -> f64 {
        static CACHE: OnceLock<Mutex<HashMap<&'static str, f64>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(v) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash.name())
        {
            return *v;
        }
        let out_len = hash.output_len();
        let mut out = vec![0u8; out_len];
        let mut iterations: u32 = 1024;
        let per = loop {
            let t = Instant::now();
            hash.pbkdf2(
                b"luks-agent calibration",
                b"salt salt salt salt",
                iterations,
                &mut out,
            );
            let took = t.elapsed();
            if took >= MIN_SAMPLE || iterations >= 1 << 24 {
                break took.as_secs_f64() / f64::from(iterations);
            }
            iterations = iterations.saturating_mul(4);
        };
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash.name(), per);
        per
    }

    pub fn argon2_kib_pass_secs() -> f64 {
        static CACHE: OnceLock<f64> = OnceLock::new();
        *CACHE.get_or_init(|| {
            let mut memory_kib: u32 = 1024;
            loop {
                let Ok(params) = argon2::Params::new(memory_kib, 1, 1, Some(32)) else {
                    return 1e-6;
                };
                let a = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = [0u8; 32];
                let t = Instant::now();
                if a.hash_password_into(b"luks-agent calibration", b"salt salt salt salt", &mut out)
                    .is_err()
                {
                    return 1e-6;
                }
                let took = t.elapsed();
                if took >= MIN_SAMPLE || memory_kib >= 64 * 1024 {
                    return took.as_secs_f64() / f64::from(memory_kib);
                }
                memory_kib *= 4;
            }
        })
    }
}

/// Why a KDF could not run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KdfError {
    /// The parameters are outside the accepted limits or invalid for the
    /// algorithm.
    #[error("KDF parameters refused: {0}")]
    Refused(String),
    /// The KDF would run longer on this machine than the bound allows.
    #[error(
        "{} would take about {estimate_secs} s on this machine, more than the {limit_secs} s allowed ([kdf] max_unlock_seconds); refused without running",
        .kdf.describe()
    )]
    TooSlow {
        /// The parameters (boxed: errors stay small).
        kdf: Box<Kdf>,
        /// The estimated run time in seconds (rounded up).
        estimate_secs: u32,
        /// The bound in seconds.
        limit_secs: u32,
    },
    /// Argon2 would need more memory than the limit allows or the machine
    /// has available.
    #[error("argon2 needs {needed_kib} KiB of memory, more than the {limit_kib} KiB allowed")]
    Memory {
        /// Memory cost of the keyslot.
        needed_kib: u32,
        /// The limit it exceeds.
        limit_kib: u64,
    },
}

impl Kdf {
    /// Checks the parameters against `limits` and the algorithms' rules.
    pub fn check(&self, limits: &KdfLimits) -> Result<(), KdfError> {
        match *self {
            Kdf::Pbkdf2 { iterations, .. } => {
                if iterations == 0 {
                    return Err(KdfError::Refused("pbkdf2 iterations are 0".into()));
                }
                if iterations > limits.max_pbkdf2_iterations {
                    return Err(KdfError::Refused(format!(
                        "pbkdf2 iterations {iterations} exceed the limit {}",
                        limits.max_pbkdf2_iterations
                    )));
                }
            }
            Kdf::Argon2 {
                time,
                memory_kib,
                parallel,
                ..
            } => {
                if time == 0 || parallel == 0 || memory_kib < 8 * parallel {
                    return Err(KdfError::Refused(format!(
                        "argon2 parameters time={time} memory={memory_kib} parallel={parallel} are invalid"
                    )));
                }
                let available = available_memory_kib();
                if memory_kib > limits.max_argon2_memory_kib || u64::from(memory_kib) > available {
                    return Err(KdfError::Memory {
                        needed_kib: memory_kib,
                        limit_kib: u64::from(limits.max_argon2_memory_kib).min(available),
                    });
                }
                if time > limits.max_argon2_time || parallel > limits.max_argon2_parallel {
                    return Err(KdfError::Refused(format!(
                        "argon2 parameters time={time} memory={memory_kib} KiB parallel={parallel} exceed the limits \
                         (time {}, memory {} KiB, parallel {})",
                        limits.max_argon2_time,
                        limits.max_argon2_memory_kib,
                        limits.max_argon2_parallel
                    )));
                }
            }
        }
        Ok(())
    }

    /// The parameters as a header dump shows them.
    pub fn describe(&self) -> String {
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                format!("pbkdf2-{} with {iterations} iterations", hash.name())
            }
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                parallel,
            } => format!(
                "{} with time {time}, memory {memory_kib} KiB, {parallel} lanes",
                match variant {
                    Argon2Variant::Argon2i => "argon2i",
                    Argon2Variant::Argon2id => "argon2id",
                }
            ),
        }
    }

    /// How long deriving `out_len` bytes takes on this machine, estimated
    /// from its parameters and this machine's measured speed (PBKDF2 runs
    /// its iterations once per output block of the hash; Argon2 fills its
    /// memory `time` times, its lanes in parallel on up to as many CPUs).
    pub fn estimated_time(&self, out_len: usize) -> Duration {
        let secs = match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                let blocks = out_len.div_ceil(hash.output_len()).max(1) as f64;
                blocks * f64::from(iterations) * speed::pbkdf2_iteration_secs(hash)
            }
            Kdf::Argon2 {
                time,
                memory_kib,
                parallel,
                ..
            } => {
                let cpus = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1);
                let ways = f64::from(parallel.clamp(1, cpus.max(1)));
                f64::from(time) * f64::from(memory_kib) * speed::argon2_kib_pass_secs() / ways
            }
        };
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }

    /// Refuses, without running it, a KDF whose estimated run time for
    /// `out_len` bytes exceeds `limits.max_time`.
    pub fn check_time(&self, out_len: usize, limits: &KdfLimits) -> Result<(), KdfError> {
        let Some(max) = limits.max_time else {
            return Ok(());
        };
        let estimate = self.estimated_time(out_len);
        if estimate > max {
            let secs = |d: Duration| {
                u32::try_from(d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)))
                    .unwrap_or(u32::MAX)
            };
            return Err(KdfError::TooSlow {
                kdf: Box::new(*self),
                estimate_secs: secs(estimate),
                limit_secs: u32::try_from(max.as_secs()).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    /// Derives `out_len` bytes from `password` and `salt`.
    pub fn derive(
        &self,
        password: &[u8],
        salt: &[u8],
        out_len: usize,
    ) -> Result<SecretBytes, KdfError> {
        let mut out = SecretBytes::zeroed(out_len);
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                hash.pbkdf2(password, salt, iterations, out.expose_mut())
            }
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                parallel,
            } => {
                // Held for the whole computation: the memory is in use
                // exactly while argon2 fills it.
                let _permit = memory_budget().map(|b| b.acquire(u64::from(memory_kib)));
                let params = argon2::Params::new(memory_kib, time, parallel, Some(out_len))
                    .map_err(|e| KdfError::Refused(format!("argon2: {e}")))?;
                let algorithm = match variant {
                    Argon2Variant::Argon2i => argon2::Algorithm::Argon2i,
                    Argon2Variant::Argon2id => argon2::Algorithm::Argon2id,
                };
                let mut memory =
                    Argon2Memory::new(params.block_count()).map_err(|_| KdfError::Memory {
                        needed_kib: memory_kib,
                        limit_kib: available_memory_kib(),
                    })?;
                argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
                    .hash_password_into_with_memory(password, salt, out.expose_mut(), &mut memory)
                    .map_err(|e| KdfError::Refused(format!("argon2: {e}")))?;
            }
        }
        Ok(out)
    }
}

/// A budget for the memory of Argon2 runs that happen at the same time, so
/// that many concurrent unlocks or formats (each asking for up to a few
/// GiB) cannot exhaust the host together. A counting semaphore weighted in
/// KiB; waiters are served in arrival order so a large request is not
/// starved by a stream of small ones. A request larger than the whole
/// budget runs alone (the per-header cap is [`KdfLimits`]' job).
///
/// It blocks the calling thread: KDF work runs on threads meant for
/// blocking work, never on an async executor.
#[derive(Debug)]
pub struct MemoryBudget {
    total_kib: u64,
    state: std::sync::Mutex<BudgetState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct BudgetState {
    in_use_kib: u64,
    next_ticket: u64,
    serving: u64,
}

/// Memory taken from a [`MemoryBudget`]; given back on drop.
#[derive(Debug)]
pub struct BudgetPermit<'a> {
    budget: &'a MemoryBudget,
    kib: u64,
}

impl MemoryBudget {
    /// A budget of `total_kib` KiB (at least 1).
    pub fn new(total_kib: u64) -> Self {
        MemoryBudget {
            total_kib: total_kib.max(1),
            state: std::sync::Mutex::new(BudgetState::default()),
            changed: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        // The state stays consistent even if a holder panicked: every
        // update is a single arithmetic step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `kib` (capped at the total) fits, then takes it.
    pub fn acquire(&self, kib: u64) -> BudgetPermit<'_> {
        let kib = kib.min(self.total_kib);
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        while st.serving != ticket || st.in_use_kib + kib > self.total_kib {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.in_use_kib += kib;
        st.serving += 1;
        drop(st);
        // The next ticket may fit too.
        self.changed.notify_all();
        BudgetPermit { budget: self, kib }
    }

    /// The whole budget in KiB.
    pub fn total_kib(&self) -> u64 {
        self.total_kib
    }

    /// KiB held by running KDFs now.
    pub fn in_use_kib(&self) -> u64 {
        self.lock().in_use_kib
    }

    /// Callers waiting for memory now.
    pub fn waiting(&self) -> u64 {
        let st = self.lock();
        st.next_ticket - st.serving
    }
}

impl Drop for BudgetPermit<'_> {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        st.in_use_kib -= self.kib;
        drop(st);
        self.budget.changed.notify_all();
    }
}

static MEMORY_BUDGET: std::sync::OnceLock<MemoryBudget> = std::sync::OnceLock::new();

/// Puts every Argon2 run of this process under a budget of `total_kib`.
/// The long-running agent sets it once at start; the one-shot commands
/// leave it unset. A second call keeps the first budget and returns it.
/// This layer only offers the hook: it never decides the size.
pub fn install_memory_budget(total_kib: u64) -> &'static MemoryBudget {
    MEMORY_BUDGET.get_or_init(|| MemoryBudget::new(total_kib))
}

/// The process-wide budget, when one is installed.
pub fn memory_budget() -> Option<&'static MemoryBudget> {
    MEMORY_BUDGET.get()
}

/// Memory the kernel reports as available (`MemAvailable`), so that a
/// memory-hard KDF fails with an error instead of waking the OOM killer.
fn available_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(u64::MAX)
}

/// PBKDF2 iterations that take about `target` on this machine, never fewer
/// than `min` (cryptsetup's benchmark, in the same spirit).
pub fn benchmark_pbkdf2(hash: HashAlg, key_len: usize, target: Duration, min: u32) -> u32 {
    let mut out = vec![0u8; key_len];
    let mut iterations: u32 = 1000;
    loop {
        let start = Instant::now();
        hash.pbkdf2(b"benchmark passphrase", &[0u8; 32], iterations, &mut out);
        let took = start.elapsed();
        if took >= Duration::from_millis(50) || iterations >= u32::MAX / 2 {
            let per_sec = f64::from(iterations) / took.as_secs_f64().max(1e-9);
            let want = per_sec * target.as_secs_f64();
            return (want.min(f64::from(u32::MAX)) as u32).max(min);
        }
        iterations = iterations.saturating_mul(4);
    }
}

/// Argon2 parameters that take about `target` with at most `max_memory_kib`
/// of memory and `parallel` lanes: memory first (as cryptsetup does), then
/// time cost, never below time 4 and 32 MiB.
pub fn benchmark_argon2(
    variant: Argon2Variant,
    key_len: usize,
    target: Duration,
    max_memory_kib: u32,
    parallel: u32,
) -> Result<Kdf, KdfError> {
    const MIN_MEMORY_KIB: u32 = 32 * 1024;
    const MIN_TIME: u32 = 4;
    let memory = max_memory_kib.max(MIN_MEMORY_KIB);
    let probe = Kdf::Argon2 {
        variant,
        time: 1,
        memory_kib: memory,
        parallel,
    };
    let start = Instant::now();
    probe.derive(b"benchmark passphrase", &[0u8; 32], key_len)?;
    let one_pass = start.elapsed().as_secs_f64().max(1e-6);
    let passes = target.as_secs_f64() / one_pass;
    let (time, memory_kib) = if passes >= f64::from(MIN_TIME) {
        (passes.min(f64::from(u32::MAX)) as u32, memory)
    } else {
        let scaled = f64::from(memory) * passes / f64::from(MIN_TIME);
        (MIN_TIME, (scaled as u32).clamp(MIN_MEMORY_KIB, memory))
    };
    Ok(Kdf::Argon2 {
        variant,
        time,
        memory_kib,
        parallel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_rfc9106_shape() {
        // Argon2id with the parameters cryptsetup's tests use is deterministic.
        let kdf = Kdf::Argon2 {
            variant: Argon2Variant::Argon2id,
            time: 4,
            memory_kib: 32,
            parallel: 1,
        };
        let a = kdf.derive(b"pw", b"saltsaltsaltsalt", 32).unwrap();
        let b = kdf.derive(b"pw", b"saltsaltsaltsalt", 32).unwrap();
        assert_eq!(a.expose(), b.expose());
        let c = kdf.derive(b"px", b"saltsaltsaltsalt", 32).unwrap();
        assert_ne!(a.expose(), c.expose());
    }

    #[test]
    fn memory_budget_bounds_concurrent_use_and_serves_in_order() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let budget = Arc::new(MemoryBudget::new(100));
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (budget, peak) = (budget.clone(), peak.clone());
                std::thread::spawn(move || {
                    // 30, 40 or 200 (capped at 100: runs alone).
                    let want = [30, 40, 200][i % 3];
                    let _p = budget.acquire(want);
                    let now = budget.in_use_kib();
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(now <= 100, "{now} KiB in use");
                    std::thread::sleep(Duration::from_millis(20));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.in_use_kib(), 0);
        assert_eq!(budget.waiting(), 0);
        assert!(peak.load(Ordering::SeqCst) <= 100);
        // Nothing waits while it fits; a full budget makes the next wait.
        let a = budget.acquire(60);
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = budget.clone();
        let waiter = std::thread::spawn(move || {
            let _p = b2.acquire(50);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(budget.waiting(), 1);
        drop(a);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        waiter.join().unwrap();
    }

    #[test]
    fn argon2_runs_draw_from_the_installed_budget() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        // Process-wide: other tests' Argon2 runs share it, which only
        // makes them wait their turn.
        let budget = install_memory_budget(48 * 1024);
        let seen = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    let now = budget.in_use_kib();
                    assert!(now <= budget.total_kib(), "{now} KiB in use");
                    seen.fetch_max(now, Ordering::SeqCst);
                    std::thread::yield_now();
                }
            });
            let runs: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        Kdf::Argon2 {
                            variant: Argon2Variant::Argon2id,
                            time: 2,
                            memory_kib: 32 * 1024,
                            parallel: 1,
                        }
                        .derive(b"pw", b"saltsaltsaltsalt", 32)
                        .unwrap()
                    })
                })
                .collect();
            for r in runs {
                r.join().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        // Two 32 MiB runs never fit in 48 MiB together; each was counted.
        assert!(seen.load(Ordering::SeqCst) >= 32 * 1024);
    }

    #[test]
    fn limits_refuse_hostile_costs() {
        let limits = KdfLimits::default();
        let huge = Kdf::Argon2 {
            variant: Argon2Variant::Argon2id,
            time: 4,
            memory_kib: u32::MAX,
            parallel: 4,
        };
        assert!(huge.check(&limits).is_err());
        assert!(
            Kdf::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 0
            }
            .check(&limits)
            .is_err()
        );
        let tight = KdfLimits {
            max_pbkdf2_iterations: 10,
            ..limits
        };
        assert!(
            Kdf::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 11
            }
            .check(&tight)
            .is_err()
        );
        assert!(
            Kdf::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 10
            }
            .check(&tight)
            .is_ok()
        );
    }
}
