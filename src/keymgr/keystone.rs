//! Keystone v3 authentication: the agent's own credentials (password or
//! application credential) with a token cache, and service catalog lookup
//! for a caller's token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{self, Budget, HttpConfig};
use super::{KeyError, SecretString};

/// How the agent authenticates itself.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    /// User name and password, scoped to a project.
    Password,
    /// Application credential (by id, or by name with its user).
    ApplicationCredential,
}

fn default_domain() -> String {
    "Default".into()
}
fn default_interface() -> String {
    "public".into()
}

/// The `[key_manager.keystone]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoneConfig {
    /// Identity endpoint, e.g. `https://keystone:5000/v3`.
    pub auth_url: String,
    /// Which credentials follow.
    pub auth_type: AuthType,
    /// User name (password auth, or application credential by name).
    #[serde(default)]
    pub username: Option<String>,
    /// Domain of the user.
    #[serde(default = "default_domain")]
    pub user_domain_name: String,
    /// Password (password auth).
    #[serde(default)]
    pub password: Option<SecretString>,
    /// Project to scope to (password auth).
    #[serde(default)]
    pub project_name: Option<String>,
    /// Domain of the project.
    #[serde(default = "default_domain")]
    pub project_domain_name: String,
    /// Application credential id.
    #[serde(default)]
    pub application_credential_id: Option<String>,
    /// Application credential name (with `username`).
    #[serde(default)]
    pub application_credential_name: Option<String>,
    /// Application credential secret.
    #[serde(default)]
    pub application_credential_secret: Option<SecretString>,
    /// Catalog interface to use (`public`, `internal`, `admin`).
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Catalog region (any when unset).
    #[serde(default)]
    pub region_name: Option<String>,
    /// Send the agent's own token as `X-Service-Token` along with a
    /// caller's user token.
    #[serde(default)]
    pub send_service_token: bool,
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut s = String::deserialize(d)?;
        let secret = SecretString::new(&s);
        zeroize::Zeroize::zeroize(&mut s);
        Ok(secret)
    }
}

struct CachedToken {
    token: SecretString,
    refresh_after: SystemTime,
    catalog: Value,
    user_id: Option<String>,
}

/// The agent's Keystone session.
pub struct Keystone {
    cfg: KeystoneConfig,
    http: HttpConfig,
    client: reqwest::Client,
    cache: tokio::sync::Mutex<Option<CachedToken>>,
    token_requests: AtomicU64,
}

/// Tokens are renewed this long before Keystone says they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(120);

impl Keystone {
    /// Checks the configuration and prepares a session (no network yet).
    pub fn new(
        cfg: KeystoneConfig,
        http: HttpConfig,
        client: reqwest::Client,
    ) -> Result<Keystone, KeyError> {
        let bad = |what: &str| Err(KeyError::Config(format!("keystone: {what}")));
        match cfg.auth_type {
            AuthType::Password => {
                if cfg.username.is_none() || cfg.password.is_none() || cfg.project_name.is_none() {
                    return bad("password auth needs username, password and project_name");
                }
            }
            AuthType::ApplicationCredential => {
                if cfg.application_credential_secret.is_none() {
                    return bad("application credential auth needs application_credential_secret");
                }
                if cfg.application_credential_id.is_none()
                    && (cfg.application_credential_name.is_none() || cfg.username.is_none())
                {
                    return bad("application credential auth needs an id, or a name and username");
                }
            }
        }
        Ok(Keystone {
            cfg,
            http,
            client,
            cache: tokio::sync::Mutex::new(None),
            token_requests: AtomicU64::new(0),
        })
    }

    /// The identity endpoint.
    pub fn auth_url(&self) -> &str {
        &self.cfg.auth_url
    }

    /// Whether to send our token as a service token with user tokens.
    pub fn sends_service_token(&self) -> bool {
        self.cfg.send_service_token
    }

    /// How many token requests this Keystone client has made (for metrics and to
    /// prove the cache in tests).
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    fn auth_body(&self) -> Value {
        let c = &self.cfg;
        let secret = |s: &Option<SecretString>| {
            s.as_ref()
                .map(|s| s.expose().to_string())
                .unwrap_or_default()
        };
        match c.auth_type {
            AuthType::Password => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": c.username, "domain": {"name": c.user_domain_name}, "password": secret(&c.password)
                }}},
                "scope": {"project": {"name": c.project_name, "domain": {"name": c.project_domain_name}}}
            }}),
            AuthType::ApplicationCredential => {
                let mut cred = json!({"secret": secret(&c.application_credential_secret)});
                match &c.application_credential_id {
                    Some(id) => cred["id"] = json!(id),
                    None => {
                        cred["name"] = json!(c.application_credential_name);
                        cred["user"] =
                            json!({"name": c.username, "domain": {"name": c.user_domain_name}});
                    }
                }
                json!({"auth": {"identity": {"methods": ["application_credential"], "application_credential": cred}}})
            }
        }
    }

    /// A valid token of the agent (cached until shortly before expiry) and
    /// the catalog that came with it.
    pub async fn token(
        &self,
        key_id: &str,
        budget: &Budget,
    ) -> Result<(SecretString, Value), KeyError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && SystemTime::now() < c.refresh_after
        {
            return Ok((c.token.clone(), c.catalog.clone()));
        }
        let url = format!("{}/auth/tokens", self.cfg.auth_url.trim_end_matches('/'));
        let mut body = self.auth_body();
        self.token_requests.fetch_add(1, Ordering::Relaxed);
        let sent = http::send(&self.http, budget, || self.client.post(&url).json(&body)).await;
        wipe_json(&mut body);
        let resp = sent.map_err(|f| f.into_key_error(key_id, &self.cfg.auth_url))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(KeyError::Unauthenticated {
                key_id: key_id.into(),
                endpoint: self.cfg.auth_url.clone(),
                status,
                reason: "Keystone refused the agent's credentials".into(),
            });
        }
        let protocol = |reason: String| KeyError::Protocol {
            key_id: key_id.into(),
            endpoint: self.cfg.auth_url.clone(),
            status,
            reason,
        };
        if status != 201 && status != 200 {
            return Err(protocol(format!(
                "unexpected status for a token request: {status}"
            )));
        }
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(SecretString::new)
            .ok_or_else(|| protocol("no X-Subject-Token header".into()))?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| protocol(format!("token body: {e}")))?;
        let expires = body["token"]["expires_at"]
            .as_str()
            .and_then(|s| humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok())
            .ok_or_else(|| protocol("token without a readable expires_at".into()))?;
        let lifetime = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let margin = EXPIRY_MARGIN.min(lifetime / 10);
        let catalog = body["token"]["catalog"].clone();
        let user_id = body["token"]["user"]["id"].as_str().map(str::to_string);
        *cache = Some(CachedToken {
            token: token.clone(),
            refresh_after: expires - margin,
            catalog: catalog.clone(),
            user_id,
        });
        Ok((token, catalog))
    }

    /// The Keystone user id of the agent's own credentials, as its token
    /// names it (fetching a token when none is cached).
    pub async fn user_id(&self, key_id: &str, budget: &Budget) -> Result<String, KeyError> {
        self.token(key_id, budget).await?;
        let cache = self.cache.lock().await;
        cache
            .as_ref()
            .and_then(|c| c.user_id.clone())
            .ok_or_else(|| KeyError::Protocol {
                key_id: key_id.into(),
                endpoint: self.cfg.auth_url.clone(),
                status: 201,
                reason: "the agent's token names no user id".into(),
            })
    }

    /// Forgets the cached token (after a 401 from a service).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    /// The catalog as seen by a caller's token (`GET /v3/auth/catalog`).
    pub async fn catalog_for(
        &self,
        token: &SecretString,
        key_id: &str,
        budget: &Budget,
    ) -> Result<Value, KeyError> {
        let url = format!("{}/auth/catalog", self.cfg.auth_url.trim_end_matches('/'));
        let resp = http::send(&self.http, budget, || {
            self.client.get(&url).header("X-Auth-Token", token.expose())
        })
        .await
        .map_err(|f| f.into_key_error(key_id, &self.cfg.auth_url))?;
        let status = resp.status().as_u16();
        if status == 401 {
            return Err(KeyError::Unauthenticated {
                key_id: key_id.into(),
                endpoint: self.cfg.auth_url.clone(),
                status,
                reason: "Keystone refused the caller's token".into(),
            });
        }
        let body: Value = resp.json().await.map_err(|e| KeyError::Protocol {
            key_id: key_id.into(),
            endpoint: self.cfg.auth_url.clone(),
            status,
            reason: format!("catalog body: {e}"),
        })?;
        Ok(body["catalog"].clone())
    }

    /// The URL of `service_type` in `catalog` for the configured interface
    /// and region.
    pub fn endpoint_from_catalog(&self, catalog: &Value, service_type: &str) -> Option<String> {
        catalog
            .as_array()?
            .iter()
            .filter(|s| s["type"] == service_type)
            .find_map(|s| {
                s["endpoints"].as_array()?.iter().find_map(|e| {
                    let region_ok = match &self.cfg.region_name {
                        Some(r) => e["region_id"] == r.as_str() || e["region"] == r.as_str(),
                        None => true,
                    };
                    (e["interface"] == self.cfg.interface.as_str() && region_ok)
                        .then(|| e["url"].as_str().map(str::to_string))
                        .flatten()
                })
            })
    }
}

/// Overwrites every string in a JSON document (request bodies that held a
/// password) before it is dropped.
fn wipe_json(v: &mut Value) {
    match v {
        Value::String(s) => zeroize::Zeroize::zeroize(s),
        Value::Array(a) => a.iter_mut().for_each(wipe_json),
        Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}
