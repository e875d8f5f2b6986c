//! Barbican secret consumers and read ACLs for attached volumes. While a
//! volume is attached on a host, the agent is registered as a consumer of
//! the volume's secret, so that Barbican refuses to delete it (API
//! microversion 1.2 and later). While a caller's token is at hand, the
//! agent also puts its own Keystone user on the secret's read ACL, so that
//! attaches without a token (host boot, evacuation) fetch the key with the
//! agent's own credentials and no role beyond its own project.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::barbican::{Answer, ApiRequest, Barbican};
use super::http::Budget;
use super::{Hold, HoldOp, KeyError, KeyHolder, KeyId, RequestAuth};

/// The consumer's `service`: a name no OpenStack service registers, so our
/// consumers never collide with one that cinder or glance may register
/// for the volume itself.
pub const CONSUMER_SERVICE: &str = "luks-agent";
/// Prefix of the consumer's `resource_type`; the host follows, so that
/// every host of a multi-attached or migrating volume has its own.
pub const CONSUMER_TYPE_PREFIX: &str = "volume-attachment@";
/// The microversion that has secret consumers.
const CONSUMERS_VERSION: &str = "1.1";
/// Barbican stores a consumer's `resource_id` in 36 characters.
const MAX_RESOURCE_ID: usize = 36;

/// The consumer body of `holder`: service, type with the host, and the
/// volume id (a longer id than Barbican keeps becomes the first 36 hex
/// digits of its SHA-256).
pub fn consumer_of(holder: &KeyHolder) -> Value {
    let resource_id = if holder.volume_id.len() <= MAX_RESOURCE_ID {
        holder.volume_id.clone()
    } else {
        hex::encode(Sha256::digest(holder.volume_id.as_bytes()))[..MAX_RESOURCE_ID].to_string()
    };
    json!({
        "service": CONSUMER_SERVICE,
        "resource_type": format!("{CONSUMER_TYPE_PREFIX}{}", holder.host),
        "resource_id": resource_id,
    })
}

impl Barbican {
    /// [`KeyManager::hold`](super::KeyManager::hold) for Barbican.
    pub(super) async fn keep(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        holder: &KeyHolder,
        op: HoldOp,
        revoke_read: bool,
    ) -> Result<Hold, KeyError> {
        let budget = &Budget::start(&self.http);
        let held = match op {
            HoldOp::Release => return self.release(id, auth, holder, revoke_read, budget).await,
            HoldOp::Take => self.take(id, auth, holder, budget).await,
        };
        // Taking the hold is an extra safety, not part of opening the
        // volume: Barbican failing at it fails the attach only when the
        // configuration requires the hold.
        let required = self.cfg.require_consumer;
        match held {
            Ok(Hold::NotKept { reason }) if required => Err(KeyError::NotHeld {
                key_id: id.to_string(),
                endpoint: self.endpoint_label(),
                reason,
            }),
            Err(e) if !required => Ok(Hold::NotKept {
                reason: crate::text::error_chain(&e),
            }),
            other => other,
        }
    }

    /// Who registers and removes consumers: the agent's own credentials when
    /// it has them (a detach carries no caller token, and Barbican lets
    /// only the consumer's project remove it), else the caller's.
    fn consumer_auth<'a>(&self, auth: &'a RequestAuth) -> &'a RequestAuth {
        const SERVICE: &RequestAuth = &RequestAuth::Service;
        if self.keystone.is_some() {
            SERVICE
        } else {
            auth
        }
    }

    async fn take(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        holder: &KeyHolder,
        budget: &Budget,
    ) -> Result<Hold, KeyError> {
        let granted_read = match auth {
            RequestAuth::UserToken { .. } if self.keystone.is_some() => {
                // Barbican failing here must not keep the consumer from
                // being registered: both are attempted.
                let changed = self
                    .acl_change(id, auth, true, budget)
                    .await
                    .unwrap_or_else(|e| Err(crate::text::error_chain(&e)));
                match changed {
                    Ok(changed) => changed,
                    Err(r) => {
                        tracing::warn!(
                            key_id = id.as_str(),
                            volume_id = holder.volume_id.as_str(),
                            "the agent's user could not be added to the key's read ACL ({r}); attaches without a caller's token need other access to it"
                        );
                        false
                    }
                }
            }
            _ => false,
        };
        let body = consumer_of(holder);
        let (a, base) = self
            .consumers_call(
                id,
                self.consumer_auth(auth),
                reqwest::Method::POST,
                &body,
                budget,
            )
            .await?;
        Ok(match a.status {
            200 | 201 => Hold::Held { granted_read },
            s => Hold::NotKept {
                reason: format!(
                    "{} (HTTP {s})",
                    self.refusal(&a, id, &base, "registering a consumer")?
                ),
            },
        })
    }

    async fn release(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        holder: &KeyHolder,
        revoke_read: bool,
        budget: &Budget,
    ) -> Result<Hold, KeyError> {
        let body = consumer_of(holder);
        let (a, base) = self
            .consumers_call(
                id,
                self.consumer_auth(auth),
                reqwest::Method::DELETE,
                &body,
                budget,
            )
            .await?;
        match a.status {
            // 404: the consumer is gone already (a repeated detach).
            200 | 204 | 404 => {}
            s => {
                let r = self.refusal(&a, id, &base, "removing a consumer")?;
                return Ok(Hold::NotKept {
                    reason: format!("{r} (HTTP {s})"),
                });
            }
        }
        let mut revoked_read = false;
        if revoke_read && matches!(auth, RequestAuth::UserToken { .. }) {
            if self.other_hosts_hold(id, budget).await? {
                tracing::info!(
                    key_id = id.as_str(),
                    "another host of the agent still holds the key; the agent stays on its read ACL"
                );
            } else {
                match self.acl_change(id, auth, false, budget).await? {
                    Ok(changed) => revoked_read = changed,
                    Err(r) => tracing::warn!(
                        key_id = id.as_str(),
                        "the agent's user could not be taken off the key's read ACL ({r})"
                    ),
                }
            }
        }
        Ok(Hold::Released { revoked_read })
    }

    /// Whether any consumer of the agent's remains on the secret (another
    /// host's attachment); read with the agent's own credentials.
    async fn other_hosts_hold(&self, id: &KeyId, budget: &Budget) -> Result<bool, KeyError> {
        let list = self
            .consumers(id, self.consumer_auth(&RequestAuth::Service), budget)
            .await?;
        Ok(list
            .iter()
            .any(|c| c["service"].as_str() == Some(CONSUMER_SERVICE)))
    }

    /// The consumers of the secret (at most the first 100).
    pub(super) async fn consumers(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        budget: &Budget,
    ) -> Result<Vec<Value>, KeyError> {
        let path = format!("/v1/secrets/{}/consumers?limit=100", id.uuid_text()?);
        let (a, base) = self
            .call(
                auth,
                id.as_str(),
                ApiRequest {
                    method: reqwest::Method::GET,
                    path: &path,
                    accept: "application/json",
                    body: None,
                    api_version: Some(CONSUMERS_VERSION),
                },
                budget,
            )
            .await?;
        if a.status != 200 {
            return Err(self.status_error(&a, id.as_str(), &base, "the consumer list"));
        }
        let v: Value = self.json_of(&a, id, &base, "the consumer list")?;
        Ok(v["consumers"].as_array().cloned().unwrap_or_default())
    }

    async fn consumers_call(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        method: reqwest::Method,
        body: &Value,
        budget: &Budget,
    ) -> Result<(Answer, String), KeyError> {
        let path = format!("/v1/secrets/{}/consumers", id.uuid_text()?);
        self.call(
            auth,
            id.as_str(),
            ApiRequest {
                method,
                path: &path,
                accept: "application/json",
                body: Some(body),
                api_version: Some(CONSUMERS_VERSION),
            },
            budget,
        )
        .await
    }

    /// Adds (`grant`) or removes the agent's own user on the secret's read
    /// ACL, with the caller's credentials, keeping every other user and the
    /// project-access flag as they were (Barbican replaces an operation's
    /// whole user list). `Ok(Ok(changed))`: done, or nothing to do.
    async fn acl_change(
        &self,
        id: &KeyId,
        auth: &RequestAuth,
        grant: bool,
        budget: &Budget,
    ) -> Result<Result<bool, String>, KeyError> {
        let Some(ks) = &self.keystone else {
            return Ok(Ok(false));
        };
        let me = ks.user_id(id.as_str(), budget).await?;
        let path = format!("/v1/secrets/{}/acl", id.uuid_text()?);
        let request = |method, body| ApiRequest {
            method,
            path: &path,
            accept: "application/json",
            body,
            api_version: None,
        };
        let (a, base) = self
            .call(
                auth,
                id.as_str(),
                request(reqwest::Method::GET, None),
                budget,
            )
            .await?;
        if a.status != 200 {
            return Ok(Err(self.refusal(&a, id, &base, "reading the ACL")?));
        }
        let acl: Value = self.json_of(&a, id, &base, "the secret's ACL")?;
        let read = &acl["read"];
        let mut users: Vec<String> = read["users"]
            .as_array()
            .map(|u| {
                u.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let listed = users.contains(&me);
        if listed == grant {
            return Ok(Ok(false));
        }
        if grant {
            users.push(me);
        } else {
            users.retain(|u| *u != me);
        }
        let project_access = read["project-access"].as_bool().unwrap_or(true);
        let body = json!({"read": {"users": users, "project-access": project_access}});
        let (a, base) = self
            .call(
                auth,
                id.as_str(),
                request(reqwest::Method::PATCH, Some(&body)),
                budget,
            )
            .await?;
        match a.status {
            200 | 201 => Ok(Ok(true)),
            _ => Ok(Err(self.refusal(&a, id, &base, "changing the ACL")?)),
        }
    }

    /// The reason of a refusal that does not fail the attach (policy, or a
    /// Barbican without the API), else the error of the status.
    fn refusal(&self, a: &Answer, id: &KeyId, base: &str, what: &str) -> Result<String, KeyError> {
        match a.status {
            401 | 403 => Ok(format!("Barbican's policy refused {what}")),
            404 | 405 => Ok(format!("Barbican at {base} has no such API ({what})")),
            _ => Err(self.status_error(a, id.as_str(), base, what)),
        }
    }

    fn json_of(&self, a: &Answer, id: &KeyId, base: &str, what: &str) -> Result<Value, KeyError> {
        serde_json::from_slice(a.body.expose()).map_err(|e| KeyError::Protocol {
            key_id: id.to_string(),
            endpoint: base.to_string(),
            status: a.status,
            reason: format!("{what} is not JSON: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_tell_hosts_apart_and_fit_barbican() {
        let a = consumer_of(&KeyHolder {
            volume_id: "6f1c1f1e-0000-4000-8000-000000000001".into(),
            host: "compute-1".into(),
        });
        let b = consumer_of(&KeyHolder {
            volume_id: "6f1c1f1e-0000-4000-8000-000000000001".into(),
            host: "compute-2".into(),
        });
        assert_ne!(a, b);
        assert_eq!(a["service"], CONSUMER_SERVICE);
        assert_eq!(a["resource_id"], "6f1c1f1e-0000-4000-8000-000000000001");
        let long = "v".repeat(128);
        let c = consumer_of(&KeyHolder {
            volume_id: long.clone(),
            host: "h".into(),
        });
        let id = c["resource_id"].as_str().unwrap();
        assert_eq!(id.len(), MAX_RESOURCE_ID);
        let d = consumer_of(&KeyHolder {
            volume_id: format!("{long}w"),
            host: "h".into(),
        });
        assert_ne!(c["resource_id"], d["resource_id"]);
    }
}
