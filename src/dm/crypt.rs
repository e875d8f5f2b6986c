//! dm-crypt table lines, built and parsed. The key is always a keyring
//! reference (`:<bytes>:logon:<description>`), never hex.

use std::fmt::Write as _;

use devicemapper::{Device, Sectors};

/// Options of a crypt target (dm-crypt's optional parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CryptOptions {
    /// Pass discards through.
    pub allow_discards: bool,
    /// Decrypt reads in the submitting context.
    pub no_read_workqueue: bool,
    /// Encrypt writes in the submitting context.
    pub no_write_workqueue: bool,
    /// Encryption sector size (512 = default, no option).
    pub sector_size: u32,
    /// IVs count in `sector_size` units (cryptsetup plain mode's
    /// `--iv-large-sectors`). Never for LUKS2, whose IVs count 512-byte
    /// sectors whatever its sector size.
    pub iv_large_sectors: bool,
}

/// One crypt target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptTarget {
    /// Cipher specification, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Key length in bytes.
    pub key_bytes: usize,
    /// Keyring description of the `logon` key.
    pub key_description: String,
    /// IV offset in sectors.
    pub iv_offset: u64,
    /// Backing device number.
    pub device: Device,
    /// Data start on the backing device.
    pub offset: Sectors,
    /// Length of the mapping.
    pub length: Sectors,
    /// Optional parameters.
    pub options: CryptOptions,
}

impl CryptTarget {
    /// The parameter string of the target line.
    pub fn params(&self) -> String {
        let mut s = format!(
            "{} :{}:logon:{} {} {} {}",
            self.cipher,
            self.key_bytes,
            self.key_description,
            self.iv_offset,
            self.device,
            *self.offset
        );
        let mut opts = vec![];
        let o = &self.options;
        if o.allow_discards {
            opts.push("allow_discards".to_string());
        }
        if o.no_read_workqueue {
            opts.push("no_read_workqueue".to_string());
        }
        if o.no_write_workqueue {
            opts.push("no_write_workqueue".to_string());
        }
        if o.sector_size > 512 {
            opts.push(format!("sector_size:{}", o.sector_size));
        }
        if o.iv_large_sectors {
            opts.push("iv_large_sectors".to_string());
        }
        if !opts.is_empty() {
            let _ = write!(s, " {} {}", opts.len(), opts.join(" "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_line_matches_cryptsetup_shape() {
        let t = CryptTarget {
            cipher: "aes-xts-plain64".into(),
            key_bytes: 64,
            key_description: "luks-agent:abc".into(),
            iv_offset: 0,
            device: Device { major: 7, minor: 0 },
            offset: Sectors(32768),
            length: Sectors(100),
            options: CryptOptions {
                sector_size: 4096,
                iv_large_sectors: true,
                ..Default::default()
            },
        };
        assert_eq!(
            t.params(),
            "aes-xts-plain64 :64:logon:luks-agent:abc 0 7:0 32768 2 sector_size:4096 iv_large_sectors"
        );
        let plain = CryptTarget {
            options: CryptOptions::default(),
            ..t
        };
        assert_eq!(
            plain.params(),
            "aes-xts-plain64 :64:logon:luks-agent:abc 0 7:0 32768"
        );
    }
}
