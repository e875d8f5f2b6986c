//! The first-use decision against file-backed devices and the local key
//! store, which here stands for a key manager shared by two hosts: each
//! "host" is a `Volumes` with its own state directory, so a format record
//! of host A is not seen by host B, while the key manager's intent and
//! marker are.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::super::{EncryptionSpec, Failure, Provider, VolumeError, VolumeOptions, Volumes};
use crate::dm::CryptOptions;
use crate::keymgr::local::LocalKeyStore;
use crate::keymgr::{FormatIntent, Key, KeyId, KeyManager, RequestAuth};
use crate::luks::{self, FileDisk, FormatOptions, Header, KdfLimits, KdfPolicy, LuksVersion};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 32 * MIB;
const VID: &str = "0b4a2f3c-5d6e-4f70-8a9b-0c1d2e3f4a5b";

struct Fx {
    dir: tempfile::TempDir,
    keys: LocalKeyStore,
    key_id: KeyId,
    key: Key,
    dev: PathBuf,
    rt: tokio::runtime::Runtime,
}

fn setup() -> Fx {
    setup_sized(SIZE)
}

fn setup_sized(size: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let keys = LocalKeyStore::new(&dir.path().join("keys"), &dir.path().join("km-state"));
    let key_id = keys.create(256).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = rt
        .block_on(keys.fetch(&key_id, &RequestAuth::Service))
        .unwrap();
    let dev = dir.path().join("volume.img");
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&dev)
        .unwrap()
        .set_len(size)
        .unwrap();
    Fx {
        dir,
        keys,
        key_id,
        key,
        dev,
        rt,
    }
}

fn spec() -> EncryptionSpec {
    EncryptionSpec {
        provider: Some("luks2".into()),
        ..EncryptionSpec::default()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Fx {
    /// A host with its own state directory.
    fn host(&self, name: &str) -> Volumes<'_> {
        let state = self.dir.path().join(name);
        Volumes::new(
            &self.keys,
            VolumeOptions {
                state_dir: state.join("state"),
                run_dir: state.join("run"),
                max_argon2_memory_kib: 64 * 1024,
                detach_attempts: 1,
                detach_backoff: Duration::from_millis(1),
                crypt: CryptOptions::default(),
                format_intent_min_age: Duration::from_secs(600),
                device_open_timeout: Duration::from_secs(10),
            },
        )
    }

    /// The first-use step of an attach, its error named as the entry
    /// points name it.
    fn attach(&self, host: &Volumes<'_>) -> Result<(Header, bool), VolumeError> {
        let auth = RequestAuth::Service;
        self.rt
            .block_on(host.open_or_format(
                VID,
                &self.dev,
                Provider::Luks2,
                &spec(),
                &self.key_id,
                &self.key,
                &auth,
            ))
            .map(|(h, _, formatted)| (h, formatted))
            .map_err(VolumeError::naming(VID))
    }

    fn intent(&self, uuid: Uuid, age: u64) {
        let intent = FormatIntent {
            luks_uuid: uuid,
            started_at: now() - age,
            host: "host-a".into(),
        };
        self.rt
            .block_on(
                self.keys
                    .mark_formatting(&self.key_id, &RequestAuth::Service, &intent),
            )
            .unwrap();
    }

    fn stored_intent(&self) -> Option<FormatIntent> {
        self.rt
            .block_on(
                self.keys
                    .formatting_intent(&self.key_id, &RequestAuth::Service),
            )
            .unwrap()
    }

    fn marked(&self) -> bool {
        self.rt
            .block_on(
                self.keys
                    .is_marked_formatted(&self.key_id, &RequestAuth::Service),
            )
            .unwrap()
    }

    fn mark(&self) {
        self.rt
            .block_on(
                self.keys
                    .mark_formatted(&self.key_id, &RequestAuth::Service),
            )
            .unwrap();
    }

    fn disk(&self) -> FileDisk {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.dev)
            .unwrap();
        FileDisk::new(f, self.dev.display().to_string())
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(&self.dev).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// What host A's format with `uuid` leaves when it is cut after the
    /// keyslots and while both header copies are being written: the
    /// agent's own format, then both JSON areas torn.
    fn torn_format(&self, uuid: Uuid) {
        let mut opts =
            FormatOptions::new(LuksVersion::Luks2, 512, KdfPolicy::HighEntropyKey).unwrap();
        opts.uuid = Some(uuid);
        opts.key_id = Some(self.key_id.to_string());
        opts.sector_size = 4096;
        luks::format(&self.disk(), &opts, &self.key.passphrase()).unwrap();
        for copy in [0, luks::luks2::DEFAULT_HDR_SIZE] {
            self.write(copy + 4096 + 100, &[0u8; 2048]);
        }
        assert!(matches!(
            Header::read(&self.disk()),
            Err(luks::LuksError::InvalidHeader { .. })
        ));
    }

    /// The cut earlier: keyslot material written, no header yet.
    fn keyslots_only(&self) {
        self.write(
            2 * luks::luks2::DEFAULT_HDR_SIZE,
            crate::secret::SecretBytes::random(256 * 1024)
                .unwrap()
                .expose(),
        );
        assert!(matches!(
            Header::read(&self.disk()),
            Err(luks::LuksError::NotLuks { .. })
        ));
    }

    fn digest(&self) -> Vec<u8> {
        Sha256::digest(fs::read(&self.dev).unwrap()).to_vec()
    }

    /// The attach is refused with a reason containing every `words`, and
    /// not a byte of the device changed.
    fn assert_refused(&self, host: &Volumes<'_>, words: &[&str]) -> String {
        let before = self.digest();
        let e = match self.attach(host) {
            Ok(_) => panic!("the attach formatted"),
            Err(e) => e,
        };
        let text = format!("{}: {e:?}", crate::text::error_chain(&e));
        for w in words {
            assert!(text.contains(w), "{w:?} not in {text}");
        }
        assert!(
            !text.contains(&hex::encode(self.key.expose())),
            "key bytes in {text}"
        );
        assert_eq!(self.digest(), before, "the device changed");
        assert!(!self.marked());
        text
    }

    fn assert_formatted_with(&self, host: &Volumes<'_>, uuid: Uuid) {
        let (h, formatted) = self.attach(host).unwrap();
        assert!(formatted);
        assert_eq!(h.uuid(), uuid.hyphenated().to_string());
        assert!(self.marked());
        // It opens from scratch with the key, and the next attach (any
        // host) only opens it.
        let reread = Header::read(&self.disk()).unwrap();
        reread
            .unlock(
                &self.disk(),
                &self.key.passphrase(),
                None,
                &KdfLimits::default(),
            )
            .unwrap();
        let (_, again) = self.attach(&self.host("c")).unwrap();
        assert!(!again);
    }
}

#[test]
fn blank_device_formats_with_the_recorded_uuid() {
    let fx = setup();
    let a = fx.host("a");
    let (h, formatted) = fx.attach(&a).unwrap();
    assert!(formatted);
    let intent = fx.stored_intent().expect("no intent recorded");
    assert_eq!(h.uuid(), intent.luks_uuid.hyphenated().to_string());
    assert!(fx.marked());
    assert!(!a_record(&fx, "a").exists());
}

fn a_record(fx: &Fx, host: &str) -> PathBuf {
    fx.dir.path().join(host).join("state/formatting").join(VID)
}

#[test]
fn torn_header_with_an_old_intent_is_formatted_on_another_host() {
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.intent(u, 3600);
    fx.assert_formatted_with(&fx.host("b"), u);
}

#[test]
fn keyslots_without_header_with_an_old_intent_are_formatted_on_another_host() {
    let fx = setup();
    let u = Uuid::new_v4();
    fx.keyslots_only();
    fx.intent(u, 3600);
    fx.assert_formatted_with(&fx.host("b"), u);
}

#[test]
fn torn_header_without_intent_is_refused_on_another_host() {
    let fx = setup();
    fx.torn_format(Uuid::new_v4());
    let before = fx.digest();
    assert!(fx.attach(&fx.host("b")).is_err());
    assert_eq!(fx.digest(), before);
    let fx = setup();
    fx.keyslots_only();
    fx.assert_refused(&fx.host("b"), &["not blank"]);
}

#[test]
fn a_young_intent_is_refused_and_names_host_and_time() {
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.intent(u, 30);
    let e = fx.assert_refused(
        &fx.host("b"),
        &[VID, fx.key_id.as_str(), "host-a", "may still be running"],
    );
    assert!(e.contains("FormatRefused"), "{e}");
    assert!(e.contains(&fx.dev.display().to_string()), "{e}");
    // A blank device is not raced either.
    let fx = setup();
    fx.intent(Uuid::new_v4(), 0);
    fx.assert_refused(&fx.host("b"), &["may still be running"]);
    // An intent from the future counts as new.
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.rt
        .block_on(fx.keys.mark_formatting(
            &fx.key_id,
            &RequestAuth::Service,
            &FormatIntent {
                luks_uuid: u,
                started_at: u64::MAX,
                host: "h".into(),
            },
        ))
        .unwrap();
    fx.assert_refused(&fx.host("b"), &["may still be running"]);
}

#[test]
fn an_intent_for_another_uuid_is_refused() {
    let fx = setup();
    let on_disk = Uuid::new_v4();
    fx.torn_format(on_disk);
    fx.intent(Uuid::new_v4(), 3600);
    fx.assert_refused(
        &fx.host("b"),
        &["carries UUID", &on_disk.hyphenated().to_string()],
    );
}

#[test]
fn other_signatures_or_data_past_the_header_are_refused() {
    // An ext4 superblock magic inside the header area.
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.write(0x438, &[0x53, 0xef]);
    fx.intent(u, 3600);
    fx.assert_refused(&fx.host("b"), &["ext"]);
    // Ciphertext at the start of the data segment: the volume was used.
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.write(16 * MIB + 8192, b"\x01");
    fx.intent(u, 3600);
    fx.assert_refused(&fx.host("b"), &["non-zero data"]);
    // And at the end of the device.
    let fx = setup();
    let u = Uuid::new_v4();
    fx.keyslots_only();
    fx.write(SIZE - 1, b"\x01");
    fx.intent(u, 3600);
    fx.assert_refused(&fx.host("b"), &["non-zero data"]);
}

#[test]
fn a_formatted_marker_wins_over_an_intent() {
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.intent(u, 3600);
    fx.mark();
    let before = fx.digest();
    assert!(fx.attach(&fx.host("b")).is_err());
    assert_eq!(fx.digest(), before);
    let fx = setup();
    fx.keyslots_only();
    fx.intent(Uuid::new_v4(), 3600);
    fx.mark();
    let before = fx.digest();
    let e = fx.attach(&fx.host("b")).unwrap_err().to_string();
    assert!(e.contains("refused") || e.contains("format"), "{e}");
    assert_eq!(fx.digest(), before);
}

#[test]
fn a_local_redo_keeps_the_intent_uuid() {
    // Host A recorded its format and was cut after the intent: its own
    // next attach redoes it with the same UUID, so another host can still
    // account for whatever that attempt leaves.
    let fx = setup();
    let a = fx.host("a");
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.intent(u, 5);
    let state = fx.dir.path().join("a/state");
    crate::volume::guard::FormatRecords::new(&state)
        .record(VID, "dev", &u)
        .unwrap();
    fx.assert_formatted_with(&a, u);
    assert_eq!(fx.stored_intent().unwrap().luks_uuid, u);
}

#[test]
fn format_options_predict_the_data_offset() {
    let fx = setup();
    for (version, bits) in [
        (LuksVersion::Luks1, 256),
        (LuksVersion::Luks1, 512),
        (LuksVersion::Luks2, 512),
    ] {
        let opts = FormatOptions::new(version, bits, KdfPolicy::HighEntropyKey).unwrap();
        let (h, _) = luks::format(&fx.disk(), &opts, &fx.key.passphrase()).unwrap();
        assert_eq!(opts.data_offset(), h.data_offset(), "{version:?} {bits}");
    }
}

/// An ext4 superblock magic and file data past the header area.
fn put_ext4(fx: &Fx) {
    fx.write(0x438, &[0x53, 0xef]);
    fx.write(20 * MIB, b"the customer's data");
}

#[test]
fn a_too_small_device_records_nothing_and_the_next_device_is_not_formatted_over() {
    // The reproduction: attach on a 1 MiB device fails as too small; the
    // same volume on a device holding ext4 must be refused, untouched.
    let fx = setup_sized(MIB);
    let a = fx.host("a");
    let e = fx.attach(&a).unwrap_err();
    assert!(
        matches!(
            e.failure,
            Failure::Luks {
                source: luks::LuksError::TooSmall { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(!a_record(&fx, "a").exists(), "a record was left");
    assert!(fx.stored_intent().is_none(), "an intent was left");
    fs::remove_file(&fx.dev).unwrap();
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&fx.dev)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    put_ext4(&fx);
    let text = fx.assert_refused(&a, &["FormatRefused", "not blank", "ext"]);
    assert!(text.contains(&fx.dev.display().to_string()), "{text}");
    // And a blank device there formats at once: nothing of the failed
    // attempt holds it off.
    fs::remove_file(&fx.dev).unwrap();
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&fx.dev)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let (_, formatted) = fx.attach(&a).unwrap();
    assert!(formatted);
}

#[test]
fn a_stale_record_and_intent_never_skip_the_device_checks() {
    // What an earlier version left after a failure before its first
    // write: this host's record and a young intent with the same UUID.
    // The device now behind the volume id holds data, or a LUKS header of
    // another volume, or random bytes: each is refused and left as it is.
    for content in ["ext4", "random", "foreign luks"] {
        let fx = setup();
        let u = Uuid::new_v4();
        match content {
            "ext4" => put_ext4(&fx),
            "random" => fx.write(
                0,
                crate::secret::SecretBytes::random(64 * 1024)
                    .unwrap()
                    .expose(),
            ),
            _ => fx.torn_format(Uuid::new_v4()),
        }
        fx.intent(u, 5);
        let state = fx.dir.path().join("a/state");
        crate::volume::guard::FormatRecords::new(&state)
            .record(VID, "/dev/other", &u)
            .unwrap();
        fx.assert_refused(&fx.host("a"), &["FormatRefused", "cannot be redone"]);
        // An old intent changes nothing: the device must still prove it.
        fx.intent(u, 3600);
        fx.assert_refused(&fx.host("a"), &["FormatRefused", "cannot be redone"]);
        // Nor does a record of an older version, without a UUID.
        let fx2 = setup();
        put_ext4(&fx2);
        let state = fx2.dir.path().join("a/state/formatting");
        fs::create_dir_all(&state).unwrap();
        fs::write(state.join(VID), "/dev/other\n").unwrap();
        fx2.assert_refused(&fx2.host("a"), &["not blank", "ext"]);
    }
}

#[test]
fn a_failed_intent_write_takes_back_the_record_and_the_intent() {
    // The key manager cannot store the intent: a file stands where its
    // directory goes.
    let fx = setup();
    let intents = fx.dir.path().join("km-state/format-intents");
    fs::create_dir_all(intents.parent().unwrap()).unwrap();
    fs::write(&intents, b"in the way").unwrap();
    let a = fx.host("a");
    let before = fx.digest();
    let e = fx.attach(&a).unwrap_err();
    assert!(matches!(e.failure, Failure::Key { .. }), "{e}");
    assert_eq!(fx.digest(), before, "the device changed");
    assert!(!a_record(&fx, "a").exists(), "the record was left");
    // With the key manager back, the same host formats at once.
    fs::remove_file(&intents).unwrap();
    assert!(fx.stored_intent().is_none(), "the intent was left");
    let (_, formatted) = fx.attach(&a).unwrap();
    assert!(formatted);
}

#[test]
fn this_hosts_own_interrupted_format_is_redone_without_waiting() {
    // Cut after the header was torn (the write started): the record and
    // the intent name the same UUID, so this host redoes it at once, while
    // another host waits for the intent's age.
    let fx = setup();
    let u = Uuid::new_v4();
    fx.torn_format(u);
    fx.intent(u, 5);
    fx.assert_refused(&fx.host("b"), &["may still be running"]);
    let state = fx.dir.path().join("a/state");
    crate::volume::guard::FormatRecords::new(&state)
        .record(VID, "dev", &u)
        .unwrap();
    fx.assert_formatted_with(&fx.host("a"), u);
}
