//! The key manager layer against a real Keystone and a real Barbican, run
//! by `tests/harness/openstack.py` on loopback: authentication with the
//! agent's password or application credential, caller tokens with and
//! without a service token, key ids as hrefs, passphrase secrets, policy
//! refusals, Barbican going away and coming back, a server that never
//! answers, unusable key material, the token cache, the formatted marker
//! and the format intent in Barbican's secret metadata, and nova's legacy
//! fixed key.
//!
//! The cloud comes from `LUKS_AGENT_TEST_CLOUD` (a `cloud.json`) or is
//! started once per test binary in `target/test-cloud` and left running
//! (`scripts/test.sh` stops it). A cloud that cannot start fails every
//! test with the harness's output. Every test takes one lock: some stop
//! Barbican, and the token-count test reads Keystone's access log.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use luks_agent::config::{Config, ConfigError};
use luks_agent::keymgr::barbican::{Barbican, INTENT_KEY, MARKER_KEY};
use luks_agent::keymgr::fixed::FIXED_KEY_ID;
use luks_agent::keymgr::http::{HttpConfig, build_client};
use luks_agent::keymgr::keystone::Keystone;
use luks_agent::keymgr::{
    FormatIntent, Hold, HoldOp, Key, KeyError, KeyHolder, KeyId, KeyManager, RequestAuth,
    SecretKind, SecretString,
};
use luks_agent::secret::SecretBytes;

mod common;

use common::harness::{openstack_py, test_cloud};

// ---------------------------------------------------------------------------
// The cloud
// ---------------------------------------------------------------------------

/// User-Agent of requests made by the harness script itself.
const HARNESS_UA: &str = "luks-agent-test-harness";

struct Cloud {
    state: String,
    v: Value,
}

impl Cloud {
    fn start() -> Result<Cloud, String> {
        let v = test_cloud()?;
        let state = v["state_dir"]
            .as_str()
            .ok_or("the cloud description has no state_dir")?
            .to_string();
        Ok(Cloud { state, v })
    }

    fn run(&self, args: &[&str]) -> String {
        let mut all = vec![args[0], "--state", &self.state];
        all.extend_from_slice(&args[1..]);
        openstack_py(&all).unwrap_or_else(|e| panic!("{e}"))
    }

    fn auth_url(&self) -> &str {
        self.v["keystone"]["auth_url"].as_str().unwrap()
    }

    fn barbican(&self) -> &str {
        self.v["barbican"]["endpoint"].as_str().unwrap()
    }

    fn password(&self, user: &str) -> &str {
        self.v["users"][user]["password"].as_str().unwrap()
    }

    fn app_cred(&self, field: &str) -> &str {
        self.v["app_credential"][field].as_str().unwrap()
    }

    fn token(&self, user: &str) -> String {
        self.run(&["token", "--user", user]).trim().to_string()
    }

    /// A new random 256-bit symmetric secret of alice's: its bytes and id.
    fn new_symmetric_key(&self) -> (Vec<u8>, String) {
        let key = random_key(32);
        let id = self.create_secret(&key, "symmetric");
        (key, id)
    }

    fn create_secret(&self, payload: &[u8], secret_type: &str) -> String {
        let id = self.run(&[
            "create-secret",
            "--user",
            "alice",
            "--payload-hex",
            &hex::encode(payload),
            "--secret-type",
            secret_type,
        ]);
        let id = id.trim().to_string();
        uuid_check(&id);
        id
    }

    fn delete_secret(&self, id: &str) {
        self.run(&["delete-secret", "--user", "alice", "--id", id]);
    }

    /// `POST /v3/auth/tokens` lines in Keystone's access log that neither
    /// the harness nor Barbican's middleware made: the agent's.
    fn agent_requests(&self, request: &str) -> usize {
        let log = self.v["keystone"]["access_log"].as_str().unwrap();
        let text = fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
        text.lines()
            .filter(|l| l.contains(&format!("\"{request} ")))
            .filter(|l| {
                let ua = l.rsplit('"').nth(1).unwrap_or("");
                ua != HARNESS_UA
                    && !ua.contains("barbican/")
                    && !ua.contains("keystonemiddleware")
                    && !ua.contains("keystoneclient")
            })
            .count()
    }

    /// The agent's count of `request` once Keystone has logged at least
    /// `want` (access log lines are written after the response is sent).
    fn settled_agent_requests(&self, request: &str, want: usize) -> usize {
        let end = Instant::now() + Duration::from_secs(5);
        while self.agent_requests(request) < want && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        self.agent_requests(request)
    }
}

fn uuid_check(id: &str) {
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "create-secret printed {id:?}"
    );
}

static CLOUD: OnceLock<Result<Cloud, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// Per-test context: the lock, the cloud, a runtime and a scratch directory.
struct Fx {
    _serial: MutexGuard<'static, ()>,
    cloud: &'static Cloud,
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

fn setup() -> Fx {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cloud = match CLOUD.get_or_init(Cloud::start) {
        Ok(c) => c,
        Err(e) => panic!("the Keystone + Barbican test cloud could not start:\n{e}"),
    };
    Fx {
        _serial: serial,
        cloud,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Fx {
    /// A fresh state directory.
    fn state(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir(&p).unwrap();
        p
    }

    /// The agent's configuration with `sections` (see `agent_toml`) and a
    /// fresh state directory `name`, loaded from `name.toml`.
    fn config(&self, name: &str, sections: &[String]) -> Config {
        let text = agent_toml(&self.state(name), "", sections);
        load_config(self.dir.path(), &format!("{name}.toml"), &text)
    }

    /// The key manager the agent makes of `sections` (see `agent_toml`)
    /// with a fresh state directory `name`.
    fn key_manager(&self, name: &str, sections: &[String]) -> Box<dyn KeyManager> {
        self.key_manager_in(&self.state(name), sections)
    }

    /// As `key_manager`, with the state directory `state`; the file is
    /// named after it.
    fn key_manager_in(&self, state: &Path, sections: &[String]) -> Box<dyn KeyManager> {
        let name = state.file_name().unwrap().to_str().unwrap();
        let text = agent_toml(state, "", sections);
        manager(self.dir.path(), &format!("{name}.toml"), &text)
    }

    fn fetch(&self, km: &dyn KeyManager, id: &str, auth: &RequestAuth) -> Result<Key, KeyError> {
        let id = KeyId::new(id).unwrap();
        self.rt.block_on(km.fetch(&id, auth))
    }

    fn is_marked(&self, km: &dyn KeyManager, id: &str, auth: &RequestAuth) -> bool {
        let id = KeyId::new(id).unwrap();
        self.rt
            .block_on(km.is_marked_formatted(&id, auth))
            .unwrap_or_else(|e| panic!("is_marked_formatted({id}): {e}"))
    }

    fn mark(&self, km: &dyn KeyManager, id: &str, auth: &RequestAuth) {
        let id = KeyId::new(id).unwrap();
        self.rt
            .block_on(km.mark_formatted(&id, auth))
            .unwrap_or_else(|e| panic!("mark_formatted({id}): {e}"));
    }

    fn intent(&self, km: &dyn KeyManager, id: &str, auth: &RequestAuth) -> Option<FormatIntent> {
        let id = KeyId::new(id).unwrap();
        self.rt
            .block_on(km.formatting_intent(&id, auth))
            .unwrap_or_else(|e| panic!("formatting_intent({id}): {e}"))
    }

    fn set_intent(&self, km: &dyn KeyManager, id: &str, auth: &RequestAuth, i: &FormatIntent) {
        let id = KeyId::new(id).unwrap();
        self.rt
            .block_on(km.mark_formatting(&id, auth, i))
            .unwrap_or_else(|e| panic!("mark_formatting({id}): {e}"));
    }

    /// Sets one metadata key of a secret straight through the API, with
    /// alice's token, as any user allowed to write it could.
    fn put_metadata(&self, id: &str, key: &str, value: &str) {
        let token = self.cloud.token("alice");
        let url = format!("{}/v1/secrets/{id}/metadata/{key}", self.cloud.barbican());
        let client = build_client(&HttpConfig::default()).unwrap();
        self.rt.block_on(async {
            let resp = client
                .put(&url)
                .header("X-Auth-Token", &token)
                .header("Accept", "application/json")
                .json(&serde_json::json!({"key": key, "value": value}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
            assert_eq!(resp.status().as_u16(), 200, "PUT {url}");
        })
    }

    /// Barbican's user metadata of a secret, read with alice's token.
    fn secret_metadata(&self, id: &str) -> Value {
        let token = self.cloud.token("alice");
        let url = format!("{}/v1/secrets/{id}/metadata", self.cloud.barbican());
        let client = build_client(&HttpConfig::default()).unwrap();
        self.rt.block_on(async {
            let resp = client
                .get(&url)
                .header("X-Auth-Token", &token)
                .header("Accept", "application/json")
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!(resp.status().as_u16(), 200, "GET {url}");
            resp.json::<Value>().await.unwrap()
        })
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// A TOML basic string.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn random_key(len: usize) -> Vec<u8> {
    SecretBytes::random(len).unwrap().expose().to_vec()
}

/// The agent's configuration file: `km` lines go into `[key_manager]`
/// (after `backend = "barbican"`), then the given sections.
fn agent_toml(state: &Path, km: &str, sections: &[String]) -> String {
    let mut t = format!(
        "state_dir = {}\n\n[key_manager]\nbackend = \"barbican\"\n{km}\n",
        q(state.to_str().unwrap())
    );
    for s in sections {
        t.push('\n');
        t.push_str(s);
        t.push('\n');
    }
    t
}

fn password_section(c: &Cloud, user: &str, project: &str, password: &str, extra: &str) -> String {
    format!(
        "[key_manager.keystone]\nauth_url = {}\nauth_type = \"password\"\nusername = {}\n\
         password = {}\nproject_name = {}\nuser_domain_name = \"Default\"\n\
         project_domain_name = \"Default\"\n{extra}",
        q(c.auth_url()),
        q(user),
        q(password),
        q(project)
    )
}

fn alice(c: &Cloud) -> String {
    password_section(c, "alice", "proj-a", c.password("alice"), "")
}

fn endpoint_section(endpoint: &str) -> String {
    format!("[key_manager.barbican]\nendpoint = {}", q(endpoint))
}

fn http_section(lines: &str) -> String {
    format!("[key_manager.http]\n{lines}")
}

/// Writes the file with mode 0600 and loads it as the agent does. Only a
/// root-owned file may hold secrets; as another user the same text is
/// parsed with the same schema.
fn load_config(dir: &Path, name: &str, text: &str) -> Config {
    let p = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    drop(f);
    if fs::metadata(&p).unwrap().uid() == 0 {
        Config::load(&p, true).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    } else {
        toml::from_str(text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

fn manager(dir: &Path, name: &str, text: &str) -> Box<dyn KeyManager> {
    load_config(dir, name, text)
        .key_manager()
        .unwrap_or_else(|e| panic!("key_manager(): {e}"))
}

/// A Barbican client built from a configuration's parts, so that its
/// Keystone session's token counter can be read.
fn barbican_from(cfg: &Config) -> Barbican {
    let km = &cfg.key_manager;
    let client = build_client(&km.http).unwrap();
    let ks = Keystone::new(
        km.keystone
            .clone()
            .expect("a [key_manager.keystone] section"),
        km.http.clone(),
        client.clone(),
    )
    .unwrap();
    Barbican::new(
        km.barbican.clone(),
        km.http.clone(),
        client,
        Some(ks),
        &cfg.state_dir,
    )
    .unwrap()
}

fn user_token(token: &str) -> RequestAuth {
    RequestAuth::UserToken {
        token: SecretString::new(token),
        service_token: None,
    }
}

fn user_and_service_token(token: &str, service: &str) -> RequestAuth {
    RequestAuth::UserToken {
        token: SecretString::new(token),
        service_token: Some(SecretString::new(service)),
    }
}

// ---------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------

/// The exact key: bytes, kind, and the passphrase os-brick derives
/// (`binascii.hexlify(key).decode()` for a symmetric key).
fn assert_symmetric(got: Result<Key, KeyError>, want: &[u8]) {
    let key = got.unwrap_or_else(|e| panic!("fetch failed: {e}"));
    assert_eq!(key.kind(), &SecretKind::Symmetric);
    assert_eq!(key.expose(), want, "key bytes");
    assert_eq!(key.bits(), want.len() * 8);
    assert_eq!(
        key.passphrase().expose(),
        hex::encode(want).as_bytes(),
        "passphrase must be the lowercase hex of the key"
    );
}

/// An error names the key id and the endpoint and shows none of `secrets`
/// (key bytes as hex, tokens, passwords), in Display and in Debug.
fn assert_error_text(e: &KeyError, key_id: &str, endpoint: &str, secrets: &[&str]) {
    let shown = e.to_string();
    assert!(
        shown.contains(key_id),
        "{shown:?} does not name key {key_id}"
    );
    assert!(
        shown.contains(endpoint),
        "{shown:?} does not name endpoint {endpoint}"
    );
    let debug = format!("{e:?}");
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!shown.contains(s), "{shown:?} shows a secret");
        assert!(!debug.contains(s), "{debug:?} shows a secret");
    }
}

fn expect_err(got: Result<Key, KeyError>) -> KeyError {
    match got {
        Ok(k) => panic!("expected an error, got {k:?}"),
        Err(e) => e,
    }
}

fn check_status_error(
    e: &KeyError,
    variant: &str,
    want_key: &str,
    want_endpoint: &str,
    want_status: u16,
) {
    let (name, key_id, endpoint, status) = match e {
        KeyError::NotFound {
            key_id,
            endpoint,
            status,
        } => ("NotFound", key_id, endpoint, *status),
        KeyError::Forbidden {
            key_id,
            endpoint,
            status,
        } => ("Forbidden", key_id, endpoint, *status),
        KeyError::Unauthenticated {
            key_id,
            endpoint,
            status,
            ..
        } => ("Unauthenticated", key_id, endpoint, *status),
        other => panic!("expected {variant}, got {other:?}"),
    };
    assert_eq!(name, variant, "{e:?}");
    assert_eq!(key_id, want_key, "{e:?}");
    assert_eq!(endpoint, want_endpoint, "{e:?}");
    assert_eq!(status, want_status, "{e:?}");
}

/// Stops Barbican; starts it again when dropped unless already restarted,
/// so that a failing assertion does not leave the shared cloud broken.
struct BarbicanDown<'a> {
    cloud: &'a Cloud,
    down: bool,
}

impl<'a> BarbicanDown<'a> {
    fn stop(cloud: &'a Cloud) -> Self {
        cloud.run(&["stop-barbican"]);
        BarbicanDown { cloud, down: true }
    }

    fn restart(&mut self) {
        self.down = false;
        self.cloud.run(&["start-barbican"]);
    }
}

impl Drop for BarbicanDown<'_> {
    fn drop(&mut self) {
        if self.down {
            self.down = false;
            if let Err(e) = openstack_py(&["start-barbican", "--state", &self.cloud.state]) {
                eprintln!("restoring Barbican failed: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Password auth as alice, Barbican found in the token's catalog: the
/// exact 32 bytes, and the passphrase os-brick would compute.
#[test]
fn password_auth_with_catalog_endpoint_fetches_exact_key() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let text = agent_toml(&fx.state("s"), "", &[alice(c)]);
    assert!(!text.contains("endpoint"), "the catalog must be used");
    let km = manager(fx.dir.path(), "agent.toml", &text);
    assert!(km.describe().contains("catalog"), "{}", km.describe());
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);
    // A second fetch through the same manager (cached token and endpoint).
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);
}

/// The catalog is filtered by interface and region: `internal` in
/// `RegionOne` is found, another region is a configuration error.
#[test]
fn catalog_interface_and_region() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let ok = password_section(
        c,
        "alice",
        "proj-a",
        c.password("alice"),
        "interface = \"internal\"\nregion_name = \"RegionOne\"\n",
    );
    let km = fx.key_manager("a", &[ok]);
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);

    let elsewhere = password_section(
        c,
        "alice",
        "proj-a",
        c.password("alice"),
        "region_name = \"NoSuchRegion\"\n",
    );
    let km = fx.key_manager("b", &[elsewhere]);
    match expect_err(fx.fetch(&*km, &id, &RequestAuth::Service)) {
        KeyError::Config(msg) => {
            assert!(msg.contains("key-manager"), "{msg}");
            assert!(msg.contains(c.auth_url()), "{msg}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
}

/// Alice's application credential, by id and by name with her user name.
#[test]
fn application_credential_auth_by_id_and_by_name() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();

    let by_id = format!(
        "[key_manager.keystone]\nauth_url = {}\nauth_type = \"application_credential\"\n\
         application_credential_id = {}\napplication_credential_secret = {}\n",
        q(c.auth_url()),
        q(c.app_cred("id")),
        q(c.app_cred("secret"))
    );
    let km = fx.key_manager("id", &[by_id]);
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);

    let by_name = format!(
        "[key_manager.keystone]\nauth_url = {}\nauth_type = \"application_credential\"\n\
         application_credential_name = {}\nusername = \"alice\"\n\
         user_domain_name = \"Default\"\napplication_credential_secret = {}\n",
        q(c.auth_url()),
        q(c.app_cred("name")),
        q(c.app_cred("secret"))
    );
    let km = fx.key_manager("name", &[by_name]);
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);
}

/// A caller's token passed through, with a configured endpoint and no
/// agent credentials; with an `X-Service-Token` (a token holding the
/// `service` role), and with the agent sending its own service token.
#[test]
fn token_pass_through_with_and_without_service_token() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let alice_token = c.token("alice");
    let service_token = c.token("barbican");

    let km = fx.key_manager("plain", &[endpoint_section(c.barbican())]);
    assert_symmetric(fx.fetch(&*km, &id, &user_token(&alice_token)), &want);
    assert_symmetric(
        fx.fetch(
            &*km,
            &id,
            &user_and_service_token(&alice_token, &service_token),
        ),
        &want,
    );
    // The service token is really sent: a bad one makes Barbican refuse.
    let bogus = "gAAAAABnot-a-real-service-token";
    let e = expect_err(fx.fetch(&*km, &id, &user_and_service_token(&alice_token, bogus)));
    check_status_error(&e, "Unauthenticated", &id, c.barbican(), 401);
    assert_error_text(
        &e,
        &id,
        c.barbican(),
        &[&hex::encode(&want), &alice_token, bogus],
    );
    // Without agent credentials there is nothing to authenticate with.
    assert!(matches!(
        expect_err(fx.fetch(&*km, &id, &RequestAuth::Service)),
        KeyError::Config(_)
    ));

    // send_service_token: the agent (here the barbican service user, which
    // holds the service role) adds its own token to alice's.
    let agent = password_section(
        c,
        "barbican",
        "service",
        c.password("barbican"),
        "send_service_token = true\n",
    );
    let km = fx.key_manager("svc", &[endpoint_section(c.barbican()), agent]);
    assert_symmetric(fx.fetch(&*km, &id, &user_token(&alice_token)), &want);
    // An agent whose own token lacks the service role: Barbican refuses the
    // request, which shows that the agent's token was sent along.
    let rita_agent = password_section(
        c,
        "rita",
        "proj-a",
        c.password("rita"),
        "send_service_token = true\n",
    );
    let km = fx.key_manager("rita", &[endpoint_section(c.barbican()), rita_agent]);
    let e = expect_err(fx.fetch(&*km, &id, &user_token(&alice_token)));
    check_status_error(&e, "Unauthenticated", &id, c.barbican(), 401);
}

/// A key id given as a full secret href on another host: only its last
/// segment names the secret, and errors show the id as given.
#[test]
fn href_key_id_uses_only_the_last_segment() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let href = format!("http://bogus.invalid:9311/v1/secrets/{id}");
    let km = fx.key_manager("a", &[alice(c)]);
    assert_symmetric(fx.fetch(&*km, &href, &RequestAuth::Service), &want);
    assert_symmetric(
        fx.fetch(&*km, &format!("{href}/"), &RequestAuth::Service),
        &want,
    );
    assert_symmetric(fx.fetch(&*km, &href, &user_token(&c.token("alice"))), &want);
    let missing = format!(
        "http://bogus.invalid:9311/v1/secrets/{}",
        uuid::Uuid::new_v4()
    );
    let e = expect_err(fx.fetch(&*km, &missing, &RequestAuth::Service));
    check_status_error(&e, "NotFound", &missing, c.barbican(), 404);
    assert_error_text(&e, &missing, c.barbican(), &[&hex::encode(&want)]);
}

/// A `passphrase` secret is the LUKS passphrase as is (raw UTF-8).
#[test]
fn passphrase_secret_is_used_as_raw_utf8() {
    let fx = setup();
    let c = fx.cloud;
    let phrase = "correct horse battery staple – pässwörd ✓";
    let id = c.create_secret(phrase.as_bytes(), "passphrase");
    let km = fx.key_manager("a", &[alice(c)]);
    let key = fx
        .fetch(&*km, &id, &RequestAuth::Service)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(key.kind(), &SecretKind::Passphrase);
    assert_eq!(key.expose(), phrase.as_bytes());
    assert_eq!(key.passphrase().expose(), phrase.as_bytes());
    assert!(!key.is_high_entropy());
}

/// Refusals map to exact errors: another project's member and a reader are
/// Forbidden, a deleted secret is NotFound, a bogus token and a wrong agent
/// password are Unauthenticated. None shows key bytes or credentials.
#[test]
fn refusals_are_typed_errors() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let key_hex = hex::encode(&want);
    let bb = c.barbican();
    let km = fx.key_manager("tok", &[endpoint_section(bb)]);

    for user in ["bob", "rita"] {
        let token = c.token(user);
        let e = expect_err(fx.fetch(&*km, &id, &user_token(&token)));
        check_status_error(&e, "Forbidden", &id, bb, 403);
        assert_error_text(&e, &id, bb, &[&key_hex, &token]);
    }

    let bogus = "gAAAAABbogus-token-for-luks-agent-tests";
    let e = expect_err(fx.fetch(&*km, &id, &user_token(bogus)));
    check_status_error(&e, "Unauthenticated", &id, bb, 401);
    assert_error_text(&e, &id, bb, &[&key_hex, bogus]);

    let agent = fx.key_manager("alice", &[alice(c)]);
    assert_symmetric(fx.fetch(&*agent, &id, &RequestAuth::Service), &want);
    c.delete_secret(&id);
    let e = expect_err(fx.fetch(&*agent, &id, &RequestAuth::Service));
    check_status_error(&e, "NotFound", &id, bb, 404);
    assert_error_text(&e, &id, bb, &[&key_hex, c.password("alice")]);

    let wrong = "not-alices-password-3f9a1c";
    let other = random_key(32);
    let other_id = c.create_secret(&other, "symmetric");
    let km = fx.key_manager(
        "wrong",
        &[password_section(c, "alice", "proj-a", wrong, "")],
    );
    let e = expect_err(fx.fetch(&*km, &other_id, &RequestAuth::Service));
    check_status_error(&e, "Unauthenticated", &other_id, c.auth_url(), 401);
    assert_error_text(&e, &other_id, c.auth_url(), &[&hex::encode(&other), wrong]);
}

/// Barbican stopped: Unavailable (or TimedOut) within the deadline, naming
/// the endpoint; once it is back the same manager fetches the key again.
#[test]
fn barbican_down_then_back() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let http = http_section(
        "connect_timeout_ms = 1000\nrequest_timeout_ms = 2000\nmax_attempts = 20\n\
         backoff_base_ms = 50\nbackoff_max_ms = 400\ndeadline_ms = 3000\n",
    );
    let km = fx.key_manager("a", &[alice(c), http]);
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);

    let mut down = BarbicanDown::stop(c);
    let t = Instant::now();
    let e = expect_err(fx.fetch(&*km, &id, &RequestAuth::Service));
    let elapsed = t.elapsed();
    println!("Barbican down: {e} after {elapsed:?}");
    match &e {
        KeyError::Unavailable {
            key_id,
            endpoint,
            attempts,
            ..
        } => {
            assert_eq!(key_id, &id);
            assert_eq!(endpoint, c.barbican());
            assert!(*attempts >= 1);
        }
        KeyError::TimedOut {
            key_id, endpoint, ..
        } => {
            assert_eq!(key_id, &id);
            assert_eq!(endpoint, c.barbican());
        }
        other => panic!("expected Unavailable or TimedOut, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert_error_text(&e, &id, c.barbican(), &[&hex::encode(&want)]);

    down.restart();
    assert_symmetric(fx.fetch(&*km, &id, &RequestAuth::Service), &want);
}

/// A Barbican endpoint that accepts connections and never answers:
/// TimedOut once the overall deadline passes, not after the (longer)
/// per-request timeout.
#[test]
fn silent_server_times_out_within_deadline() {
    let fx = setup();
    let c = fx.cloud;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = vec![];
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    let http = http_section(
        "connect_timeout_ms = 1000\nrequest_timeout_ms = 10000\nmax_attempts = 3\n\
         deadline_ms = 2000\n",
    );
    let km = fx.key_manager("a", &[alice(c), endpoint_section(&silent), http]);
    let id = uuid::Uuid::new_v4().to_string();
    let t = Instant::now();
    let e = expect_err(fx.fetch(&*km, &id, &RequestAuth::Service));
    let elapsed = t.elapsed();
    println!("silent server: {e} after {elapsed:?}");
    match &e {
        KeyError::TimedOut {
            key_id,
            endpoint,
            after,
        } => {
            assert_eq!(key_id, &id);
            assert_eq!(endpoint, &silent);
            assert!(*after >= Duration::from_millis(1900), "{after:?}");
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(accepted.load(Ordering::SeqCst) >= 1, "never connected");
    assert_error_text(&e, &id, &silent, &[c.password("alice")]);
}

/// A symmetric secret of 3 bytes cannot be a volume key.
#[test]
fn three_byte_secret_is_invalid_key_material() {
    let fx = setup();
    let c = fx.cloud;
    let id = c.create_secret(&[0x01, 0x02, 0x03], "symmetric");
    let km = fx.key_manager("a", &[alice(c)]);
    let e = expect_err(fx.fetch(&*km, &id, &RequestAuth::Service));
    match &e {
        KeyError::InvalidKeyMaterial {
            key_id,
            endpoint,
            reason,
        } => {
            assert_eq!(key_id, &id);
            assert!(endpoint.contains(c.barbican()), "{endpoint}");
            assert!(reason.contains("24 bits"), "{reason}");
        }
        other => panic!("expected InvalidKeyMaterial, got {other:?}"),
    }
    assert_error_text(&e, &id, c.barbican(), &["010203"]);
}

/// The agent's token is cached: five fetches cost one token request, as
/// counted by the agent and in Keystone's access log; another manager
/// instance asks for its own token.
#[test]
fn token_is_cached_across_fetches() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let cfg = fx.config("a", &[alice(c)]);
    const POST: &str = "POST /v3/auth/tokens";
    const CATALOG: &str = "GET /v3/auth/catalog";
    let before = c.settled_agent_requests(POST, 0);
    let catalog_before = c.agent_requests(CATALOG);

    let b = barbican_from(&cfg);
    assert_eq!(b.keystone().unwrap().token_requests(), 0);
    for _ in 0..5 {
        assert_symmetric(fx.fetch(&b, &id, &RequestAuth::Service), &want);
    }
    assert_eq!(b.keystone().unwrap().token_requests(), 1);
    assert_eq!(c.settled_agent_requests(POST, before + 1) - before, 1);

    let again = cfg.key_manager().unwrap();
    assert_symmetric(fx.fetch(&*again, &id, &RequestAuth::Service), &want);
    assert_symmetric(fx.fetch(&*again, &id, &RequestAuth::Service), &want);
    assert_eq!(c.settled_agent_requests(POST, before + 2) - before, 2);
    // The first instance still uses its cached token.
    assert_symmetric(fx.fetch(&b, &id, &RequestAuth::Service), &want);
    assert_eq!(b.keystone().unwrap().token_requests(), 1);
    assert_eq!(c.settled_agent_requests(POST, before + 2) - before, 2);
    // The catalog came with the token: no separate catalog requests.
    assert_eq!(c.agent_requests(CATALOG), catalog_before);
}

/// Time of one fetch with a cached token (metadata + payload), for the
/// record; not asserted.
#[test]
fn cached_fetch_timing() {
    let fx = setup();
    let c = fx.cloud;
    let (want, id) = c.new_symmetric_key();
    let cfg = fx.config("a", &[alice(c)]);
    let b = barbican_from(&cfg);
    let t = Instant::now();
    assert_symmetric(fx.fetch(&b, &id, &RequestAuth::Service), &want);
    let first = t.elapsed();
    let mut times = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        assert_symmetric(fx.fetch(&b, &id, &RequestAuth::Service), &want);
        times.push(t.elapsed());
    }
    assert_eq!(b.keystone().unwrap().token_requests(), 1);
    times.sort();
    println!(
        "fetch timing: first (token + catalog + fetch) {first:?}; cached token: median {:?} \
         (min {:?}, max {:?}, n=10)",
        (times[4] + times[5]) / 2,
        times[0],
        times[9]
    );
}

/// The formatted marker lives in Barbican's secret metadata: another
/// manager with an empty state directory sees it. A reader, whom policy
/// denies metadata, gets a local marker instead, without an error.
#[test]
fn formatted_marker_in_barbican_metadata() {
    let fx = setup();
    let c = fx.cloud;
    let (_, id) = c.new_symmetric_key();
    let svc = RequestAuth::Service;
    let a = fx.key_manager("a", &[alice(c)]);
    assert!(!fx.is_marked(&*a, &id, &svc));
    assert!(
        fx.secret_metadata(&id)["metadata"]
            .get(MARKER_KEY)
            .is_none()
    );
    fx.mark(&*a, &id, &svc);
    assert!(fx.is_marked(&*a, &id, &svc));
    let meta = fx.secret_metadata(&id);
    assert_eq!(MARKER_KEY, "luks-agent-formatted");
    let value = meta["metadata"][MARKER_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("no {MARKER_KEY} in {meta}"));
    assert!(
        humantime::parse_rfc3339_weak(value.trim_end_matches('Z')).is_ok(),
        "{value}"
    );
    // Marking again is harmless.
    fx.mark(&*a, &id, &svc);

    let state_b = fx.state("b");
    let b = fx.key_manager_in(&state_b, &[alice(c)]);
    assert!(fx.is_marked(&*b, &id, &svc), "marker not seen in Barbican");
    assert!(
        !state_b.join("formatted").exists(),
        "the second manager must not have a local marker"
    );
    // Through alice's token as well.
    let t = fx.key_manager("t", &[endpoint_section(c.barbican())]);
    assert!(fx.is_marked(&*t, &id, &user_token(&c.token("alice"))));

    // Rita may not read or write metadata: the marker falls back to the
    // local state directory.
    let other = c.create_secret(&random_key(32), "symmetric");
    let state_r = fx.state("r");
    let r = fx.key_manager_in(&state_r, &[endpoint_section(c.barbican())]);
    let rita = user_token(&c.token("rita"));
    assert!(!fx.is_marked(&*r, &other, &rita));
    fx.mark(&*r, &other, &rita);
    assert!(state_r.join("formatted").join(&other).is_file());
    assert!(fx.is_marked(&*r, &other, &rita));
    assert_eq!(
        fx.secret_metadata(&other)["metadata"],
        serde_json::json!({})
    );
    // And alice's view of that secret is unmarked.
    assert!(!fx.is_marked(&*b, &other, &svc));
}

/// The format intent lives in Barbican's secret metadata beside the
/// marker: another manager with an empty state directory reads it, a
/// second intent replaces the first, a value that does not parse (set by
/// anyone who may write the metadata) is no intent. A reader whom policy
/// denies metadata keeps it locally, without an error.
#[test]
fn format_intent_in_barbican_metadata() {
    let fx = setup();
    let c = fx.cloud;
    let id = c.create_secret(&random_key(32), "symmetric");
    let svc = RequestAuth::Service;
    let a = fx.key_manager("a", &[alice(c)]);
    assert_eq!(fx.intent(&*a, &id, &svc), None);
    let first = FormatIntent::new_here();
    fx.set_intent(&*a, &id, &svc, &first);
    assert_eq!(INTENT_KEY, "luks-agent-formatting");
    let meta = fx.secret_metadata(&id);
    assert_eq!(
        meta["metadata"][INTENT_KEY].as_str(),
        Some(first.encode().as_str()),
        "{meta}"
    );
    assert!(meta["metadata"].get(MARKER_KEY).is_none(), "{meta}");

    let state_b = fx.state("b");
    let b = fx.key_manager_in(&state_b, &[alice(c)]);
    assert_eq!(fx.intent(&*b, &id, &svc), Some(first.clone()));
    assert!(!state_b.join("format-intents").exists());
    // A second intent (a redo on another host) replaces the first, and the
    // first host sees Barbican's, not its own local copy.
    let second = FormatIntent {
        host: "other-host".into(),
        ..FormatIntent::new_here()
    };
    fx.set_intent(&*b, &id, &svc, &second);
    assert_eq!(fx.intent(&*a, &id, &svc), Some(second.clone()));
    // Marker and intent side by side.
    fx.mark(&*b, &id, &svc);
    let meta = fx.secret_metadata(&id);
    assert!(meta["metadata"].get(MARKER_KEY).is_some(), "{meta}");
    assert_eq!(
        meta["metadata"][INTENT_KEY].as_str(),
        Some(second.encode().as_str())
    );
    assert_eq!(fx.intent(&*b, &id, &svc), Some(second));

    // Nonsense set through the API is no intent, for a manager without a
    // local copy; one with a local copy falls back to it.
    let u = uuid::Uuid::new_v4();
    for (n, nonsense) in [
        "nonsense".to_string(),
        format!("{u},soon,h"),
        format!("{u},1,"),
        format!("{u},1,a b"),
        "{\"luks_uuid\": 1}".into(),
    ]
    .iter()
    .enumerate()
    {
        fx.put_metadata(&id, INTENT_KEY, nonsense);
        let fresh = fx.key_manager(&format!("f{n}"), &[alice(c)]);
        assert_eq!(fx.intent(&*fresh, &id, &svc), None, "{nonsense:?}");
        assert_eq!(
            fx.intent(&*a, &id, &svc),
            Some(first.clone()),
            "{nonsense:?}"
        );
    }

    // Rita may not read or write metadata: the intent is kept locally.
    let other = c.create_secret(&random_key(32), "symmetric");
    let state_r = fx.state("r");
    let r = fx.key_manager_in(&state_r, &[endpoint_section(c.barbican())]);
    let rita = user_token(&c.token("rita"));
    assert_eq!(fx.intent(&*r, &other, &rita), None);
    let third = FormatIntent::new_here();
    fx.set_intent(&*r, &other, &rita, &third);
    assert!(state_r.join("format-intents").join(&other).is_file());
    assert_eq!(fx.intent(&*r, &other, &rita), Some(third));
    assert_eq!(
        fx.secret_metadata(&other)["metadata"],
        serde_json::json!({})
    );
}

/// nova's legacy fixed key: the all-zero id resolves to `fixed_key`
/// without any key manager (the Barbican endpoint is a closed port), and a
/// file holding it that others can read is refused.
#[test]
fn legacy_fixed_key() {
    let fx = setup();
    let fixed = random_key(32);
    let fixed_hex = hex::encode(&fixed);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let http = http_section("connect_timeout_ms = 500\nmax_attempts = 2\ndeadline_ms = 2000\n");
    let text = agent_toml(
        &fx.state("a"),
        &format!("fixed_key = {}", q(&fixed_hex)),
        &[endpoint_section(&closed), http],
    );
    let km = manager(fx.dir.path(), "a.toml", &text);
    let token = user_token("gAAAAABunused-token");
    assert_symmetric(fx.fetch(&*km, FIXED_KEY_ID, &token), &fixed);
    assert_symmetric(fx.fetch(&*km, FIXED_KEY_ID, &RequestAuth::Service), &fixed);
    let href = format!("http://bogus.invalid:9311/v1/secrets/{FIXED_KEY_ID}");
    assert_symmetric(fx.fetch(&*km, &href, &token), &fixed);
    let fixed_id = KeyId::new(FIXED_KEY_ID).unwrap();
    assert!(
        !fx.rt
            .block_on(km.is_marked_formatted(&fixed_id, &token))
            .unwrap()
    );
    fx.rt
        .block_on(km.mark_formatted(&fixed_id, &token))
        .unwrap();
    assert!(
        !fx.rt
            .block_on(km.is_marked_formatted(&fixed_id, &token))
            .unwrap()
    );
    // Any other id goes to the (closed) Barbican endpoint.
    let id = uuid::Uuid::new_v4().to_string();
    match expect_err(fx.fetch(&*km, &id, &token)) {
        KeyError::Unavailable {
            key_id, endpoint, ..
        } => {
            assert_eq!(key_id, id);
            assert_eq!(endpoint, closed);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    let p = fx.dir.path().join("exposed.toml");
    fs::write(&p, &text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    match Config::load(&p, true) {
        Err(e @ ConfigError::Exposed { .. }) => {
            let shown = e.to_string();
            assert!(shown.contains("fixed_key"), "{shown}");
            assert!(!shown.contains(&fixed_hex), "{shown}");
            assert!(!format!("{e:?}").contains(&fixed_hex));
            if fs::metadata(&p).unwrap().uid() == 0 {
                assert!(shown.contains("mode 644"), "{shown}");
            }
        }
        Err(other) => panic!("expected ConfigError::Exposed, got {other:?}"),
        Ok(_) => panic!("a world-readable file with fixed_key was accepted"),
    }
}

// ---------------------------------------------------------------------------
// Holding a key while attached: consumers and the read ACL
// ---------------------------------------------------------------------------

/// The agent of a compute host: the `agent` user, member of the service
/// project only, with the catalog's Barbican.
fn agent_user(c: &Cloud, extra: &str) -> Vec<String> {
    vec![
        password_section(c, "agent", "service", c.password("agent"), ""),
        format!(
            "[key_manager.barbican]\nendpoint = {}\n{extra}",
            q(c.barbican())
        ),
    ]
}

fn holder(volume_id: &str, host: &str) -> KeyHolder {
    KeyHolder {
        volume_id: volume_id.into(),
        host: host.into(),
    }
}

impl Fx {
    /// One Barbican API call with `token`, at `version` when given: status
    /// and JSON body (null when there is none).
    fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        version: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.cloud.barbican());
        let client = build_client(&HttpConfig::default()).unwrap();
        self.rt.block_on(async {
            let mut rb = client
                .request(method.clone(), &url)
                .header("X-Auth-Token", token)
                .header("Accept", "application/json");
            if let Some(v) = version {
                rb = rb.header("OpenStack-API-Version", format!("key-manager {v}"));
            }
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            let resp = rb
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn hold(
        &self,
        km: &dyn KeyManager,
        id: &str,
        auth: &RequestAuth,
        h: &KeyHolder,
        op: HoldOp,
        revoke_read: bool,
    ) -> Result<Hold, KeyError> {
        let id = KeyId::new(id).unwrap();
        self.rt.block_on(km.hold(&id, auth, h, op, revoke_read))
    }

    /// The secret's consumers as alice sees them: (service, type, id).
    fn consumers(&self, id: &str) -> Vec<(String, String, String)> {
        let token = self.cloud.token("alice");
        let (status, v) = self.api(
            reqwest::Method::GET,
            &format!("/v1/secrets/{id}/consumers"),
            &token,
            None,
            Some("1.1"),
        );
        assert_eq!(status, 200, "GET consumers: {v}");
        let s = |c: &Value, f: &str| c[f].as_str().unwrap_or_default().to_string();
        let mut out: Vec<_> = v["consumers"]
            .as_array()
            .unwrap_or_else(|| panic!("no consumers in {v}"))
            .iter()
            .map(|c| (s(c, "service"), s(c, "resource_type"), s(c, "resource_id")))
            .collect();
        out.sort();
        out
    }

    /// Alice deletes the secret at microversion 1.2, where consumers
    /// block a delete: the status.
    fn delete_as_of_1_2(&self, id: &str) -> (u16, Value) {
        let token = self.cloud.token("alice");
        self.api(
            reqwest::Method::DELETE,
            &format!("/v1/secrets/{id}"),
            &token,
            None,
            Some("1.2"),
        )
    }

    /// The secret's read ACL as alice sees it: (users, project-access).
    fn read_acl(&self, id: &str) -> (Vec<String>, bool) {
        let token = self.cloud.token("alice");
        let (status, v) = self.api(
            reqwest::Method::GET,
            &format!("/v1/secrets/{id}/acl"),
            &token,
            None,
            None,
        );
        assert_eq!(status, 200, "GET acl: {v}");
        let mut users: Vec<String> = v["read"]["users"]
            .as_array()
            .map(|u| u.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        users.sort();
        (users, v["read"]["project-access"].as_bool().unwrap_or(true))
    }
}

/// While a volume is attached, its secret has this host's consumer and
/// Barbican refuses to delete it (microversion 1.2); a repeated attach
/// keeps one consumer; after the detach the delete succeeds. Two hosts
/// hold two consumers, and each detach removes only its own.
#[test]
fn an_attached_volumes_key_cannot_be_deleted() {
    let fx = setup();
    let c = fx.cloud;
    let (_, id) = c.new_symmetric_key();
    let km = fx.key_manager("hold", &[alice(c), endpoint_section(c.barbican())]);
    let svc = RequestAuth::Service;
    let vol = "0b5e6c2e-7d3a-4a57-9c1e-3f1f4a6b8c01";
    let (one, two) = (holder(vol, "compute-1"), holder(vol, "compute-2"));
    assert_eq!(fx.consumers(&id), vec![]);
    for _ in 0..2 {
        let h = fx.hold(&*km, &id, &svc, &one, HoldOp::Take, false).unwrap();
        assert!(matches!(h, Hold::Held { .. }), "{h:?}");
    }
    assert_eq!(
        fx.consumers(&id),
        vec![(
            "luks-agent".to_string(),
            "volume-attachment@compute-1".to_string(),
            vol.to_string()
        )]
    );
    let (status, body) = fx.delete_as_of_1_2(&id);
    assert_eq!(status, 400, "delete while attached: {body}");
    assert!(body.to_string().contains("consumers"), "{body}");

    fx.hold(&*km, &id, &svc, &two, HoldOp::Take, false).unwrap();
    assert_eq!(fx.consumers(&id).len(), 2);
    let h = fx
        .hold(&*km, &id, &svc, &one, HoldOp::Release, false)
        .unwrap();
    assert_eq!(
        h,
        Hold::Released {
            revoked_read: false
        }
    );
    assert_eq!(fx.consumers(&id)[0].1, "volume-attachment@compute-2");
    assert_eq!(fx.delete_as_of_1_2(&id).0, 400, "compute-2 still holds it");
    // A repeated detach is harmless.
    fx.hold(&*km, &id, &svc, &one, HoldOp::Release, false)
        .unwrap();
    fx.hold(&*km, &id, &svc, &two, HoldOp::Release, false)
        .unwrap();
    assert_eq!(fx.consumers(&id), vec![]);
    let (status, body) = fx.delete_as_of_1_2(&id);
    assert_eq!(status, 204, "delete after the last detach: {body}");
}

/// The agent's own user, member of another project, cannot read a user's
/// key; an attach with the user's token adds it to the key's read ACL (so
/// a later attach without a token, at host boot, can fetch the key and
/// hold it), and a detach with the owner's token takes it off again. An
/// ACL the project had is kept as it was: its users and project access.
#[test]
fn the_agent_reads_a_key_only_while_a_volume_using_it_is_attached() {
    let fx = setup();
    let c = fx.cloud;
    let (key, id) = c.new_symmetric_key();
    let agent = fx.key_manager("agent", &agent_user(c, ""));
    let svc = RequestAuth::Service;
    let alice_token = user_token(&c.token("alice"));
    let me = c.v["users"]["agent"]["id"].as_str().unwrap().to_string();
    let bob = c.v["users"]["bob"]["id"].as_str().unwrap().to_string();
    let vol = "9d0c6a8e-1111-4e2f-8a77-5b4c3d2e1f00";
    let h = holder(vol, "compute-1");

    // A read ACL the project set before: bob, and no project access.
    let (status, v) = fx.api(
        reqwest::Method::PUT,
        &format!("/v1/secrets/{id}/acl"),
        &c.token("alice"),
        Some(serde_json::json!({"read": {"users": [bob], "project-access": false}})),
        None,
    );
    assert_eq!(status, 200, "PUT acl: {v}");

    let before = expect_err(fx.fetch(&*agent, &id, &svc));
    assert!(matches!(before, KeyError::Forbidden { .. }), "{before}");
    // Without access, holding is refused (logged, not an error).
    let h0 = fx
        .hold(&*agent, &id, &svc, &h, HoldOp::Take, false)
        .unwrap();
    assert!(matches!(h0, Hold::NotKept { .. }), "{h0:?}");

    let taken = fx
        .hold(&*agent, &id, &alice_token, &h, HoldOp::Take, false)
        .unwrap();
    assert_eq!(taken, Hold::Held { granted_read: true });
    let mut want = vec![bob.clone(), me.clone()];
    want.sort();
    assert_eq!(fx.read_acl(&id), (want, false));
    // Host boot: no token, the agent's own credentials.
    assert_symmetric(fx.fetch(&*agent, &id, &svc), &key);
    assert_eq!(
        fx.hold(&*agent, &id, &svc, &h, HoldOp::Take, false)
            .unwrap(),
        Hold::Held {
            granted_read: false
        }
    );
    assert_eq!(fx.consumers(&id).len(), 1);

    // A detach without a token removes the consumer; the ACL stays.
    let r = fx
        .hold(&*agent, &id, &svc, &h, HoldOp::Release, true)
        .unwrap();
    assert_eq!(
        r,
        Hold::Released {
            revoked_read: false
        }
    );
    assert_eq!(fx.consumers(&id), vec![]);
    // With the owner's token, the agent leaves the ACL as it found it.
    fx.hold(&*agent, &id, &alice_token, &h, HoldOp::Take, false)
        .unwrap();
    let r = fx
        .hold(&*agent, &id, &alice_token, &h, HoldOp::Release, true)
        .unwrap();
    assert_eq!(r, Hold::Released { revoked_read: true });
    assert_eq!(fx.read_acl(&id), (vec![bob], false));
    let after = expect_err(fx.fetch(&*agent, &id, &svc));
    assert!(matches!(after, KeyError::Forbidden { .. }), "{after}");
    // The secret can go now.
    assert_eq!(fx.delete_as_of_1_2(&id).0, 204);
}

/// Another host still attached keeps the agent on the ACL at one host's
/// detach; `require_consumer` turns a refused hold into a typed error
/// naming the key; a Barbican that refuses is never an error otherwise.
#[test]
fn the_last_host_revokes_and_a_required_hold_fails_loudly() {
    let fx = setup();
    let c = fx.cloud;
    let (_, id) = c.new_symmetric_key();
    let agent = fx.key_manager("agent2", &agent_user(c, ""));
    let alice_token = user_token(&c.token("alice"));
    let me = c.v["users"]["agent"]["id"].as_str().unwrap().to_string();
    let vol = "5a1e0000-2222-4b3c-9d8e-7f6a5b4c3d2e";
    let (one, two) = (holder(vol, "compute-1"), holder(vol, "compute-2"));
    fx.hold(&*agent, &id, &alice_token, &one, HoldOp::Take, false)
        .unwrap();
    fx.hold(&*agent, &id, &alice_token, &two, HoldOp::Take, false)
        .unwrap();
    let r = fx
        .hold(&*agent, &id, &alice_token, &one, HoldOp::Release, true)
        .unwrap();
    assert_eq!(
        r,
        Hold::Released {
            revoked_read: false
        }
    );
    assert!(fx.read_acl(&id).0.contains(&me), "compute-2 needs the ACL");
    let r = fx
        .hold(&*agent, &id, &alice_token, &two, HoldOp::Release, true)
        .unwrap();
    assert_eq!(r, Hold::Released { revoked_read: true });
    assert!(!fx.read_acl(&id).0.contains(&me));

    let strict = fx.key_manager("strict", &agent_user(c, "require_consumer = true"));
    let e = fx
        .hold(
            &*strict,
            &id,
            &RequestAuth::Service,
            &one,
            HoldOp::Take,
            false,
        )
        .unwrap_err();
    assert!(matches!(e, KeyError::NotHeld { .. }), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains(&id) && shown.contains("require_consumer"),
        "{shown}"
    );
    assert_eq!(fx.consumers(&id), vec![]);
}
