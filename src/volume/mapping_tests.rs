//! Settling, undo and rollback of mappings against a recording fake of
//! device-mapper (the seam `dm::Mapper`): what the orchestration asks the
//! kernel to do when it finds a half-made mapping, when repointing the
//! device path fails after the mapping exists, and at detach. The guest
//! scripts (`tests/vm/kill_format.sh`, `tests/vm/rollback.sh`) prove the
//! same with real dm-crypt.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::dm::{CryptOptions, CryptTarget, Device, DmError, Mapper, MappingInfo, Sectors};
use crate::keymgr::local::LocalKeyStore;
use crate::secret::{SecretBytes, VolumeKey};

/// A device-mapper that records every call and keeps mappings in memory.
#[derive(Default)]
struct Recording {
    calls: RefCell<Vec<String>>,
    mappings: RefCell<BTreeMap<String, MappingInfo>>,
    fail_remove: Cell<bool>,
}

impl Recording {
    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
    fn log(&self, what: String) {
        self.calls.borrow_mut().push(what);
    }
    fn put(&self, info: MappingInfo) {
        self.mappings.borrow_mut().insert(info.name.clone(), info);
    }
}

fn mapping(name: &str, uuid: &str, live_table: bool, suspended: bool) -> MappingInfo {
    MappingInfo {
        name: name.into(),
        uuid: uuid.into(),
        device: Device {
            major: 253,
            minor: 0,
        },
        open_count: 0,
        live_table,
        suspended,
    }
}

impl Mapper for Recording {
    fn info(&self, name: &str) -> Result<Option<MappingInfo>, DmError> {
        Ok(self.mappings.borrow().get(name).cloned())
    }
    fn create_crypt(
        &self,
        name: &str,
        uuid: &str,
        _target: &CryptTarget,
        _key: &VolumeKey,
        _read_only: bool,
    ) -> Result<MappingInfo, DmError> {
        self.log(format!("create {name}"));
        let m = mapping(name, uuid, true, false);
        self.put(m.clone());
        Ok(m)
    }
    fn reload_crypt(&self, name: &str, _: &CryptTarget, _: &VolumeKey) -> Result<(), DmError> {
        self.log(format!("reload {name}"));
        Ok(())
    }
    fn ensure_node(&self, info: &MappingInfo) -> Result<(), DmError> {
        self.log(format!("node {}", info.name));
        Ok(())
    }
    fn resume(&self, name: &str) -> Result<Option<MappingInfo>, DmError> {
        self.log(format!("resume {name}"));
        let mut maps = self.mappings.borrow_mut();
        Ok(maps.get_mut(name).map(|m| {
            m.suspended = false;
            m.clone()
        }))
    }
    fn remove(&self, name: &str, attempts: u32, _: Duration) -> Result<bool, DmError> {
        self.log(format!("remove {name}"));
        if self.fail_remove.get() {
            return Err(DmError::Busy {
                name: name.into(),
                attempts,
            });
        }
        Ok(self.mappings.borrow_mut().remove(name).is_some())
    }
}

struct Fx {
    dir: tempfile::TempDir,
    keys: LocalKeyStore,
    dm: Recording,
}

fn setup() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let keys = LocalKeyStore::new(&dir.path().join("keys"), &dir.path().join("state"));
    Fx {
        dir,
        keys,
        dm: Recording::default(),
    }
}

impl Fx {
    fn volumes(&self) -> Volumes<'_> {
        Volumes::new(
            &self.keys,
            VolumeOptions {
                state_dir: self.dir.path().join("state"),
                run_dir: self.dir.path().join("run"),
                max_argon2_memory_kib: 64 * 1024,
                detach_attempts: 2,
                detach_backoff: Duration::from_millis(1),
                crypt: CryptOptions::default(),
                format_intent_min_age: Duration::from_secs(600),
                device_open_timeout: Duration::from_secs(10),
            },
        )
        .with_mapper(&self.dm)
    }

    /// An os-brick style link to a stand-in device.
    fn link(&self, name: &str) -> (PathBuf, PathBuf) {
        let target = self.dir.path().join(format!("{name}-device"));
        std::fs::write(&target, b"").unwrap();
        let link = self.dir.path().join(format!("os-brick+{name}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        (link, target)
    }
}

fn target() -> CryptTarget {
    CryptTarget {
        cipher: "aes-xts-plain64".into(),
        key_bytes: 64,
        key_description: "luks-agent:test".into(),
        iv_offset: 0,
        device: Device { major: 7, minor: 0 },
        offset: Sectors(32768),
        length: Sectors(1024),
        options: CryptOptions::default(),
    }
}

fn key() -> VolumeKey {
    VolumeKey::new(SecretBytes::random(64).unwrap())
}

const UUID: &str = "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-crypt-x";

#[test]
fn a_mapping_left_without_a_table_is_removed_to_be_made_again() {
    let fx = setup();
    let m = mapping("crypt-x", UUID, false, false);
    fx.dm.put(m.clone());
    let settled = fx.volumes().settle_existing("v1", &fx.dm, m).unwrap();
    assert!(settled.is_none());
    assert_eq!(fx.dm.calls(), ["remove crypt-x"]);
}

#[test]
fn a_suspended_mapping_is_resumed_and_a_live_one_gets_its_node() {
    let fx = setup();
    let m = mapping("crypt-x", UUID, true, true);
    fx.dm.put(m.clone());
    let settled = fx.volumes().settle_existing("v1", &fx.dm, m).unwrap();
    assert!(settled.is_some_and(|m| !m.suspended));
    let live = mapping("crypt-y", UUID, true, false);
    fx.dm.put(live.clone());
    let settled = fx.volumes().settle_existing("v1", &fx.dm, live).unwrap();
    assert_eq!(settled.map(|m| m.name), Some("crypt-y".into()));
    assert_eq!(fx.dm.calls(), ["resume crypt-x", "node crypt-y"]);
}

#[test]
fn a_half_made_mapping_that_is_not_ours_is_left_alone() {
    let fx = setup();
    let m = mapping("crypt-x", "LVM-something", false, false);
    fx.dm.put(m.clone());
    let e = fx.volumes().settle_existing("v1", &fx.dm, m).unwrap_err();
    assert!(matches!(e, Failure::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("not a crypt mapping"), "{e}");
    assert!(fx.dm.calls().is_empty(), "{:?}", fx.dm.calls());
}

/// A link whose temporary name is taken by a directory cannot be
/// repointed (as root, permissions would not stop it).
fn block_repointing(link: &Path) {
    let name = link.file_name().unwrap().to_string_lossy().into_owned();
    let tmp = link.with_file_name(format!(".{name}.luks-agent-tmp"));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("occupied"), b"").unwrap();
}

#[test]
fn a_failed_repointing_rolls_the_mapping_and_record_back() {
    let fx = setup();
    let (link, device) = fx.link("v1");
    block_repointing(&link);
    let v = fx.volumes();
    let e = v
        .map("v1", &fx.dm, &link, "crypt-x", UUID, &target(), key())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Failure::Io {
                op: FileOp::Repointing,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(fx.dm.calls(), ["create crypt-x", "remove crypt-x"]);
    assert!(fx.dm.info("crypt-x").unwrap().is_none());
    assert_eq!(std::fs::read_link(&link).unwrap(), device);
    assert!(v.read_record("v1").is_none(), "attach record left");
}

#[test]
fn a_failed_rollback_reports_the_cause_and_its_own_failure() {
    let fx = setup();
    let (link, _) = fx.link("v1");
    block_repointing(&link);
    fx.dm.fail_remove.set(true);
    let e = fx
        .volumes()
        .map("v1", &fx.dm, &link, "crypt-x", UUID, &target(), key())
        .unwrap_err();
    let Failure::Rollback { cause, rollback } = &e else {
        panic!("not a rollback failure: {e}");
    };
    assert!(matches!(**cause, Failure::Io { .. }), "{cause}");
    assert!(
        matches!(
            **rollback,
            Failure::Dm {
                source: DmError::Busy { .. },
                ..
            }
        ),
        "{rollback}"
    );
    let text = e.to_string();
    assert!(
        text.contains("repointing") && text.contains("rollback also failed"),
        "{text}"
    );
}

#[test]
fn detach_removes_the_mapping_restores_the_link_and_is_idempotent() {
    let fx = setup();
    let (link, device) = fx.link("v1");
    let v = fx.volumes();
    let attached = v
        .map("v1", &fx.dm, &link, "crypt-x", UUID, &target(), key())
        .unwrap();
    assert_eq!(attached.action, Action::Created);
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new(crate::dm::MAPPER_DIR).join("crypt-x")
    );
    let d = detach(&v, "v1", &link).unwrap();
    assert_eq!(d.action, Action::Removed);
    assert_eq!(std::fs::read_link(&link).unwrap(), device);
    assert!(v.read_record("v1").is_none());
    let again = detach(&v, "v1", &link).unwrap();
    assert_eq!(again.action, Action::Identity);
    assert_eq!(
        fx.dm.calls(),
        [
            "create crypt-x",
            "remove crypt-x",
            "remove crypt-os-brick+v1"
        ]
    );
}

#[test]
fn a_failed_detach_names_the_volume_once_and_the_mapping_once() {
    let fx = setup();
    let (link, _) = fx.link("v1");
    let v = fx.volumes();
    v.map("v1", &fx.dm, &link, "crypt-x", UUID, &target(), key())
        .unwrap();
    fx.dm.fail_remove.set(true);
    let e = detach(&v, "v1", &link).unwrap_err();
    assert_eq!(e.volume_id, "v1");
    assert!(
        matches!(
            e.failure,
            Failure::Dm {
                source: DmError::Busy { .. }
            }
        ),
        "{e}"
    );
    let text = crate::text::error_chain(&e);
    assert_eq!(text.matches("v1").count(), 1, "{text}");
    assert_eq!(text.matches("crypt-x").count(), 1, "{text}");
    assert!(
        v.read_record("v1").is_some(),
        "the record of a live mapping went"
    );
}

/// A dm-mode detach of a LUKS2 volume `id` through `link`.
fn detach(v: &Volumes<'_>, id: &str, link: &Path) -> Result<Detached, VolumeError> {
    let spec = EncryptionSpec {
        provider: Some("luks2".into()),
        encryption_key_id: Some("00000000-0000-4000-8000-000000000001".into()),
        ..EncryptionSpec::default()
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(v.detach(&VolumeId::parse(id).unwrap(), link, &spec, None))
}
