//! QEMU-native LUKS ("libvirt mode") against a real libvirtd and a real
//! QEMU: the secret nova would look up, its flags and files, QEMU opening
//! the volume we formatted with the secret we defined (and refusing a
//! wrong one), idempotency and concurrency.
//!
//! Needs root and Debian's libvirt-daemon, libvirt-daemon-driver-qemu,
//! libvirt-clients and qemu-system-x86 (scripts/install-deps.sh). The
//! daemons are started by `tests/harness/libvirtd.sh` and stopped when this
//! test binary exits, however it exits. With CI=true a test that cannot run
//! fails; elsewhere it says loudly why it is skipped.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use luks_agent::blockdev::loopdev::LoopDevice;
use serde_json::Value;
use virt::connect::Connect;
use virt::secret::Secret;

mod common;

use common::AGENT;
use common::harness::{libvirtd_or_skip, libvirtd_sh};
use common::serve::create_local_key;

const URI: &str = "qemu:///system";
const MIB: u64 = 1 << 20;

/// One test at a time: one test restarts libvirtd, and domains and secrets
/// are system-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Per-test context; its Drop removes domains, secrets and files the test
/// made, also when the test fails.
struct Fx {
    _serial: MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    config: PathBuf,
    key_id: String,
    passphrase: String,
    domains: Vec<String>,
    volumes: Vec<String>,
    loops: Vec<LoopDevice>,
}

/// The context, or `None` (after saying why, loudly) when the tests cannot
/// run here; in CI that is a failure instead.
fn setup(persistent: bool) -> Option<Fx> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // libvirt's default handler prints every error (an expected "no such
    // secret" too) to stderr.
    virt::error::clear_error_callback();
    if !libvirtd_or_skip("libvirt tests") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\n[key_manager.local]\ndir = \"{0}/keys\"\n[libvirt]\nuri = \"{URI}\"\npersistent = {persistent}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (key_id, passphrase) = create_local_key(&config);
    assert_eq!(passphrase.len(), 64, "hex of a 256-bit key");
    Some(Fx {
        _serial: serial,
        dir,
        config,
        key_id,
        passphrase,
        domains: vec![],
        volumes: vec![],
        loops: vec![],
    })
}

impl Drop for Fx {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
        if let Ok(mut conn) = Connect::open(Some(URI)) {
            for v in &self.volumes {
                for usage in [v.clone(), format!("{v}-wrong")] {
                    if let Ok(s) = Secret::lookup_by_usage(&conn, VOLUME, &usage) {
                        let _ = s.undefine();
                    }
                }
            }
            let _ = conn.close();
        }
        // The agent's per-volume lock and secret record (run directory).
        for v in &self.volumes {
            let _ = fs::remove_file(format!("/run/luks-agent/secrets/{v}.json"));
            let _ = fs::remove_file(format!("/run/luks-agent/locks/{v}.lock"));
        }
        // Loop devices detach when dropped.
        self.loops.clear();
    }
}

const VOLUME: i32 = virt::sys::VIR_SECRET_USAGE_TYPE_VOLUME as i32;

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("virsh (libvirt-clients) is required")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Fx {
    fn agent(&self, args: &[&str]) -> Output {
        let out = Command::new(AGENT)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // The passphrase only ever leaves through `keys fetch --reveal`.
        if !self.passphrase.is_empty() {
            assert!(
                !text(&out).contains(&self.passphrase),
                "luks-agent {args:?} printed the passphrase"
            );
        }
        out
    }

    fn encryption(&self, provider: &str) -> String {
        format!(
            r#"{{"encryption_key_id":"{}","provider":"{provider}","cipher":"aes-xts-plain64","key_size":256,"control_location":"front-end"}}"#,
            self.key_id
        )
    }

    fn volume(&mut self) -> String {
        let v = format!("lvtest-{}", uuid::Uuid::new_v4());
        self.volumes.push(v.clone());
        v
    }

    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn loop_device(&mut self, name: &str, size: u64) -> PathBuf {
        let img = self.image(name, size);
        let dev = LoopDevice::attach(&img).expect("attaching a loop device");
        let path = dev.path().to_path_buf();
        self.loops.push(dev);
        path
    }

    /// `OP --mode libvirt` (attach, detach, extend) of volume `vid` on
    /// `device` with `provider`, then `extra`; the raw output.
    fn volume_op(
        &self,
        op: &str,
        vid: &str,
        device: &Path,
        provider: &str,
        extra: &[&str],
    ) -> Output {
        let encryption = self.encryption(provider);
        let mut args = vec![
            op,
            "--mode",
            "libvirt",
            "--volume-id",
            vid,
            "--device",
            device.to_str().unwrap(),
            "--encryption",
            &encryption,
        ];
        args.extend(extra);
        self.agent(&args)
    }

    /// `attach --mode libvirt --json` with `provider`; the raw output.
    fn attach_raw(&self, vid: &str, device: &Path, provider: &str) -> Output {
        self.volume_op("attach", vid, device, provider, &["--json"])
    }

    fn attach(&self, vid: &str, device: &Path) -> Value {
        let out = self.attach_raw(vid, device, "luks");
        assert!(out.status.success(), "attach: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `attach`, printing its time under `what`: the agent's own figure
    /// and the whole process's.
    fn timed_attach(&self, what: &str, vid: &str, device: &Path) -> Value {
        let t = Instant::now();
        let a = self.attach(vid, device);
        eprintln!(
            "{what}: {:.1} ms (process: {:.1} ms)",
            a["duration_ms"].as_f64().unwrap(),
            t.elapsed().as_secs_f64() * 1e3
        );
        a
    }

    /// The entries of `secrets list --json` (with `extra` arguments) for
    /// volume `vid`.
    fn listed_secrets(&self, vid: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["secrets", "list", "--json"];
        args.extend(extra);
        let out = self.agent(&args);
        assert!(out.status.success(), "{}", text(&out));
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        listed
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {listed}"))
            .iter()
            .filter(|s| s["volume_id"] == vid)
            .cloned()
            .collect()
    }

    fn detach(&self, vid: &str, device: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["--json"];
        args.extend(extra);
        let out = self.volume_op("detach", vid, device, "luks", &args);
        assert!(out.status.success(), "detach: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Defines (and records for cleanup) a TCG domain with one virtio disk
    /// on `device` carrying `encryption`.
    fn define_domain(&mut self, device: &Path, encryption: &str) -> String {
        let name = format!(
            "lvtest-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='{}'/><target dev='vda' bus='virtio'/>{encryption}</disk>\
             </devices></domain>",
            device.display()
        );
        let path = self.dir.path().join(format!("{name}.xml"));
        fs::write(&path, xml).unwrap();
        let out = virsh(&["define", path.to_str().unwrap()]);
        assert!(out.status.success(), "virsh define: {}", text(&out));
        self.domains.push(name.clone());
        name
    }
}

/// `virsh start --paused DOMAIN`, printing its time under `what`.
fn timed_start_paused(domain: &str, what: &str) -> Output {
    let t = Instant::now();
    let out = virsh(&["start", "--paused", domain]);
    eprintln!(
        "virsh start --paused {what}: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    out
}

/// Defines a volume secret for `usage` with the `<secret>` attributes
/// `attrs` and `value`, as another program would: its UUID.
fn define_secret(attrs: &str, usage: &str, value: &[u8]) -> String {
    let mut conn = Connect::open(Some(URI)).unwrap();
    let s = Secret::define_xml(
        &conn,
        &format!("<secret {attrs}><usage type='volume'><volume>{usage}</volume></usage></secret>"),
        0,
    )
    .unwrap();
    s.set_value(value, 0).unwrap();
    let uuid = s.get_uuid_string().unwrap();
    drop(s);
    conn.close().unwrap();
    uuid
}

fn lookup_uuid(vid: &str) -> Option<String> {
    let mut conn = Connect::open(Some(URI)).unwrap();
    let r = Secret::lookup_by_usage(&conn, VOLUME, vid)
        .ok()
        .map(|s| s.get_uuid_string().unwrap());
    conn.close().unwrap();
    r
}

/// Secrets whose usage id is `vid` (libvirt allows one; counting proves it).
fn count_secrets(vid: &str) -> usize {
    let list = virsh(&["secret-list"]);
    assert!(list.status.success(), "{}", text(&list));
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["volume", vid])
        })
        .count()
}

fn secret_files(uuid: &str) -> Vec<PathBuf> {
    ["xml", "base64"]
        .iter()
        .map(|e| PathBuf::from(format!("/etc/libvirt/secrets/{uuid}.{e}")))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn secret_is_found_by_usage_private_ephemeral_and_idempotent() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    let img = fx.image("vol.img", 32 * MIB);
    let a = fx.timed_attach("first attach (format + secret)", &vid, &img);
    assert_eq!(a["action"], "created");
    assert_eq!(a["formatted"], true);
    assert_eq!(a["ephemeral"], true);
    assert_eq!(a["private"], true);
    let uuid = a["secret_uuid"].as_str().unwrap().to_string();
    assert_eq!(
        a["encryption_xml"],
        format!("<encryption format='luks'><secret type='passphrase' uuid='{uuid}'/></encryption>")
    );
    // nova: find_secret('volume', volume_id) -> virSecretLookupByUsage.
    assert_eq!(lookup_uuid(&vid).as_deref(), Some(uuid.as_str()));
    let list = virsh(&["secret-list"]);
    assert!(
        text(&list).contains(&uuid) && text(&list).contains(&format!("volume {vid}")),
        "{}",
        text(&list)
    );
    // Private: the value cannot be read back, through the API or virsh.
    let mut conn = Connect::open(Some(URI)).unwrap();
    let s = Secret::lookup_by_usage(&conn, VOLUME, &vid).unwrap();
    let e = s
        .get_value(0)
        .expect_err("a private secret's value was readable");
    assert!(e.message().contains("private"), "{e}");
    drop(s);
    conn.close().unwrap();
    let v = virsh(&["secret-get-value", &uuid]);
    assert!(!v.status.success(), "virsh read the value: {}", text(&v));
    // Ephemeral: nothing on disk.
    assert_eq!(secret_files(&uuid), Vec::<PathBuf>::new());
    // `secrets list` shows it with its flags, never a value.
    let mine = fx.listed_secrets(&vid, &[]);
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["uuid"], uuid.as_str());
    assert_eq!(mine[0]["ephemeral"], true);
    assert_eq!(mine[0]["private"], true);

    // Attach twice: one secret, the same UUID, nothing rewritten.
    let b = fx.timed_attach("re-attach (reuse)", &vid, &img);
    assert_eq!(b["action"], "reused");
    assert_eq!(b["formatted"], false);
    assert_eq!(b["secret_uuid"], uuid.as_str());
    assert_eq!(count_secrets(&vid), 1);

    // --keep-secret leaves it; detach removes it; detach twice succeeds.
    let k = fx.detach(&vid, &img, &["--keep-secret"]);
    assert_eq!(k["action"], "kept");
    assert_eq!(lookup_uuid(&vid).as_deref(), Some(uuid.as_str()));
    let d = fx.detach(&vid, &img, &[]);
    assert_eq!(d["action"], "removed");
    assert_eq!(lookup_uuid(&vid), None);
    let d = fx.detach(&vid, &img, &[]);
    assert_eq!(d["action"], "absent");
    // Host reboot / libvirtd restart: attach re-creates it from the key
    // manager, without formatting again.
    let c = fx.attach(&vid, &img);
    assert_eq!(c["action"], "created");
    assert_eq!(c["formatted"], false);
    // An ephemeral secret dies with libvirtd; the next attach defines it
    // again although the agent's record of the old one is still there.
    libvirtd_sh(&["restart"]).unwrap();
    assert_eq!(lookup_uuid(&vid), None, "an ephemeral secret survived");
    let d = fx.attach(&vid, &img);
    assert_eq!(d["action"], "created");
    assert_eq!(d["formatted"], false);
    assert_eq!(count_secrets(&vid), 1);
}

#[test]
fn persistent_secret_is_written_and_survives_a_libvirtd_restart() {
    let Some(mut fx) = setup(true) else { return };
    let vid = fx.volume();
    let img = fx.image("vol.img", 32 * MIB);
    let a = fx.attach(&vid, &img);
    assert_eq!(a["ephemeral"], false);
    assert_eq!(a["private"], true);
    let uuid = a["secret_uuid"].as_str().unwrap().to_string();
    let b64 = PathBuf::from(format!("/etc/libvirt/secrets/{uuid}.base64"));
    let stored = fs::read_to_string(&b64).expect("persistent mode writes the value file");
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD
        .decode(stored.trim())
        .unwrap();
    assert_eq!(value, fx.passphrase.as_bytes(), "the value is the hex key");
    libvirtd_sh(&["restart"]).unwrap();
    assert_eq!(lookup_uuid(&vid).as_deref(), Some(uuid.as_str()));
    let b = fx.attach(&vid, &img);
    assert_eq!(b["action"], "reused");
    assert_eq!(b["secret_uuid"], uuid.as_str());
    let d = fx.detach(&vid, &img, &[]);
    assert_eq!(d["action"], "removed");
    assert_eq!(secret_files(&uuid), Vec::<PathBuf>::new());
}

/// Runs a qemu-io command in the running domain, on the guest disk's own
/// block backend (through QEMU's LUKS driver, with our secret). HMP's
/// qemu-io prints to QEMU's stderr, i.e. libvirt's log of the domain.
fn hmp_qemu_io(domain: &str, cmd: &str) -> String {
    let log = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}.log"));
    let before = fs::read_to_string(&log).unwrap_or_default().len();
    let out = virsh(&[
        "qemu-monitor-command",
        domain,
        "--hmp",
        &format!("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"{cmd}\""),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let after = fs::read_to_string(&log).unwrap_or_default();
    format!("{}{}", text(&out), &after[before.min(after.len())..])
}

/// qemu-io on the device with `passphrase` from a 0600 file; the output.
fn qemu_io(fx: &Fx, device: &Path, passphrase: &[u8], cmd: &str) -> Output {
    let key = fx.dir.path().join("qemu-io.key");
    let _ = fs::remove_file(&key);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .unwrap()
        .write_all(passphrase)
        .unwrap();
    let out = Command::new("qemu-io")
        .args([
            "--object",
            &format!("secret,id=s0,file={},format=raw", key.display()),
            "--image-opts",
            &format!(
                "driver=luks,key-secret=s0,file.driver=host_device,file.filename={}",
                device.display()
            ),
            "-c",
            cmd,
        ])
        .output()
        .expect("qemu-io (qemu-utils) is required");
    fs::remove_file(&key).unwrap();
    out
}

#[test]
fn qemu_opens_the_volume_with_our_secret_and_refuses_a_wrong_one() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    let dev = fx.loop_device("vol.img", 64 * MIB);
    let a = fx.attach(&vid, &dev);
    assert_eq!(a["formatted"], true);
    let enc = a["encryption_xml"].as_str().unwrap().to_string();
    let dom = fx.define_domain(&dev, &enc);
    let out = timed_start_paused(&dom, "with our secret");
    assert!(out.status.success(), "virsh start: {}", text(&out));
    // Write through the guest's disk (QEMU decrypting with our secret).
    let w = hmp_qemu_io(&dom, "write -P 0x5a 0 65536");
    assert!(w.contains("wrote 65536/65536 bytes at offset 0"), "{w}");
    let out = virsh(&["destroy", &dom]);
    assert!(out.status.success(), "{}", text(&out));
    // The device holds ciphertext, not the pattern...
    let payload = {
        let out = fx.agent(&["luks", "dump", "--json", dev.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        let j: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["version"], 1, "QEMU-native volumes are LUKS1");
        j["data_offset_bytes"].as_u64().unwrap()
    };
    let mut raw = vec![0u8; 65536];
    fs::File::open(&dev)
        .unwrap()
        .read_exact_at(&mut raw, payload)
        .unwrap();
    assert!(raw.iter().any(|b| *b != 0x5a), "plaintext on the device");
    // ...and qemu-io with the same passphrase reads the pattern back.
    let r = qemu_io(&fx, &dev, fx.passphrase.as_bytes(), "read -P 0x5a 0 65536");
    assert!(
        r.status.success() && !text(&r).contains("Pattern verification failed"),
        "{}",
        text(&r)
    );
    let r = qemu_io(&fx, &dev, fx.passphrase.as_bytes(), "read -P 0x00 0 65536");
    assert!(
        text(&r).contains("Pattern verification failed"),
        "the read check can fail: {}",
        text(&r)
    );

    // A secret with a wrong value: QEMU refuses to start.
    let mut bad = fx.passphrase.clone().into_bytes();
    bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
    let wrong_uuid = define_secret(
        "ephemeral='yes' private='yes'",
        &format!("{vid}-wrong"),
        &bad,
    );
    let dom2 = fx.define_domain(
        &dev,
        &format!(
            "<encryption format='luks'><secret type='passphrase' uuid='{wrong_uuid}'/></encryption>"
        ),
    );
    let out = timed_start_paused(&dom2, "with a wrong secret value (refused)");
    assert!(!out.status.success(), "started with a wrong passphrase");
    assert!(
        text(&out).contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        text(&out)
    );
    // With our secret it still starts.
    let out = timed_start_paused(&dom, "with our secret, again");
    assert!(out.status.success(), "virsh start: {}", text(&out));
}

#[test]
fn a_foreign_secret_with_another_value_is_replaced_in_place() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    // What nova leaves: persistent, readable, here with a stale value.
    let novas = define_secret("ephemeral='no' private='no'", &vid, b"stale");
    assert!(!secret_files(&novas).is_empty());
    // `secrets list` shows only ours; --all shows nova's too, flagged.
    assert!(fx.listed_secrets(&vid, &[]).is_empty());
    let all = fx.listed_secrets(&vid, &["--all"]);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["ours"], false);
    assert_eq!(all[0]["ephemeral"], false);
    assert_eq!(all[0]["private"], false);
    let dev = fx.loop_device("vol.img", 64 * MIB);
    let a = fx.attach(&vid, &dev);
    assert_eq!(a["action"], "replaced");
    assert_eq!(a["secret_uuid"], novas.as_str(), "same UUID");
    assert_eq!(count_secrets(&vid), 1);
    assert_eq!(secret_files(&novas), Vec::<PathBuf>::new(), "now ephemeral");
    let v = virsh(&["secret-get-value", &novas]);
    assert!(!v.status.success(), "now private: {}", text(&v));
    // The value is right: QEMU opens the volume with it.
    let dom = fx.define_domain(&dev, a["encryption_xml"].as_str().unwrap());
    let out = virsh(&["start", "--paused", &dom]);
    assert!(out.status.success(), "virsh start: {}", text(&out));
    let b = fx.attach(&vid, &dev);
    assert_eq!(b["action"], "reused");
}

#[test]
fn concurrent_attaches_of_one_volume_make_one_secret() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    let img = fx.image("vol.img", 32 * MIB);
    let enc = fx.encryption("luks");
    // Each process first reads a (for the local key store, unused) token
    // from its stdin: they all start, block there, and are released
    // together when the pipes close, so their attaches really overlap.
    let mut children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(AGENT)
                .arg("--config")
                .arg(&fx.config)
                .args(["attach", "--mode", "libvirt", "--json", "--volume-id", &vid])
                .arg("--device")
                .arg(&img)
                .args(["--encryption", &enc, "--token-file", "/dev/stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &mut children {
        c.stdin.as_mut().unwrap().write_all(b"token").unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let stdins: Vec<_> = children.iter_mut().map(|c| c.stdin.take()).collect();
    drop(stdins);
    let outs: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "attach: {}", text(&o));
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect();
    let uuids: std::collections::BTreeSet<&str> = outs
        .iter()
        .map(|o| o["secret_uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids.len(), 1, "{outs:?}");
    assert_eq!(outs.iter().filter(|o| o["formatted"] == true).count(), 1);
    assert_eq!(outs.iter().filter(|o| o["action"] == "created").count(), 1);
    assert_eq!(count_secrets(&vid), 1);
}

#[test]
fn luks2_plain_and_an_unreachable_libvirtd_are_refused_without_writing() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    let img = fx.image("vol.img", 32 * MIB);
    let zeros = |p: &Path| fs::read(p).unwrap().iter().all(|b| *b == 0);
    for provider in ["luks2", "plain"] {
        let out = fx.attach_raw(&vid, &img, provider);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let msg = text(&out);
        assert!(msg.contains(&vid) && msg.contains(provider), "{msg}");
        assert!(zeros(&img), "{provider}: the device was written");
        assert_eq!(lookup_uuid(&vid), None);
        let out = fx.volume_op("extend", &vid, &img, provider, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    }
    // libvirtd unreachable: its own exit code, the volume untouched.
    let down = fx.dir.path().join("down.toml");
    let cfg = fs::read_to_string(&fx.config).unwrap().replace(
        &format!("uri = \"{URI}\""),
        "uri = \"qemu:///system?socket=/nonexistent/libvirt-sock\"",
    );
    fs::write(&down, cfg).unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&down)
        .args([
            "attach",
            "--mode",
            "libvirt",
            "--volume-id",
            &vid,
            "--device",
        ])
        .arg(&img)
        .args(["--encryption", &fx.encryption("luks")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert!(
        text(&out).contains("libvirt is unavailable") && text(&out).contains(&vid),
        "{}",
        text(&out)
    );
    assert!(zeros(&img), "written although libvirtd was unreachable");
}

#[test]
fn extend_reports_the_guest_visible_size() {
    let Some(mut fx) = setup(false) else { return };
    let vid = fx.volume();
    let img = fx.image("vol.img", 32 * MIB);
    fx.attach(&vid, &img);
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let out = fx.volume_op("extend", &vid, &img, "luks", &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The payload offset as cryptsetup reports it (sectors of 512 bytes).
    let cs = Command::new("cryptsetup")
        .args(["luksDump", img.to_str().unwrap()])
        .output()
        .expect("cryptsetup is required");
    let sectors: u64 = String::from_utf8_lossy(&cs.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("Payload offset:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("luksDump shows the payload offset");
    assert_eq!(j["device_size"], 48 * MIB);
    assert_eq!(j["payload_offset"], sectors * 512);
    assert_eq!(j["new_size"], 48 * MIB - sectors * 512);
}

/// Status says which attached volume uses which key, whether the key
/// manager keeps it (the local store does not: no consumers), and which
/// use nova's legacy fixed key; `keys fixed-key-in-use` exits 0 only when
/// no attached volume uses it, and names those that do.
#[test]
fn status_names_each_volumes_key_and_the_fixed_key_check_follows_attaches() {
    let Some(mut fx) = setup(false) else { return };
    let fixed_hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let fixed_id = "00000000-0000-0000-0000-000000000000";
    let cfg = fx.dir.path().join("fixed.toml");
    fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[key_manager]\nfixed_key = \"{fixed_hex}\"\n[key_manager.local]\ndir = \"{0}/keys\"\n[libvirt]\nuri = \"{URI}\"\npersistent = false\n",
            fx.dir.path().display()
        ),
    )
    .unwrap();
    fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fx.config = cfg;
    fx.passphrase = fixed_hex.to_string();
    let in_use = |fx: &Fx| {
        let out = fx.agent(&["keys", "fixed-key-in-use"]);
        (out.status.code(), text(&out))
    };
    let status = |fx: &Fx| -> Value {
        let out = fx.agent(&["status", "--json", "--local"]);
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (code, said) = in_use(&fx);
    assert_eq!(code, Some(0), "{said}");

    let (a, b) = (fx.volume(), fx.volume());
    let (dev_a, dev_b) = (
        fx.loop_device("a.img", 16 * MIB),
        fx.loop_device("b.img", 16 * MIB),
    );
    let attached = fx.attach(&a, &dev_a);
    assert_eq!(attached["key_held"], false, "{attached}");
    let own_key = fx.key_id.clone();
    fx.key_id = fixed_id.into();
    fx.attach(&b, &dev_b);

    let listed = status(&fx);
    let of = |vid: &str| -> Value {
        listed["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("no volumes in {listed}"))
            .iter()
            .find(|v| v["volume_id"] == vid)
            .cloned()
            .unwrap_or_else(|| panic!("{vid} not in {listed}"))
    };
    let (va, vb) = (of(&a), of(&b));
    assert_eq!(va["key"]["key_id"], own_key.as_str(), "{va}");
    assert_eq!(va["key"]["consumer"], false, "{va}");
    assert_eq!(va["fixed_key"], false, "{va}");
    assert_eq!(vb["key"]["key_id"], fixed_id, "{vb}");
    assert_eq!(vb["fixed_key"], true, "{vb}");

    let (code, said) = in_use(&fx);
    assert_eq!(code, Some(5), "{said}");
    assert!(said.contains(&b) && !said.contains(&a), "{said}");

    fx.detach(&b, &dev_b, &[]);
    let (code, said) = in_use(&fx);
    assert_eq!(code, Some(0), "after the fixed-key volume's detach: {said}");
    fx.key_id = own_key;
    fx.detach(&a, &dev_a, &[]);
    assert_eq!(status(&fx)["volumes"], serde_json::json!([]));
}

/// Barbican's answer to one call with `token` (microversion `version`).
fn barbican_call(
    endpoint: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    version: &str,
) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = luks_agent::keymgr::http::build_client(&Default::default()).unwrap();
        let resp = client
            .request(method, format!("{endpoint}{path}"))
            .header("X-Auth-Token", token)
            .header("Accept", "application/json")
            .header("OpenStack-API-Version", format!("key-manager {version}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
}

/// The harness's Keystone and Barbican for one test: a secret of alice's
/// (key bytes `key`), her token in a file, and the agent configured with
/// the `agent` user (member of the service project only); a UUID volume id.
struct BarbicanFx {
    endpoint: String,
    alice: String,
    id: String,
    vid: String,
    token_file: PathBuf,
}

impl BarbicanFx {
    fn new(fx: &mut Fx) -> BarbicanFx {
        Self::with(fx, "")
    }

    /// As `new`, with `extra` lines at the end of the agent's
    /// configuration.
    fn with(fx: &mut Fx, extra: &str) -> BarbicanFx {
        let cloud = common::harness::test_cloud()
            .unwrap_or_else(|e| panic!("the Keystone + Barbican test cloud could not start:\n{e}"));
        let state = cloud["state_dir"].as_str().unwrap();
        let endpoint = cloud["barbican"]["endpoint"].as_str().unwrap().to_string();
        let harness = |args: &[&str]| {
            let mut all = vec![args[0], "--state", state];
            all.extend_from_slice(&args[1..]);
            common::harness::openstack_py(&all).unwrap_or_else(|e| panic!("{e}"))
        };
        let key = [0x5au8; 32];
        let id = harness(&[
            "create-secret",
            "--user",
            "alice",
            "--payload-hex",
            &hex::encode(key),
            "--secret-type",
            "symmetric",
        ])
        .trim()
        .to_string();
        let alice = harness(&["token", "--user", "alice"]).trim().to_string();
        let token_file = fx.dir.path().join("token");
        fs::write(&token_file, &alice).unwrap();
        let cfg = fx.dir.path().join("barbican.toml");
        fs::write(
            &cfg,
            format!(
                "state_dir = \"{0}/bstate\"\nrun_dir = \"{0}/brun\"\n[key_manager]\nbackend = \"barbican\"\n\
                 [key_manager.keystone]\nauth_url = \"{1}\"\nauth_type = \"password\"\nusername = \"agent\"\n\
                 password = \"{2}\"\nproject_name = \"service\"\n[key_manager.barbican]\nendpoint = \"{endpoint}\"\n\
                 [libvirt]\nuri = \"{URI}\"\npersistent = false\n{extra}\n",
                fx.dir.path().display(),
                cloud["keystone"]["auth_url"].as_str().unwrap(),
                cloud["users"]["agent"]["password"].as_str().unwrap(),
            ),
        )
        .unwrap();
        fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        fx.config = cfg;
        fx.passphrase = hex::encode(key);
        fx.key_id = id.clone();
        // A cinder volume id: a UUID, which Barbican keeps as the
        // consumer's resource id as it is.
        let vid = uuid::Uuid::new_v4().to_string();
        fx.volumes.push(vid.clone());
        BarbicanFx {
            endpoint,
            alice,
            id,
            vid,
            token_file,
        }
    }

    /// The secret's consumers, as alice sees them.
    fn consumers(&self) -> Vec<Value> {
        let (status, v) = barbican_call(
            &self.endpoint,
            reqwest::Method::GET,
            &format!("/v1/secrets/{}/consumers", self.id),
            &self.alice,
            "1.1",
        );
        assert_eq!(status, 200, "{v}");
        v["consumers"].as_array().cloned().unwrap_or_default()
    }

    /// Alice deletes the secret at microversion 1.2, where consumers count.
    fn delete(&self) -> (u16, Value) {
        barbican_call(
            &self.endpoint,
            reqwest::Method::DELETE,
            &format!("/v1/secrets/{}", self.id),
            &self.alice,
            "1.2",
        )
    }

    /// Attach in libvirt mode with alice's token; the answer.
    fn attach(&self, fx: &Fx, dev: &Path) -> Value {
        let out = fx.volume_op(
            "attach",
            &self.vid,
            dev,
            "luks",
            &["--json", "--token-file", self.token_file.to_str().unwrap()],
        );
        assert!(out.status.success(), "attach: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Through the agent's own attach and detach, with a key in the harness's
/// real Barbican: the attach (with the user's token) registers this host
/// as a consumer of the secret and puts the agent's user on its read ACL;
/// status says so; Barbican refuses to delete the secret while the volume
/// is attached; an attach without a token (host boot) works with the
/// agent's own credentials, which have no role in the user's project; the
/// detach (no token) removes the consumer and the delete succeeds.
#[test]
fn a_barbican_key_is_held_while_the_volume_is_attached() {
    let Some(mut fx) = setup(false) else { return };
    let b = BarbicanFx::new(&mut fx);
    let (id, vid) = (b.id.clone(), b.vid.clone());
    let dev = fx.loop_device("held.img", 16 * MIB);
    let consumers = || b.consumers();

    let attached = b.attach(&fx, &dev);
    assert_eq!(attached["key_held"], true, "{attached}");
    let listed = consumers();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["service"], "luks-agent");
    assert_eq!(listed[0]["resource_id"], vid.as_str());

    let out = fx.agent(&["status", "--json", "--local"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = &status["volumes"][0];
    assert_eq!(v["volume_id"], vid.as_str(), "{status}");
    assert_eq!(v["key"]["key_id"], id.as_str(), "{status}");
    assert_eq!(v["key"]["consumer"], true, "{status}");
    assert_eq!(v["key"]["granted_read"], true, "{status}");

    let delete = || b.delete();
    let (code, body) = delete();
    assert_eq!(code, 400, "a delete while attached: {body}");

    // Host boot: the same attach without the user's token.
    let again = fx.attach(&vid, &dev);
    assert_eq!(again["key_held"], true, "{again}");
    assert_eq!(consumers().len(), 1);

    fx.detach(&vid, &dev, &[]);
    assert_eq!(consumers(), Vec::<Value>::new());
    let (code, body) = delete();
    assert_eq!(code, 204, "a delete after the detach: {body}");
}

/// nova detaches a QEMU-native volume by deleting the volume's libvirt
/// secret itself (`_detach_encryptor`), without calling the encryptor. The
/// agent's reconciliation finds that and releases the key's consumer, but
/// only once no domain names the secret: a guest still defined with the
/// disk (or running after a libvirtd restart lost an ephemeral secret)
/// still uses the key.
#[test]
fn a_secret_nova_deleted_releases_the_key_once_no_domain_uses_it() {
    let Some(mut fx) = setup(false) else { return };
    let b = BarbicanFx::new(&mut fx);
    let dev = fx.loop_device("nova-detach.img", 16 * MIB);
    let attached = b.attach(&fx, &dev);
    assert_eq!(attached["key_held"], true, "{attached}");
    let uuid = attached["secret_uuid"].as_str().unwrap().to_string();
    let xml = attached["encryption_xml"].as_str().unwrap().to_string();
    let domain = fx.define_domain(&dev, &xml);
    let reconcile = |fx: &Fx| {
        let out = fx.agent(&["secrets", "reconcile"]);
        assert!(out.status.success(), "reconcile: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing to find while the secret is there.
    assert_eq!(reconcile(&fx), "");
    // What nova's _detach_encryptor does in this mode.
    let out = virsh(&["secret-undefine", &uuid]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        reconcile(&fx),
        "",
        "a defined domain still names the secret"
    );
    assert_eq!(b.consumers().len(), 1);
    assert_eq!(b.delete().0, 400);
    let out = virsh(&["undefine", &domain]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        reconcile(&fx).trim(),
        b.vid,
        "the detach nova made was not found"
    );
    assert_eq!(b.consumers(), Vec::<Value>::new());
    let out = fx.agent(&["status", "--json", "--local"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["volumes"], serde_json::json!([]), "{status}");
    assert_eq!(reconcile(&fx), "", "found twice");
    assert_eq!(b.delete().0, 204);
}

/// The running agent finds such a detach by itself, every
/// `reconcile_interval_secs`, while requests go on being served.
#[test]
fn the_running_agent_finds_a_nova_detach_by_itself() {
    let Some(mut fx) = setup(false) else { return };
    let socket = fx.dir.path().join("agent.sock");
    let extra = format!(
        "reconcile_interval_secs = 1\n[server]\nsocket = \"{}\"",
        socket.display()
    );
    let b = BarbicanFx::with(&mut fx, &extra);
    let dev = fx.loop_device("daemon-detach.img", 16 * MIB);
    let _agent = common::serve::Server::start(
        &fx.config,
        &socket,
        &fx.dir.path().join("agent.log"),
        std::time::Duration::from_secs(30),
    );
    let attached = b.attach(&fx, &dev);
    assert_eq!(attached["key_held"], true, "{attached}");
    let uuid = attached["secret_uuid"].as_str().unwrap().to_string();
    // Held across reconciliations while the secret is there.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(b.consumers().len(), 1);
    let out = virsh(&["secret-undefine", &uuid]);
    assert!(out.status.success(), "{}", text(&out));
    let end = Instant::now() + std::time::Duration::from_secs(10);
    while !b.consumers().is_empty() {
        assert!(
            Instant::now() < end,
            "the agent did not release the key within 10 s of nova's detach"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(b.delete().0, 204);
}
