//! Assembles the services into one process: `serve` runs them all on one port; split mode runs
//! a subset. Tests build an [`Application`] on port 0 the same way.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use axum::Router;
use cairn_command_api::passwords::Passwords;
use cairn_command_api::{CommandState, MessageCommands, UserCommands};
use cairn_platform::audit::AuditKeys;
use cairn_platform::auth::{AuthState, KeySet, SessionVersions, TokenIssuer};
use cairn_platform::checkpoint::CheckpointWatcher;
use cairn_platform::http::limits::Limiter;
use cairn_platform::http::{finish_router, metrics_router, probes_router, OpsState, OPS_ROUTES};
use cairn_platform::nats::{self, Namespace};
use cairn_platform::rooms::MessagePort;
use cairn_platform::{db, telemetry, Settings};
use cairn_query_api::realtime::{Realtime, RealtimeDeps};
use cairn_query_api::{Consistency, QueryState};
use cairn_relay::Relay;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

/// Which services this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services {
    /// The write API (and the relay, which publishes what it writes).
    pub command_api: bool,
    /// The read API.
    pub query_api: bool,
    /// The relay from the events table to JetStream (single-active; standbys wait).
    pub relay: bool,
    /// The projectors.
    pub projector: bool,
    /// The workers.
    pub workers: bool,
}

impl Services {
    /// Everything (`cairn serve`).
    #[must_use]
    pub fn all() -> Self {
        Self { command_api: true, query_api: true, relay: true, projector: true, workers: true }
    }

    /// Nothing; combine with struct update syntax.
    #[must_use]
    pub fn none() -> Self {
        Self { command_api: false, query_api: false, relay: false, projector: false, workers: false }
    }
}

/// A built, listening process.
pub struct Application {
    listener: TcpListener,
    router: Router,
    /// `/metrics` on its own listener (`CAIRN_METRICS_LISTEN`).
    metrics: Option<(TcpListener, Router)>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    pool: PgPool,
    shutdown_grace: Duration,
    routes: Vec<(String, String)>,
}

/// Where the OpenAPI document and its viewer are served.
const DOCS_ROUTES: &[(&str, &str)] =
    &[("GET", "/api/v1/openapi.json"), ("GET", "/docs"), ("GET", "/docs/"), ("GET", "/docs/{*rest}")];

/// Every (method, path) of `openapi`: the API routes, which are registered and documented together.
fn documented_routes(openapi: &OpenApi) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    for (path, item) in &openapi.paths.paths {
        let methods = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ];
        for (method, operation) in methods {
            if operation.is_some() {
                routes.push((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

impl Application {
    /// Connects, migrates, creates the JetStream objects, binds `settings.listen` (port 0 picks a
    /// free one) and starts the background services. Serving starts with [`Self::run_until_stopped`].
    ///
    /// # Errors
    /// When Postgres is unreachable, keys are missing in production, or the port is taken.
    pub async fn build(settings: Settings, services: Services) -> anyhow::Result<Self> {
        // SMTP settings are read only where mail is sent, so a bad SMTP setup stops no API.
        let email = if services.workers { Some(cairn_workers::EmailSettings::from_env()?) } else { None };
        Self::build_with_email(settings, email, services).await
    }

    /// As [`Self::build`], with the mail settings given rather than read from the environment.
    ///
    /// # Errors
    /// As [`Self::build`].
    pub async fn build_with_email(
        settings: Settings,
        email: Option<cairn_workers::EmailSettings>,
        services: Services,
    ) -> anyhow::Result<Self> {
        Self::build_with_jobs(settings, email, services, cairn_workers::jobs::Registry::new()).await
    }

    /// As [`Self::build_with_email`], with job handlers of the caller's beside the shipped kinds
    /// (one of the same kind replaces the shipped one).
    ///
    /// # Errors
    /// As [`Self::build`].
    pub async fn build_with_jobs(
        settings: Settings,
        email: Option<cairn_workers::EmailSettings>,
        services: Services,
        jobs: cairn_workers::jobs::Registry,
    ) -> anyhow::Result<Self> {
        telemetry::init_tracing(settings.log_format);
        let _ = telemetry::metrics_handle();
        let shutdown = CancellationToken::new();
        let pool = db::connect_and_migrate(&settings.database_url, settings.db_max_connections).await.with_context(|| {
            "Postgres is needed: start it, run `cairn serve --embedded` (uses the system's initdb, pg_ctl and nats-server), \
             or `docker compose up -d postgres nats`"
        })?;
        let client = nats::connect(&settings.nats_url).await?;
        let js = jetstream::new(client.clone());
        let ns = Namespace::new(&settings.namespace);
        match tokio::time::timeout(
            Duration::from_secs(5),
            nats::ensure_events_stream(&js, &ns, settings.stream_replicas),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "EVENTS stream not ready yet; services retry")
            }
            Err(_) => tracing::warn!(
                url = settings.nats_url,
                "NATS not reachable yet; commands still work, events are published when it returns"
            ),
        }

        let mut tasks = JoinSet::new();
        // Commands signal it after each commit; it wakes this process's relay, and others' by NOTIFY.
        let wake = cairn_relay::RelayWakeup::new(pool.clone());
        let mut api = OpenApiRouter::new();
        let serves_api = services.command_api || services.query_api;
        // Every process that touches file bytes opens the store at start, so a misconfigured
        // store (keys, bucket, credentials) stops it there rather than at the first upload.
        let files = if serves_api || services.workers {
            Some(cairn_storage::FileStore::open(&settings.files, settings.is_production()).await?)
        } else {
            None
        };
        let store = || files.clone().context("the file store is opened by every API and worker process");
        if serves_api {
            let keys = KeySet::load_with_ttl(&settings.keys_dir, settings.is_production(), settings.access_token_ttl)?;
            let tokens = TokenIssuer::new(
                Arc::new(keys),
                &settings.token_issuer,
                &settings.token_audience,
                settings.access_token_ttl,
            )
            .with_clock(settings.clock.clone());
            // A key added by `cairn admin rotate-key` reaches running processes within a minute.
            tokens.spawn_reload(
                settings.keys_dir.clone(),
                settings.is_production(),
                Duration::from_secs(60),
                shutdown.clone(),
            );
            let sessions = SessionVersions::new(settings.access_token_ttl);
            sessions.follow(pool.clone(), js.clone(), ns.clone(), shutdown.clone()).await?;
            let user_limits =
                settings.rate_limit_user.and_then(|rate| Limiter::swept("user", rate, settings.rate_limit_sweep));
            let verified_email_for = Arc::new(settings.verified_email_for.clone());
            let auth = AuthState { tokens, sessions: sessions.clone(), user_limits, verified_email_for };
            // One message service per process: HTTP sends and socket sends share its checks,
            // rate limit and idempotency.
            let messages = MessageCommands::new(pool.clone(), sessions.clone(), wake.clone(), &settings);
            let message_port: Arc<dyn MessagePort> = Arc::new(messages.clone());
            // The realtime sockets (query side) take sends through `message_port`.
            if services.command_api {
                let users =
                    UserCommands::new(pool.clone(), Passwords::from_settings(&settings), sessions, wake.clone());
                users.roles().seed().await.map_err(|e| anyhow::anyhow!("cannot define the seeded roles: {e}"))?;
                let state = CommandState::new(pool.clone(), &settings, auth.clone(), users, messages, store()?)?;
                tasks.spawn(state.guard.clone().sweep_until(shutdown.clone()));
                api = api.merge(cairn_command_api::router(state));
            }
            if services.query_api {
                let watchers = cairn_projector::PROJECTIONS
                    .iter()
                    .map(|name| (*name, CheckpointWatcher::spawn(pool.clone(), name, shutdown.clone())))
                    .collect();
                let consistency = Consistency::new(pool.clone(), watchers, settings.consistency_wait);
                let consumers = cairn_query_api::admin::Consumers {
                    projections: Arc::new(cairn_projector::PROJECTIONS.to_vec()),
                    workers: Arc::new(cairn_workers::PARKING_CONSUMERS.to_vec()),
                };
                let state = QueryState {
                    pool: pool.clone(),
                    auth: auth.clone(),
                    consistency: consistency.clone(),
                    consumers,
                    files: store()?,
                    downloads: cairn_query_api::files::FileDownloads::from_settings(&settings.files),
                    clock: settings.clock.clone(),
                    audit_keys: Arc::new(AuditKeys::load(&settings.audit.keys_dir, settings.is_production())?),
                    audit: settings.audit.clone(),
                    rebuilds: cairn_query_api::admin::Rebuilds {
                        batch: settings.rebuild_batch,
                        pause: settings.fault_rebuild_pause,
                        shutdown: shutdown.clone(),
                    },
                };
                api = api.merge(cairn_query_api::router(state));
                let deps = RealtimeDeps {
                    pool: pool.clone(),
                    auth,
                    consistency,
                    port: Some(message_port),
                    client: client.clone(),
                    ns: ns.clone(),
                };
                let realtime = Realtime::start(deps, &settings, &mut tasks, shutdown.clone()).await?;
                api = api.merge(cairn_query_api::realtime::router(realtime));
            }
        }
        if services.relay {
            let relay = Relay::new(pool.clone(), js.clone(), ns.clone(), settings.relay_batch).with_wake(wake.clone());
            tasks.spawn(relay.run(shutdown.clone()));
            if settings.audit.tree {
                // Its own loop: the tree keeps folding while NATS is away.
                let fold = cairn_relay::AuditFold::new(
                    pool.clone(),
                    settings.audit.clone(),
                    settings.is_production(),
                    settings.clock.clone(),
                )?
                .with_wake(wake.clone());
                tasks.spawn(fold.run(shutdown.clone()));
            }
        }
        if services.projector {
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::UsersProjection);
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::SessionsProjection);
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::RolesProjection);
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::RoomsProjection);
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::FilesProjection);
            spawn_projection(&mut tasks, &settings, &pool, &js, &ns, &shutdown, cairn_projector::AnalyticsProjection);
        }
        if services.workers {
            let (batch, replicas) = (settings.projector_batch, settings.stream_replicas);
            let audit = cairn_workers::AuditWorker::new(pool.clone());
            let (js_audit, ns_audit, token) = (js.clone(), ns.clone(), shutdown.clone());
            tasks.spawn(retrying("audit worker", token.clone(), move || {
                audit.clone().run(js_audit.clone(), ns_audit.clone(), batch, replicas, token.clone())
            }));
            let email_settings = match email {
                Some(e) => e,
                None => cairn_workers::EmailSettings::from_env()?,
            };
            if settings.is_production() {
                email_settings.check_production()?;
            }
            // Deleted files become files.remove jobs; the bytes go when a job worker runs them.
            let remover = cairn_workers::FileRemover::new(pool.clone(), settings.clock.clone());
            let (js_files, ns_files, token) = (js.clone(), ns.clone(), shutdown.clone());
            tasks.spawn(retrying("file remover", token.clone(), move || {
                remover.clone().run(js_files.clone(), ns_files.clone(), batch, replicas, token.clone())
            }));
            // Cron schedules: every worker process runs the scheduler; each tick fires once.
            let scheduler = cairn_workers::jobs::scheduler::Scheduler::new(pool.clone(), &settings)?;
            tasks.spawn(scheduler.run(shutdown.clone()));
            // Background jobs: the shipped kinds and the caller's, run under leases from the jobs table.
            let deps =
                cairn_workers::jobs::KindDeps { pool: pool.clone(), settings: settings.clone(), files: store()? };
            let registry = cairn_workers::jobs::shipped(&deps)?.merge(jobs);
            let runner = cairn_workers::jobs::JobRunner::new(
                pool.clone(),
                registry,
                &settings.jobs,
                settings.clock.clone(),
                settings.shutdown_grace,
            );
            tasks.spawn(runner.run(shutdown.clone()));
            let email = cairn_workers::EmailWorker::new(pool.clone(), email_settings)?;
            let (js_email, ns_email, token) = (js.clone(), ns.clone(), shutdown.clone());
            tasks.spawn(retrying("email worker", token.clone(), move || {
                email.clone().run(js_email.clone(), ns_email.clone(), batch, replicas, token.clone())
            }));
        }

        let (api_router, mut openapi) = api.split_for_parts();
        let mut routes = documented_routes(&openapi);
        let listed =
            |table: &[(&str, &str)]| table.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect::<Vec<_>>();
        let ops = OpsState { pool: pool.clone(), nats: client };
        let mut router = api_router.merge(probes_router(ops.clone()));
        let metrics = match settings.metrics_listen {
            Some(address) => {
                let listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} (CAIRN_METRICS_LISTEN)"))?;
                // The main listener does not serve /metrics then.
                routes.extend(listed(OPS_ROUTES).into_iter().filter(|(_, path)| path != "/metrics"));
                Some((listener, finish_router(metrics_router(ops), &settings)))
            }
            None => {
                routes.extend(listed(OPS_ROUTES));
                router = router.merge(metrics_router(ops));
                None
            }
        };
        if serves_api {
            routes.extend(listed(DOCS_ROUTES));
            document(&mut openapi);
            router = router.merge(SwaggerUi::new("/docs").url("/api/v1/openapi.json", openapi));
        }
        let router = finish_router(router, &settings);
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let shutdown_grace = settings.shutdown_grace;
        Ok(Self { listener, router, metrics, shutdown, tasks, pool, shutdown_grace, routes })
    }

    /// The bound port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The port `/metrics` is served on when it has its own listener (`CAIRN_METRICS_LISTEN`).
    #[must_use]
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().and_then(|(listener, _)| listener.local_addr().ok()).map(|a| a.port())
    }

    /// Cancelling this stops the process gracefully.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Every (method, path) this process serves, in the router's own path syntax (`{id}`): the API
    /// routes, the operational ones and the OpenAPI document and its viewer.
    #[must_use]
    pub fn routes(&self) -> &[(String, String)] {
        &self.routes
    }

    /// The process's database pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until the shutdown token is cancelled, then stops within the grace period
    /// (`CAIRN_SHUTDOWN_GRACE_SECS`) whatever Postgres, NATS or an SMTP server do: the listener
    /// stops accepting at once; in-flight requests and the background services get the grace
    /// period to finish; whatever is left then is aborted, and the pool closed with a short bound.
    ///
    /// What an aborted task held is released for the next process: un-acked JetStream messages
    /// are redelivered, and the relay's and the email worker's advisory locks go with their
    /// connections, which are closed, not pooled, when their holders are dropped.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let addr = self.listener.local_addr()?;
        tracing::info!(%addr, "listening");
        let shutdown = self.shutdown.clone();
        if let Some((listener, router)) = self.metrics.take() {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "serving /metrics");
            let metrics = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(shutdown.clone().cancelled_owned());
            self.tasks.spawn(async move {
                if let Err(e) = metrics.await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        let server = axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let mut server = tokio::spawn(server.into_future());
        let mut served = tokio::select! {
            joined = &mut server => Some(joined),
            () = shutdown.cancelled() => None,
        };
        // The server may also have stopped on its own (an accept error): stop everything else too.
        shutdown.cancel();
        let grace = self.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(grace_secs = grace.as_secs_f64(), "stopping");

        if served.is_none() {
            match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(joined) => served = Some(joined),
                Err(_) => {
                    tracing::warn!("requests still in flight after the grace period; aborting them");
                    server.abort();
                }
            }
        }
        let drained =
            tokio::time::timeout_at(deadline, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "background tasks still running after the grace period; aborting them"
            );
            self.tasks.abort_all();
            // Aborted tasks end at their next await point; this only collects them.
            while self.tasks.join_next().await.is_some() {}
        }
        // Waits for connections still checked out (an aborted task's, being closed) to come back.
        if tokio::time::timeout(POOL_CLOSE_TIMEOUT, self.pool.close()).await.is_err() {
            tracing::warn!("the database pool did not close in time; exiting anyway");
        }
        tracing::info!("stopped");
        match served {
            Some(Ok(result)) => result.map_err(Into::into),
            Some(Err(joined)) => Err(anyhow::anyhow!("the HTTP server task failed: {joined}")),
            None => Ok(()),
        }
    }
}

/// How long closing the database pool may take at shutdown, after the grace period.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs projection `P` as its own durable consumer.
fn spawn_projection<P: cairn_projector::Projection>(
    tasks: &mut JoinSet<()>,
    settings: &Settings,
    pool: &PgPool,
    js: &jetstream::Context,
    ns: &Namespace,
    shutdown: &CancellationToken,
    projection: P,
) {
    let (pool, js, ns, token) = (pool.clone(), js.clone(), ns.clone(), shutdown.clone());
    let (batch, replicas) = (settings.projector_batch, settings.stream_replicas);
    tasks.spawn(retrying(P::NAME, token.clone(), move || {
        cairn_projector::run(pool.clone(), js.clone(), ns.clone(), projection.clone(), batch, replicas, token.clone())
    }));
}

/// Runs a long-lived service, restarting it after a pause if it fails to start (NATS down, say).
async fn retrying<F, Fut>(name: &str, shutdown: CancellationToken, mut start: F)
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    while !shutdown.is_cancelled() {
        match start().await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(service = name, error = %format!("{e:#}"), "service could not start; retrying")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn document(openapi: &mut OpenApi) {
    openapi.info.title = "cairn".to_owned();
    openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    openapi.info.contact = None;
    openapi.info.license = Some(utoipa::openapi::License::new("Apache-2.0"));
    openapi.info.description =
        Some("Event-sourced backend: commands append events; reads come from projections.".to_owned());
    cairn_platform::http::document_errors(openapi);
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
}
