//! The server: the listening socket (ours or systemd's), the accept loop
//! with per-connection peer credentials and timeouts, the routes, and the
//! way each volume operation runs (per-volume lock, then a blocking thread).

use std::collections::HashMap;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tower::ServiceExt;

use crate::config::{Config, ServerConfig};
use crate::image;
use crate::keymgr::{KeyId, KeyManager};
use crate::luks::kdf;
use crate::service::api::{self, VolumeBody};
use crate::service::errors::{ApiCode, ApiError, ErrorCode};
use crate::service::ops::{self, Op};
use crate::service::{self};
use crate::text::error_chain;
use crate::volume::native::NativeOptions;
use crate::volume::{VolumeId, VolumeOptions, Volumes};

use super::auth::{Peer, Policy};
use super::metrics::{Metrics, ROUTES, route_label};
use super::shutdown::Shutdown;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be set up.
    #[error("{op} {path}")]
    Socket {
        /// What we did.
        op: &'static str,
        /// The socket.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another agent is already listening on {0}")]
    AlreadyRunning(String),
    /// A configured group that does not exist.
    #[error("socket_group '{0}' is not a group on this host")]
    NoSuchGroup(String),
    /// The key manager cannot be built from the configuration.
    #[error("key manager")]
    KeyManager(#[source] crate::keymgr::KeyError),
    /// Signals could not be set up.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
}

/// In-process per-volume locks: callers of one volume queue here, without
/// holding a thread, before the volume layer takes its cross-process flock.
#[derive(Default)]
struct VolumeLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl VolumeLocks {
    fn get(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = map.get(volume_id).and_then(Weak::upgrade) {
            return l;
        }
        // Forget volumes nobody holds or waits for any more.
        map.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(volume_id.to_string(), Arc::downgrade(&l));
        l
    }
}

/// What every request sees.
struct Shared {
    cfg: ServerConfig,
    policy: Policy,
    keys: Arc<dyn KeyManager>,
    opts: VolumeOptions,
    native: NativeOptions,
    /// How often to look for QEMU-native volumes nova detached behind the
    /// agent's back (zero: never).
    reconcile_every: Duration,
    locks: VolumeLocks,
    metrics: Metrics,
    shutdown: Shutdown,
    budget: &'static kdf::MemoryBudget,
}

type AppState = Arc<Shared>;

/// The Argon2 budget when the configuration leaves it unset: a quarter of
/// the machine's memory, at least 1 GiB.
fn default_budget_kib() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    (total / 4).max(1024 * 1024)
}

/// The socket systemd passed (LISTEN_PID is us, LISTEN_FDS >= 1: fd 3).
fn systemd_listener() -> Option<std::os::unix::net::UnixListener> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: systemd's protocol hands this process fd 3 as an open,
    // listening socket that nothing else in the process owns (LISTEN_PID
    // names us); we take ownership exactly once, here.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(SD_LISTEN_FDS_START) };
    // The fd must not leak into anything we might spawn.
    // SAFETY: fcntl on an fd we own, with a valid flag argument.
    unsafe { libc::fcntl(SD_LISTEN_FDS_START, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(l)
}

fn group_id(name: &str) -> Result<u32, ServeError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    // Through the C library (NSS): groups may come from LDAP or sssd, not
    // only /etc/group.
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(ServeError::NoSuchGroup(name.to_string())),
    }
}

/// Binds the configured socket: refuses when another agent answers on it,
/// replaces a stale one, then sets mode 0660 and the group.
fn bind(cfg: &ServerConfig) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let path = &cfg.socket;
    let shown = path.display().to_string();
    let err = |op| {
        let shown = shown.clone();
        move |source| ServeError::Socket {
            op,
            path: shown,
            source,
        }
    };
    let gid = cfg.socket_group.as_deref().map(group_id).transpose()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("creating the directory of"))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::Socket {
                op: "refusing to replace",
                path: shown,
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::AlreadyRunning(shown));
        }
        std::fs::remove_file(path).map_err(err("removing stale socket"))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(err("setting the mode of"))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err("setting the group of"))?;
    }
    Ok(l)
}

/// Runs the agent until SIGTERM or SIGINT and every started operation has
/// finished. Builds its own multi-threaded runtime.
pub fn serve(config: &Config) -> Result<(), ServeError> {
    let cfg = config.server.clone();
    // Take systemd's socket before anything else could open fd 3.
    let (std_listener, own_socket) = match systemd_listener() {
        Some(l) => (l, None),
        None => (bind(&cfg)?, Some(cfg.socket.clone())),
    };
    super::hold_agent_lock(&cfg.socket).map_err(|source| ServeError::Socket {
        op: "taking the agent lock beside",
        path: cfg.socket.display().to_string(),
        source,
    })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Socket {
            op: "configuring",
            path: cfg.socket.display().to_string(),
            source,
        })?;
    let keys: Arc<dyn KeyManager> =
        Arc::from(config.key_manager().map_err(ServeError::KeyManager)?);
    let budget =
        kdf::install_memory_budget(cfg.kdf_memory_budget_kib.unwrap_or_else(default_budget_kib));
    let shared = Arc::new(Shared {
        policy: Policy::new(
            &cfg,
            &cfg.allowed_groups
                .iter()
                .map(|g| group_id(g))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        keys,
        opts: service::volume_options(config),
        native: service::native_options(config),
        reconcile_every: Duration::from_secs(config.libvirt.reconcile_interval_secs),
        locks: VolumeLocks::default(),
        metrics: Metrics::default(),
        shutdown: Shutdown::new(),
        budget,
        cfg,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("luks-agent")
        .build()
        .map_err(ServeError::Signals)?;
    let result = rt.block_on(run(shared, std_listener, own_socket.as_deref()));
    // Every operation has finished or was abandoned at the shutdown
    // timeout: a thread stuck in the kernel is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// nova detaches a QEMU-native volume by deleting its libvirt secret
/// itself; this finds such detaches now and then and releases their keys'
/// holds (see `Volumes::reconcile_native`).
async fn reconcile_periodically(shared: AppState) {
    if shared.reconcile_every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.reconcile_every) => {}
            _ = shared.shutdown.stopping() => return,
        }
        let st = shared.clone();
        let handle = tokio::runtime::Handle::current();
        let found = tokio::task::spawn_blocking(move || {
            let volumes = Volumes::new(st.keys.as_ref(), st.opts.clone());
            handle.block_on(volumes.reconcile_native(&st.native))
        })
        .await;
        match found {
            Ok(Ok(detached)) if !detached.is_empty() => tracing::info!(
                volumes = ?detached,
                "QEMU-native volumes detached by nova: their records removed and keys released"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %crate::text::error_chain(&e),
                "looking for QEMU-native volumes detached by nova failed; trying again later"
            ),
            Err(e) => tracing::warn!(error = %e, "the reconciliation task failed"),
        }
    }
}

async fn run(
    shared: AppState,
    std_listener: std::os::unix::net::UnixListener,
    own_socket: Option<&Path>,
) -> Result<(), ServeError> {
    let listener = UnixListener::from_std(std_listener).map_err(|source| ServeError::Socket {
        op: "registering",
        path: shared.cfg.socket.display().to_string(),
        source,
    })?;
    let shutdown = shared.shutdown.clone();
    let signals = tokio::spawn(shutdown.clone().on_signals());
    let reconciler = tokio::spawn(reconcile_periodically(shared.clone()));
    tracing::info!(
        socket = %own_socket.map(|p| p.display().to_string()).unwrap_or_else(|| "systemd (fd 3)".into()),
        version = env!("CARGO_PKG_VERSION"),
        kdf_memory_budget_kib = shared.budget.total_kib(),
        allowed_uids = ?shared.cfg.allowed_uids,
        allowed_gids = ?shared.cfg.allowed_gids,
        "listening"
    );
    let router = router(shared.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(shared.cfg.header_timeout_ms))
        // A client may shut down its sending side once the request is
        // out and still wait for the answer.
        .half_close(true)
        .keep_alive(true);
    let connections = Arc::new(tokio::sync::Semaphore::new(shared.cfg.max_connections));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.stopping() => break,
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream, shared.cfg.max_connections));
            continue;
        };
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; closing the connection");
                continue;
            }
        };
        let (shared, router, peer_uid) = (shared.clone(), router.clone(), peer.uid);
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            handle(shared.clone(), router.clone(), peer.clone(), req)
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, uid = peer_uid, "connection ended");
            }
        });
    }
    drop(listener);
    reconciler.abort();
    if let Some(p) = own_socket {
        let _ = std::fs::remove_file(p);
    }
    let deadline = Instant::now() + Duration::from_millis(shared.cfg.shutdown_timeout_ms);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep_until(deadline.into()) => tracing::warn!(
            after_ms = shared.cfg.shutdown_timeout_ms,
            "connections still open at the shutdown timeout; closing them"
        ),
        _ = shared.shutdown.hurried() => {}
    }
    if shared.shutdown.running() > 0 {
        tracing::info!(
            operations_in_flight = shared.shutdown.running(),
            "waiting for running operations to finish until the shutdown timeout"
        );
    }
    let abandoned = shared.shutdown.idle_until(deadline).await;
    for o in &abandoned {
        tracing::error!(
            op = o.op,
            volume_id = o.volume_id,
            running_ms = o.since.elapsed().as_millis() as u64,
            "abandoning an operation still running at shutdown; the next operation on this volume finishes or undoes it"
        );
    }
    signals.abort();
    tracing::info!(abandoned = abandoned.len(), "stopped");
    Ok(())
}

/// Answers a connection over `[server] max_connections` with a 503 and
/// closes it, without reading the request: a flood of idle or slow
/// connections cannot grow the agent's memory.
async fn refuse_connection(mut stream: tokio::net::UnixStream, limit: usize) {
    use tokio::io::AsyncWriteExt;
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            max_connections = limit,
            "connection limit reached; refusing new connections until some close"
        );
    }
    let body = serde_json::to_string(&api::ErrorBody {
        error: api::ErrorDetail {
            code: ApiCode::TooManyConnections.name().into(),
            message: format!("the agent serves at most {limit} connections at once; retry shortly"),
            volume_id: None,
        },
    })
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Every request: peer check, metrics, then the router.
async fn handle(
    shared: AppState,
    router: Router,
    peer: Peer,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let route = route_label(req.uri().path());
    // Counted until this future ends, answered or dropped with its
    // connection.
    let _in_flight = shared.metrics.start();
    let resp = if shared.policy.allows(&peer) {
        req.extensions_mut().insert(peer.clone());
        match router.oneshot(req.map(Body::new)).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    } else {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = peer.pid,
            method = %req.method(),
            route,
            "caller not allowed"
        );
        ApiError::new(
            ApiCode::Forbidden,
            format!(
                "uid {} gid {} may not call this agent (see [server] allowed_uids, allowed_gids and allowed_groups)",
                peer.uid, peer.gid
            ),
        )
        .into_response()
    };
    let outcome = resp
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0.name())
        .unwrap_or("ok");
    shared.metrics.finish(route, outcome, started.elapsed());
    Ok(resp)
}

/// The handler of each route of [`ROUTES`].
fn handler(route: &str) -> axum::routing::MethodRouter<AppState> {
    match route {
        "/healthz" => get(healthz),
        "/metrics" => get(metrics),
        "/v1/volumes" => get(list_volumes),
        "/v1/volumes/{id}" => get(show_volume),
        "/v1/volumes/{id}/attach" => post(attach),
        "/v1/volumes/{id}/detach" => post(detach),
        "/v1/volumes/{id}/extend" => post(extend),
        "/v1/images/{id}/verify" => post(verify_image),
        other => unreachable!("route {other} in ROUTES has no handler"),
    }
}

fn router(shared: AppState) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |r, route| r.route(route, handler(route)))
        .fallback(|req: Request<Body>| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                ApiCode::MethodNotAllowed,
                format!("method {method} is not allowed on this route"),
            )
        })
        .with_state(shared)
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(v).unwrap_or_default(),
    )
        .into_response()
}

async fn healthz(State(st): State<AppState>) -> Response<Body> {
    if st.shutdown.is_stopping() {
        return ApiError::shutting_down().into_response();
    }
    json(
        StatusCode::OK,
        &api::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            operations_in_flight: st.shutdown.running(),
        },
    )
}

async fn metrics(State(st): State<AppState>) -> Response<Body> {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(st.shutdown.running(), Some(st.budget)),
    )
        .into_response()
}

async fn list_volumes(State(st): State<AppState>) -> Response<Body> {
    let run_dir = st.opts.run_dir.clone();
    match tokio::task::spawn_blocking(move || service::status::volumes_now(&run_dir, None)).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => ApiError::new(ApiCode::Internal, e.to_string()).into_response(),
    }
}

/// The volume id of the route, or the JSON error for one that does not
/// decode (a percent-escape that is not UTF-8, like `%FF`).
fn id_of(id: Result<UrlPath<String>, PathRejection>) -> Result<VolumeId, ApiError> {
    match id {
        Ok(UrlPath(id)) => {
            VolumeId::parse(&id).map_err(|e| ApiError::new(ApiCode::InvalidVolumeId, e.to_string()))
        }
        Err(e) => Err(ApiError::new(
            ApiCode::InvalidVolumeId,
            format!(
                "the volume id in the path does not decode: {}",
                e.body_text().escape_debug()
            ),
        )),
    }
}

async fn show_volume(
    State(st): State<AppState>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Response<Body> {
    let id = match id_of(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let run_dir = st.opts.run_dir.clone();
    let want = id.clone();
    match tokio::task::spawn_blocking(move || service::status::volumes_now(&run_dir, Some(&want)))
        .await
    {
        Ok(mut v) => match v.volumes.pop() {
            Some(one) => json(StatusCode::OK, &one),
            None => ApiError::new(
                ApiCode::VolumeNotFound,
                format!("volume {id} is not attached on this host"),
            )
            .for_volume(&id)
            .into_response(),
        },
        Err(e) => ApiError::new(ApiCode::Internal, e.to_string()).into_response(),
    }
}

/// Reads and parses a body within the size and time limits.
async fn read_body<T: serde::de::DeserializeOwned + api::KnownFields>(
    st: &Shared,
    req: Request<Body>,
) -> Result<T, ApiError> {
    let limit = st.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            ApiCode::PayloadTooLarge,
            format!("request bodies are limited to {limit} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let wait = Duration::from_millis(st.cfg.body_timeout_ms);
    let bytes = match tokio::time::timeout(wait, axum::body::to_bytes(req.into_body(), limit)).await
    {
        Err(_) => {
            return Err(ApiError::new(
                ApiCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} ms",
                    st.cfg.body_timeout_ms
                ),
            ));
        }
        Ok(Err(e)) => {
            let mut cur: Option<&dyn std::error::Error> = Some(&e);
            while let Some(c) = cur {
                if c.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                cur = c.source();
            }
            return Err(ApiError::new(
                ApiCode::InvalidRequest,
                format!("reading the request body: {}", error_chain(&e)),
            ));
        }
        Ok(Ok(b)) => b,
    };
    let body = serde_json::from_slice::<T>(&bytes).map_err(|e| {
        use serde_json::error::Category;
        let code = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiCode::MalformedJson,
            Category::Data => ApiCode::InvalidRequest,
        };
        ApiError::new(code, format!("request body: {e}"))
    })?;
    if let Some((field, expected)) = body.unknown_field() {
        return Err(ApiError::new(
            ApiCode::UnknownField,
            format!(
                "request body: unknown field `{}`, expected one of {}",
                field.escape_debug(),
                expected.join(", ")
            ),
        ));
    }
    Ok(body)
}

type IdParam = Result<UrlPath<String>, PathRejection>;

async fn attach(st: State<AppState>, id: IdParam, req: Request<Body>) -> Response<Body> {
    operate(st.0, id, Op::Attach, req).await
}

async fn detach(st: State<AppState>, id: IdParam, req: Request<Body>) -> Response<Body> {
    operate(st.0, id, Op::Detach, req).await
}

async fn extend(st: State<AppState>, id: IdParam, req: Request<Body>) -> Response<Body> {
    operate(st.0, id, Op::Extend, req).await
}

async fn operate(st: AppState, id: IdParam, op: Op, req: Request<Body>) -> Response<Body> {
    let id = match id_of(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match operate_inner(st, &id, op, req).await {
        Ok(r) => r,
        Err(e) => {
            let e = if e.volume_id.is_none() {
                e.for_volume(&id)
            } else {
                e
            };
            e.into_response()
        }
    }
}

async fn operate_inner(
    st: AppState,
    id: &VolumeId,
    op: Op,
    req: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let peer = req.extensions().get::<Peer>().cloned();
    let body: VolumeBody = read_body(&st, req).await?;
    if body.keep_secret && !(op == Op::Detach && body.mode == api::Mode::Libvirt) {
        return Err(ApiError::new(
            ApiCode::InvalidRequest,
            "keep_secret applies only to a detach in libvirt mode",
        ));
    }
    let request = ops::request_of(id, &body)
        .map_err(|message| ApiError::new(ApiCode::InvalidSpec, message))?;
    // Queue for the volume without holding a thread; give up when the
    // agent starts stopping (nothing of this operation has happened yet).
    let lock = st.locks.get(id);
    let guard = tokio::select! {
        g = lock.lock_owned() => g,
        _ = st.shutdown.stopping() => return Err(ApiError::shutting_down()),
    };
    if st.shutdown.is_stopping() {
        return Err(ApiError::shutting_down());
    }
    let running = st.shutdown.start_operation(op.name(), id);
    let handle = tokio::runtime::Handle::current();
    let shared = st.clone();
    // The blocking task owns the lock and the operation guard: a caller
    // that disconnects does not cut the operation short, and the next
    // caller of this volume waits until it is really over.
    let task = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let _running = running;
        let volumes = Volumes::new(shared.keys.as_ref(), shared.opts.clone());
        let vid = request.volume_id.as_str();
        let caller = Some(ops::Caller {
            uid: peer.as_ref().map(|p| p.uid),
            pid: peer.as_ref().and_then(|p| p.pid),
        });
        handle
            .block_on(ops::perform(
                &volumes,
                &shared.native,
                op,
                body.mode,
                body.keep_secret,
                &request,
                caller,
            ))
            .map(|o| (o.body, o.action))
            .map_err(|e| ApiError::from_volume(vid, &e))
    });
    match task.await {
        Ok(Ok((v, _))) => Ok(json(StatusCode::OK, &v)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::new(
            ApiCode::Internal,
            format!("the operation failed unexpectedly: {e}"),
        )),
    }
}

/// `POST /v1/images/{id}/verify`: the image file is opened with the
/// caller's permissions, the certificates come from the agent's key
/// manager with the body's credentials (or the agent's own).
async fn verify_image(st: State<AppState>, id: IdParam, req: Request<Body>) -> Response<Body> {
    let st = st.0;
    let image_id = match id {
        Ok(UrlPath(id)) if image::valid_image_id(&id) => id,
        _ => {
            return ApiError::new(ApiCode::InvalidRequest, image::IMAGE_ID_RULE).into_response();
        }
    };
    if st.shutdown.is_stopping() {
        return ApiError::shutting_down().into_response();
    }
    // Every connection carries its peer; without one there is nobody to
    // open the file as, and the agent's own rights must not stand in.
    let Some(peer) = req.extensions().get::<Peer>().cloned() else {
        return ApiError::new(ApiCode::Forbidden, "no peer credentials for this request")
            .into_response();
    };
    let body: api::ImageVerifyBody = match read_body(&st, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let trusted: Result<Vec<KeyId>, _> = body
        .trusted_certificate_ids
        .iter()
        .map(|t| KeyId::new(t))
        .collect();
    let trusted = match trusted {
        Ok(t) => t,
        Err(e) => return ApiError::new(ApiCode::InvalidRequest, e.to_string()).into_response(),
    };
    // Root may read anything anyway; anyone else reads as themselves.
    let caller = (peer.uid != 0).then(|| image::file::Caller {
        uid: peer.uid,
        gid: peer.gid,
        groups: peer.groups.to_vec(),
    });
    let auth = api::Auth::to_request_auth(body.auth.as_ref());
    let request = image::VerifyRequest {
        image_id: &image_id,
        path: &body.file,
        properties: &body.properties,
        trusted: &trusted,
        caller,
    };
    // Read-only, so nothing is left half done when the agent stops: the
    // answer is `shutting_down` at once, and dropping the verification
    // stops its pass over the file.
    tokio::select! {
        r = image::verify(st.keys.as_ref(), &auth, request) => match r {
            Ok(v) => json(StatusCode::OK, &api::ImageVerdict::of(&image_id, &v)),
            Err(e) => ApiError::new(ApiCode::of_image(&e), error_chain(&e)).into_response(),
        },
        _ = st.shutdown.stopping() => ApiError::shutting_down().into_response(),
    }
}

/// The socket the CLI should talk to: the configured one.
pub fn socket_path(config: &Config) -> PathBuf {
    config.server.socket.clone()
}
