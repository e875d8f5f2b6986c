//! Mapping names and DM uuids exactly as os-brick and cryptsetup make them.

use std::path::Path;

/// os-brick's mapping name for a device path: `crypt-<basename>`.
pub fn default_name(device_path: &Path) -> String {
    format!("crypt-{}", basename(device_path))
}

/// The basename of the device path (os-brick's pre-`crypt-` name).
pub fn basename(device_path: &Path) -> String {
    device_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The mapping name to use: an existing mapping under an older name (the
/// bare basename, then the multipath WWN) is reused, as os-brick does.
pub fn choose_name(
    device_path: &Path,
    multipath_id: Option<&str>,
    exists: impl Fn(&str) -> bool,
) -> String {
    let old = basename(device_path);
    if !old.is_empty() && exists(&old) {
        return old;
    }
    if let Some(wwn) = multipath_id.filter(|w| !w.is_empty() && *w != old)
        && exists(wwn)
    {
        return wwn.to_string();
    }
    default_name(device_path)
}

/// cryptsetup's DM uuid: `CRYPT-<TYPE>-<uuid without dashes>-<name>`, or
/// `CRYPT-PLAIN-<name>`; `cryptsetup status`, lsblk and udev rules key on
/// it.
pub fn dm_uuid(kind: &str, luks_uuid: Option<&str>, name: &str) -> String {
    match luks_uuid {
        Some(u) => format!("CRYPT-{kind}-{}-{name}", u.replace('-', "")),
        None => format!("CRYPT-{kind}-{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_os_brick() {
        let p = Path::new("/dev/disk/by-id/os-brick+dev+sdb");
        assert_eq!(default_name(p), "crypt-os-brick+dev+sdb");
        assert_eq!(choose_name(p, None, |_| false), "crypt-os-brick+dev+sdb");
        assert_eq!(
            choose_name(p, None, |n| n == "os-brick+dev+sdb"),
            "os-brick+dev+sdb"
        );
        assert_eq!(
            choose_name(p, Some("3600a0b"), |n| n == "3600a0b"),
            "3600a0b"
        );
        assert_eq!(
            choose_name(p, Some("3600a0b"), |_| false),
            "crypt-os-brick+dev+sdb"
        );
    }

    #[test]
    fn dm_uuid_like_cryptsetup() {
        assert_eq!(
            dm_uuid(
                "LUKS2",
                Some("6f1c1f1e-0000-4000-8000-000000000001"),
                "crypt-vdb"
            ),
            "CRYPT-LUKS2-6f1c1f1e000040008000000000000001-crypt-vdb"
        );
        assert_eq!(dm_uuid("PLAIN", None, "crypt-vdb"), "CRYPT-PLAIN-crypt-vdb");
    }
}
