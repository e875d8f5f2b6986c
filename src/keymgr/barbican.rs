//! Barbican: secret metadata and payload over its REST API, authenticated
//! with the agent's Keystone session or a caller's token, with the
//! formatted marker and the format intent kept as secret user metadata
//! where policy allows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use super::http::{self, Budget, HttpConfig};
use super::keystone::Keystone;
use super::marker::LocalMarkers;
use super::{
    BoxFuture, FormatIntent, FormatState, FormatStateOp, InvalidMaterial, Key, KeyError, KeyId,
    KeyManager, RequestAuth, SecretKind, SecretString,
};
use crate::secret::{SecretBytes, SecretCollector};

/// Metadata key under which the formatted marker is stored.
pub const MARKER_KEY: &str = "luks-agent-formatted";
/// Metadata key under which the format intent is stored, as
/// [`FormatIntent::encode`] writes it.
pub const INTENT_KEY: &str = "luks-agent-formatting";
/// Largest payload or metadata body we read; a volume key is bytes long.
const MAX_BODY: usize = 64 * 1024;

/// The `[key_manager.barbican]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BarbicanConfig {
    /// Barbican endpoint without `/v1`; from the Keystone catalog
    /// (service type `key-manager`) when unset.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Fail an attach when Barbican does not register the agent as a
    /// consumer of the volume's secret (no consumer support, or policy
    /// refuses). Off: such an attach goes on and the refusal is logged once
    /// per volume.
    #[serde(default)]
    pub require_consumer: bool,
}

/// A Barbican client.
pub struct Barbican {
    pub(super) cfg: BarbicanConfig,
    pub(super) http: HttpConfig,
    client: reqwest::Client,
    pub(super) keystone: Option<Keystone>,
    discovered: tokio::sync::Mutex<Option<String>>,
    markers: LocalMarkers,
    metadata_refused: AtomicBool,
}

enum Auth {
    Headers {
        token: SecretString,
        service_token: Option<SecretString>,
        is_service: bool,
    },
}

/// One Barbican API request.
pub(super) struct ApiRequest<'a> {
    pub(super) method: reqwest::Method,
    pub(super) path: &'a str,
    pub(super) accept: &'a str,
    pub(super) body: Option<&'a Value>,
    /// The microversion to ask for (`OpenStack-API-Version`), if any.
    pub(super) api_version: Option<&'a str>,
}

/// A secret as [`Barbican::fetch_secret`] returns it.
struct FetchedSecret<T> {
    /// What `kind_of` made of the secret type.
    kind: T,
    /// The secret's metadata.
    meta: Value,
    /// The payload.
    payload: SecretBytes,
    /// The endpoint it came from (for errors).
    base: String,
}

pub(super) struct Answer {
    pub(super) status: u16,
    content_type: String,
    pub(super) body: SecretBytes,
}

impl Barbican {
    /// A client; `keystone` is needed for service credentials and catalog
    /// lookup, optional when an endpoint is configured and callers pass
    /// tokens.
    pub fn new(
        cfg: BarbicanConfig,
        http: HttpConfig,
        client: reqwest::Client,
        keystone: Option<Keystone>,
        state_dir: &Path,
    ) -> Result<Barbican, KeyError> {
        if cfg.endpoint.is_none() && keystone.is_none() {
            return Err(KeyError::Config(
                "barbican needs an endpoint or a [key_manager.keystone] section".into(),
            ));
        }
        Ok(Barbican {
            cfg,
            http,
            client,
            keystone,
            discovered: tokio::sync::Mutex::new(None),
            markers: LocalMarkers::new(state_dir),
            metadata_refused: AtomicBool::new(false),
        })
    }

    /// Keystone session (for metrics and tests).
    pub fn keystone(&self) -> Option<&Keystone> {
        self.keystone.as_ref()
    }

    pub(super) fn endpoint_label(&self) -> String {
        self.cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| "barbican (from catalog)".into())
    }

    async fn auth(
        &self,
        req: &RequestAuth,
        key_id: &str,
        budget: &Budget,
    ) -> Result<(Auth, Option<Value>), KeyError> {
        match req {
            RequestAuth::Service => {
                let ks = self.keystone.as_ref().ok_or_else(|| {
                    KeyError::Config(
                        "no caller token and no [key_manager.keystone] credentials".into(),
                    )
                })?;
                let (token, catalog) = ks.token(key_id, budget).await?;
                Ok((
                    Auth::Headers {
                        token,
                        service_token: None,
                        is_service: true,
                    },
                    Some(catalog),
                ))
            }
            RequestAuth::UserToken {
                token,
                service_token,
            } => {
                let service_token = match (service_token, &self.keystone) {
                    (Some(s), _) => Some(s.clone()),
                    (None, Some(ks)) if ks.sends_service_token() => {
                        Some(ks.token(key_id, budget).await?.0)
                    }
                    _ => None,
                };
                Ok((
                    Auth::Headers {
                        token: token.clone(),
                        service_token,
                        is_service: false,
                    },
                    None,
                ))
            }
        }
    }

    async fn endpoint(
        &self,
        auth: &Auth,
        catalog: Option<Value>,
        key_id: &str,
        budget: &Budget,
    ) -> Result<String, KeyError> {
        if let Some(e) = &self.cfg.endpoint {
            return Ok(e.trim_end_matches('/').to_string());
        }
        let mut cached = self.discovered.lock().await;
        if let Some(e) = cached.as_ref() {
            return Ok(e.clone());
        }
        let ks = self
            .keystone
            .as_ref()
            .ok_or_else(|| KeyError::Config("no Barbican endpoint configured".into()))?;
        let catalog = match (catalog, auth) {
            (Some(c), _) => c,
            (None, Auth::Headers { token, .. }) => ks.catalog_for(token, key_id, budget).await?,
        };
        let url = ks
            .endpoint_from_catalog(&catalog, "key-manager")
            .ok_or_else(|| {
                KeyError::Config(format!(
                    "no key-manager endpoint in the catalog of {}",
                    ks.auth_url()
                ))
            })?;
        let url = url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        *cached = Some(url.clone());
        Ok(url)
    }

    /// One API call with authentication, re-authenticating once on 401
    /// when using the agent's own credentials.
    pub(super) async fn call(
        &self,
        req: &RequestAuth,
        key_id: &str,
        api: ApiRequest<'_>,
        budget: &Budget,
    ) -> Result<(Answer, String), KeyError> {
        let ApiRequest {
            method,
            path,
            accept,
            body,
            api_version,
        } = api;
        for round in 0..2 {
            let (auth, catalog) = self.auth(req, key_id, budget).await?;
            let base = self.endpoint(&auth, catalog, key_id, budget).await?;
            let url = format!("{base}{path}");
            let Auth::Headers {
                token,
                service_token,
                is_service,
            } = &auth;
            let resp = http::send(&self.http, budget, || {
                let mut rb = self
                    .client
                    .request(method.clone(), &url)
                    .header("X-Auth-Token", token.expose())
                    .header("Accept", accept);
                if let Some(s) = service_token {
                    rb = rb.header("X-Service-Token", s.expose());
                }
                if let Some(v) = api_version {
                    rb = rb.header("OpenStack-API-Version", format!("key-manager {v}"));
                }
                if let Some(b) = body {
                    rb = rb.json(b);
                }
                rb
            })
            .await
            .map_err(|f| f.into_key_error(key_id, &base))?;
            let status = resp.status().as_u16();
            if status == 401
                && *is_service
                && round == 0
                && let Some(ks) = &self.keystone
            {
                ks.invalidate().await;
                continue;
            }
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let body = read_capped(resp, key_id, &base, status, budget).await?;
            return Ok((
                Answer {
                    status,
                    content_type,
                    body,
                },
                base,
            ));
        }
        unreachable!("the loop returns or continues once")
    }

    pub(super) fn status_error(
        &self,
        a: &Answer,
        key_id: &str,
        endpoint: &str,
        what: &str,
    ) -> KeyError {
        let (key_id, endpoint, status) = (key_id.to_string(), endpoint.to_string(), a.status);
        match a.status {
            401 => KeyError::Unauthenticated {
                key_id,
                endpoint,
                status,
                reason: "the token was refused".into(),
            },
            403 => KeyError::Forbidden {
                key_id,
                endpoint,
                status,
            },
            404 => KeyError::NotFound {
                key_id,
                endpoint,
                status,
            },
            _ => KeyError::Protocol {
                key_id,
                endpoint,
                status,
                reason: format!("unexpected status for {what}"),
            },
        }
    }

    async fn fetch_key(&self, id: &KeyId, auth: &RequestAuth) -> Result<Key, KeyError> {
        let secret = self
            .fetch_secret(id, auth, |secret_type| match secret_type {
                Some("passphrase") => Ok(SecretKind::Passphrase),
                Some("symmetric") | Some("opaque") | None => Ok(SecretKind::Symmetric),
                Some(other) => Err(format!("secret type '{other}' cannot be a volume key")),
            })
            .await?;
        let key_id = id.as_str();
        let key = Key::new(id.clone(), secret.kind, secret.payload)
            .map_err(|e| e.at(key_id, &secret.base))?;
        if let Some(bits) = secret.meta["bit_length"].as_u64()
            && key.kind() == &SecretKind::Symmetric
            && bits != key.bits() as u64
        {
            return Err(InvalidMaterial(format!(
                "payload has {} bits but the secret says {bits}",
                key.bits()
            ))
            .at(key_id, &secret.base));
        }
        Ok(key)
    }

    /// A certificate secret's payload as DER. Barbican keeps what was
    /// stored; castellan reads it as PEM only and hands DER to its
    /// callers, so a payload that is not PEM is refused as it refuses it.
    async fn fetch_certificate_der(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<Vec<u8>, KeyError> {
        let secret = self
            .fetch_secret(id, auth, |secret_type| match secret_type {
                Some("certificate") => Ok(()),
                other => Err(format!(
                    "secret type '{}' is not a certificate",
                    other.unwrap_or("none")
                )),
            })
            .await?;
        super::certificate_from_pem(secret.payload.expose())
            .map_err(|reason| InvalidMaterial(reason).at(id.as_str(), &secret.base))
    }

    /// A secret's metadata and payload. `kind_of` reads the secret type
    /// (absent: `None`) and refuses, before the payload is fetched, a
    /// secret that cannot be what the caller wants.
    async fn fetch_secret<T>(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        kind_of: impl Fn(Option<&str>) -> Result<T, String>,
    ) -> Result<FetchedSecret<T>, KeyError> {
        let budget = &Budget::start(&self.http);
        let uuid = id.uuid_text()?;
        let key_id = id.as_str();
        let meta_path = format!("/v1/secrets/{uuid}");
        let (meta, base) = self
            .call(
                auth,
                key_id,
                ApiRequest {
                    method: reqwest::Method::GET,
                    path: &meta_path,
                    accept: "application/json",
                    body: None,
                    api_version: None,
                },
                budget,
            )
            .await?;
        if meta.status != 200 {
            return Err(self.status_error(&meta, key_id, &base, "secret metadata"));
        }
        let protocol = |status: u16, reason: String| KeyError::Protocol {
            key_id: key_id.into(),
            endpoint: base.clone(),
            status,
            reason,
        };
        let meta_json: Value = serde_json::from_slice(meta.body.expose())
            .map_err(|e| protocol(meta.status, format!("secret metadata is not JSON: {e}")))?;
        if let Some(state) = meta_json["status"].as_str()
            && state != "ACTIVE"
        {
            return Err(InvalidMaterial(format!("secret status is {state}")).at(key_id, &base));
        }
        let kind = kind_of(meta_json["secret_type"].as_str())
            .map_err(|reason| InvalidMaterial(reason).at(key_id, &base))?;
        let accept = meta_json["content_types"]["default"]
            .as_str()
            .unwrap_or("application/octet-stream")
            .to_string();
        if accept.is_empty()
            || accept.len() > 128
            || !accept.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(protocol(
                meta.status,
                "secret metadata names no usable content type".into(),
            ));
        }
        let (payload, base) = self
            .call(
                auth,
                key_id,
                ApiRequest {
                    method: reqwest::Method::GET,
                    path: &format!("{meta_path}/payload"),
                    accept: &accept,
                    body: None,
                    api_version: None,
                },
                budget,
            )
            .await?;
        if payload.status != 200 {
            return Err(self.status_error(&payload, key_id, &base, "the secret payload"));
        }
        let wanted = accept
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !payload.content_type.is_empty() && payload.content_type != wanted {
            return Err(protocol(
                payload.status,
                format!(
                    "payload content type '{}' instead of '{wanted}'",
                    payload.content_type
                ),
            ));
        }
        Ok(FetchedSecret {
            kind,
            meta: meta_json,
            payload: payload.body,
            base,
        })
    }

    /// `METHOD /v1/secrets/<uuid>/metadata[/<key>]` with `body`, within
    /// `budget` (the caller's, when one operation makes several calls).
    async fn metadata_call(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        (method, key, body): (reqwest::Method, Option<&str>, Option<&Value>),
        budget: Option<&Budget>,
    ) -> Result<(Answer, String), KeyError> {
        let own;
        let budget = match budget {
            Some(b) => b,
            None => {
                own = Budget::start(&self.http);
                &own
            }
        };
        let uuid = id.uuid_text()?;
        let path = match key {
            Some(k) => format!("/v1/secrets/{uuid}/metadata/{k}"),
            None => format!("/v1/secrets/{uuid}/metadata"),
        };
        self.call(
            auth,
            id.as_str(),
            ApiRequest {
                method,
                path: &path,
                accept: "application/json",
                body,
                api_version: None,
            },
            budget,
        )
        .await
    }

    /// The secret's user metadata, `None` when policy refuses it.
    async fn metadata_get(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<Option<Value>, KeyError> {
        let (a, base) = self
            .metadata_call(id, auth, (reqwest::Method::GET, None, None), None)
            .await?;
        match a.status {
            200 => {
                let v: Value =
                    serde_json::from_slice(a.body.expose()).map_err(|e| KeyError::Protocol {
                        key_id: id.to_string(),
                        endpoint: base.clone(),
                        status: 200,
                        reason: format!("secret metadata is not JSON: {e}"),
                    })?;
                Ok(Some(v))
            }
            403 => {
                self.note_metadata_refused(&base);
                Ok(None)
            }
            _ => Err(self.status_error(&a, id.as_str(), &base, "secret metadata")),
        }
    }

    async fn marker_get(&self, id: &KeyId, auth: &RequestAuth) -> Result<bool, KeyError> {
        if self.markers.is_marked(id)? {
            return Ok(true);
        }
        Ok(self
            .metadata_get(id, auth)
            .await?
            .is_some_and(|v| v["metadata"].get(MARKER_KEY).is_some()))
    }

    /// The intent in Barbican, else the local one (written first, so it
    /// is the only one after a crash or a refusal between the two). A
    /// value in Barbican that does not parse counts as none: anyone who
    /// may write the secret's metadata can put anything there.
    async fn intent_get(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<Option<FormatIntent>, KeyError> {
        if let Some(v) = self.metadata_get(id, auth).await? {
            match v["metadata"].get(INTENT_KEY) {
                None => {}
                Some(Value::String(s)) if FormatIntent::decode(s).is_some() => {
                    return Ok(FormatIntent::decode(s));
                }
                Some(_) => tracing::warn!(
                    key_id = id.as_str(),
                    "ignoring a {INTENT_KEY} value in the secret's metadata that does not parse"
                ),
            }
        }
        self.markers.intent(id)
    }

    /// Writes the intent locally, then into the secret's metadata: created,
    /// or replaced when an earlier format attempt left one.
    async fn intent_set(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        intent: &FormatIntent,
    ) -> Result<(), KeyError> {
        self.markers.set_intent(id, intent)?;
        self.metadata_put(id, auth, INTENT_KEY, &intent.encode(), true)
            .await
    }

    /// Removes the intent from the secret's metadata when it is `intent`,
    /// and the local copy likewise (first: it cannot be refused).
    async fn intent_withdraw(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        intent: &FormatIntent,
    ) -> Result<(), KeyError> {
        self.markers.withdraw_intent(id, intent)?;
        let Some(v) = self.metadata_get(id, auth).await? else {
            return Ok(());
        };
        let stored = v["metadata"]
            .get(INTENT_KEY)
            .and_then(Value::as_str)
            .and_then(FormatIntent::decode);
        if stored.as_ref() != Some(intent) {
            return Ok(());
        }
        let (a, base) = self
            .metadata_call(
                id,
                auth,
                (reqwest::Method::DELETE, Some(INTENT_KEY), None),
                None,
            )
            .await?;
        match a.status {
            200 | 204 | 404 => Ok(()),
            403 => {
                self.note_metadata_refused(&base);
                Ok(())
            }
            _ => Err(self.status_error(&a, id.as_str(), &base, "removing secret metadata")),
        }
    }

    async fn marker_set(&self, id: &KeyId, auth: &RequestAuth) -> Result<(), KeyError> {
        // Locally first: it cannot be refused by policy, and a crash between
        // the two still leaves one marker.
        self.markers.mark(id)?;
        let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        // A marker that exists already (409) is as good as ours.
        self.metadata_put(id, auth, MARKER_KEY, &when, false).await
    }

    /// Sets one user-metadata `key` of the secret: created, or when it
    /// exists (409) replaced if `replace`, else left as it is. A policy
    /// refusal (403) is noted once and is not an error: the caller's local
    /// copy stands in.
    async fn metadata_put(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        key: &str,
        value: &str,
        replace: bool,
    ) -> Result<(), KeyError> {
        if self.metadata_refused.load(Ordering::Relaxed) {
            return Ok(());
        }
        let budget = &Budget::start(&self.http);
        let body = &serde_json::json!({"key": key, "value": value});
        let (mut a, base) = self
            .metadata_call(
                id,
                auth,
                (reqwest::Method::POST, None, Some(body)),
                Some(budget),
            )
            .await?;
        if a.status == 409 && replace {
            a = self
                .metadata_call(
                    id,
                    auth,
                    (reqwest::Method::PUT, Some(key), Some(body)),
                    Some(budget),
                )
                .await?
                .0;
        }
        match a.status {
            200 | 201 => Ok(()),
            409 if !replace => Ok(()),
            403 => {
                self.note_metadata_refused(&base);
                Ok(())
            }
            _ => Err(self.status_error(&a, id.as_str(), &base, "writing secret metadata")),
        }
    }

    fn note_metadata_refused(&self, endpoint: &str) {
        if !self.metadata_refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                endpoint,
                "Barbican policy does not allow secret metadata; formatted markers and format intents are kept in the local state directory only"
            );
        }
    }
}

async fn read_capped(
    mut resp: reqwest::Response,
    key_id: &str,
    endpoint: &str,
    status: u16,
    budget: &Budget,
) -> Result<SecretBytes, KeyError> {
    let (started, deadline) = (budget.started, budget.deadline);
    let mut body = SecretCollector::new(MAX_BODY);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match tokio::time::timeout(left, resp.chunk()).await {
            Err(_) => {
                return Err(KeyError::TimedOut {
                    key_id: key_id.into(),
                    endpoint: endpoint.into(),
                    after: started.elapsed(),
                });
            }
            Ok(Err(e)) => {
                return Err(KeyError::Unavailable {
                    key_id: key_id.into(),
                    endpoint: endpoint.into(),
                    attempts: 1,
                    last: format!("reading the body: {e}"),
                });
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if !body.push(&chunk) {
            return Err(KeyError::Protocol {
                key_id: key_id.into(),
                endpoint: endpoint.into(),
                status,
                reason: format!("response body larger than {MAX_BODY} bytes"),
            });
        }
    }
    Ok(body.finish())
}

impl KeyManager for Barbican {
    fn format_state<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        op: FormatStateOp<'a>,
    ) -> BoxFuture<'a, Result<FormatState, KeyError>> {
        Box::pin(async move {
            Ok(match op {
                FormatStateOp::IsMarked => FormatState::Marked(self.marker_get(id, auth).await?),
                FormatStateOp::Mark => {
                    self.marker_set(id, auth).await?;
                    FormatState::Done
                }
                FormatStateOp::SetIntent(intent) => {
                    self.intent_set(id, auth, intent).await?;
                    FormatState::Done
                }
                FormatStateOp::WithdrawIntent(intent) => {
                    self.intent_withdraw(id, auth, intent).await?;
                    FormatState::Done
                }
                FormatStateOp::Intent => FormatState::Intent(self.intent_get(id, auth).await?),
            })
        })
    }

    fn describe(&self) -> String {
        format!("barbican {}", self.endpoint_label())
    }

    fn hold<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
        holder: &'a super::KeyHolder,
        op: super::HoldOp,
        revoke_read: bool,
    ) -> BoxFuture<'a, Result<super::Hold, KeyError>> {
        Box::pin(self.keep(id, auth, holder, op, revoke_read))
    }

    fn fetch<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Key, KeyError>> {
        Box::pin(self.fetch_key(id, auth))
    }

    fn fetch_certificate<'a>(
        &'a self,
        id: &'a KeyId,
        auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Vec<u8>, KeyError>> {
        Box::pin(self.fetch_certificate_der(id, auth))
    }
}
