//! luks-agent: attaches LUKS-encrypted OpenStack volumes on compute nodes
//! without cryptsetup. This crate holds the layers the binary is built
//! from; see DESIGN.md for how data flows between them.

pub mod blockdev;
pub mod config;
pub mod daemon;
pub mod dm;
pub mod image;
pub mod keymgr;
pub mod libvirt;
pub mod luks;
pub mod secret;
pub mod service;
pub mod state_file;
pub mod text;
pub mod volume;
