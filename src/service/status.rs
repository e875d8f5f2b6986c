//! What is attached on this host: the attach records, the kernel's crypt
//! mappings and the libvirt-mode secret records, as the API's listing and
//! `luks-agent status` show them (the same answer whether the agent or
//! the CLI builds it).

use std::path::Path;

use super::api::{self, Mode};
use crate::dm::DeviceMapper;
use crate::text::error_chain;
use crate::volume;

/// A kernel mapping as the API shows it.
pub fn mapping_json(m: &crate::dm::MappingInfo) -> api::Mapping {
    api::Mapping {
        name: m.name.clone(),
        uuid: m.uuid.clone(),
        device: m.device.to_string(),
        open_count: m.open_count,
    }
}

/// Attach records, kernel mappings and libvirt-mode secret records, for
/// every volume or `only` one (ioctls: call it from a blocking thread).
pub fn volumes_now(run_dir: &Path, only: Option<&str>) -> api::VolumesResponse {
    let records: Vec<_> = volume::attached_volumes(run_dir)
        .into_iter()
        .filter(|v| only.is_none_or(|id| v.volume_id == id))
        .collect();
    let (mappings, dm_error) = match DeviceMapper::open().and_then(|dm| dm.list("CRYPT-")) {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(error_chain(&e))),
    };
    let holds: std::collections::BTreeMap<String, volume::KeyHoldRecord> =
        volume::key_holds(run_dir).into_iter().collect();
    let key = |id: &str| holds.get(id).cloned();
    let fixed = |id: &str| {
        holds.get(id).map(|h| {
            crate::keymgr::KeyId::new(&h.key_id)
                .is_ok_and(|k| k.last_segment() == crate::keymgr::fixed::FIXED_KEY_ID)
        })
    };
    let volumes = records
        .into_iter()
        .map(|r| api::VolumeStatus {
            kernel: mappings
                .as_ref()
                .and_then(|ms| ms.iter().find(|m| m.name == r.mapping))
                .map(mapping_json),
            key: key(&r.volume_id),
            fixed_key: fixed(&r.volume_id),
            volume_id: r.volume_id,
            mode: Mode::Dm,
            mapping: Some(r.mapping),
            device_path: Some(r.device_path),
            original_target: r.original_target,
            secret_uuid: None,
        })
        .chain(
            volume::native::native_volumes(run_dir)
                .into_iter()
                .filter(|v| only.is_none_or(|id| v.volume_id == id))
                .map(|v| api::VolumeStatus {
                    key: key(&v.volume_id),
                    fixed_key: fixed(&v.volume_id),
                    volume_id: v.volume_id,
                    mode: Mode::Libvirt,
                    mapping: None,
                    device_path: None,
                    original_target: None,
                    kernel: None,
                    secret_uuid: Some(v.secret_uuid),
                }),
        )
        .collect();
    api::VolumesResponse {
        volumes,
        mappings: mappings.map(|ms| ms.iter().map(mapping_json).collect()),
        device_mapper_error: dm_error,
    }
}
