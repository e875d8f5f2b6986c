//! Per-volume JSON records under the run directory (root only, cleared at
//! boot like everything they describe): what an attach did, so that detach
//! can undo it and status can list it. One directory per kind of record
//! (`volumes/` for dm-crypt attaches, `secrets/` for libvirt ones), one
//! `<volume id>.json` file per volume.

use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Failure, FileOp, io_err};
use crate::state_file::{self, Durability};

/// One kind of record.
#[derive(Clone, Debug)]
pub(crate) struct RunRecords {
    dir: PathBuf,
}

impl RunRecords {
    /// Records of `kind` under `run_dir`.
    pub(crate) fn new(run_dir: &Path, kind: &str) -> Self {
        RunRecords {
            dir: run_dir.join(kind),
        }
    }

    /// The record file of a volume.
    pub(crate) fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    /// The volume's record; none when absent or unreadable (a record that
    /// cannot be parsed describes nothing we can undo).
    pub(crate) fn read<T: DeserializeOwned>(&self, volume_id: &str) -> Option<T> {
        let text = fs::read_to_string(self.path(volume_id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the volume's record beside and renames it: a process killed
    /// mid-write leaves the old record or the new one, never a truncated
    /// one that would lose what detach must restore.
    pub(crate) fn write<T: Serialize>(&self, volume_id: &str, rec: &T) -> Result<(), Failure> {
        let path = self.path(volume_id);
        let text = serde_json::to_string(rec).unwrap_or_default();
        state_file::replace(&path, text.as_bytes(), Durability::ProcessCrash)
            .map_err(io_err(FileOp::Writing, &path))
    }

    /// Removes the volume's record; an absent one is fine.
    pub(crate) fn remove(&self, volume_id: &str) -> Result<(), Failure> {
        let path = self.path(volume_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(FileOp::Removing, &path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Every readable record, by volume id, sorted by id.
    pub(crate) fn all<T: DeserializeOwned>(&self) -> Vec<(String, T)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out: Vec<(String, T)> = entries
            .flatten()
            .filter_map(|entry| {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    return None;
                }
                let rec = serde_json::from_str(&fs::read_to_string(&path).ok()?).ok()?;
                Some((path.file_stem()?.to_string_lossy().into_owned(), rec))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// What we remember about a dm-crypt attach, to undo it on detach.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeRecord {
    pub(crate) mapping: String,
    pub(crate) device_path: PathBuf,
    /// Where the device_path symlink pointed before we repointed it.
    pub(crate) original_target: Option<PathBuf>,
}

/// The dm-crypt attach records under `run_dir`.
pub(crate) fn attach_records(run_dir: &Path) -> RunRecords {
    RunRecords::new(run_dir, "volumes")
}

/// An attached volume as its attach record describes it.
#[derive(Clone, Debug, Serialize)]
pub struct AttachedVolume {
    /// Cinder volume id.
    pub volume_id: String,
    /// The mapping name.
    pub mapping: String,
    /// The connector's device path.
    pub device_path: PathBuf,
    /// Where the device path pointed before attach repointed it.
    pub original_target: Option<PathBuf>,
}

/// The volumes that attach records under `run_dir` describe, sorted by id
/// (for status listings; records of other tools are skipped).
pub fn attached_volumes(run_dir: &Path) -> Vec<AttachedVolume> {
    attach_records(run_dir)
        .all::<VolumeRecord>()
        .into_iter()
        .map(|(volume_id, rec)| AttachedVolume {
            volume_id,
            mapping: rec.mapping,
            device_path: rec.device_path,
            original_target: rec.original_target,
        })
        .collect()
}

/// The volume id of the attached volume whose mapping is `mapping`, from
/// the attach records under `run_dir` (for udev's stable links).
pub fn volume_of_mapping(run_dir: &Path, mapping: &str) -> Option<String> {
    attach_records(run_dir)
        .all::<VolumeRecord>()
        .into_iter()
        .find(|(_, rec)| rec.mapping == mapping)
        .map(|(id, _)| id)
}
