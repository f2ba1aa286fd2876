//! Configuration, read once from the environment. Every variable is documented in the README.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// Development or production. Production refuses development keys and secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Local work: missing keys are generated and marked as development keys.
    Development,
    /// A real deployment: everything secret must be supplied.
    Production,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Everything a cairn process is configured with. Its `Debug` output leaves out `DATABASE_URL`
/// and `NATS_URL` (they may carry passwords) and the OAuth client secrets.
#[derive(Clone)]
pub struct Settings {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `CAIRN_DB_MAX_CONNECTIONS`: pool size per process.
    pub db_max_connections: u32,
    /// `NATS_URL`.
    pub nats_url: String,
    /// `CAIRN_LISTEN`.
    pub listen: SocketAddr,
    /// `CAIRN_NAMESPACE`: prefixes every stream, consumer and subject.
    pub namespace: String,
    /// `CAIRN_ENV`.
    pub environment: Environment,
    /// `CAIRN_KEYS_DIR`: Ed25519 signing keys, one PEM file per key id.
    pub keys_dir: PathBuf,
    /// `CAIRN_LOG_FORMAT`: `pretty` or `json`.
    pub log_format: LogFormat,
    /// `CAIRN_TOKEN_ISSUER`.
    pub token_issuer: String,
    /// `CAIRN_TOKEN_AUDIENCE`.
    pub token_audience: String,
    /// `CAIRN_ACCESS_TOKEN_TTL_SECS`.
    pub access_token_ttl: Duration,
    /// `CAIRN_CONSISTENCY_WAIT_MS`: longest a read waits for its consistency token.
    pub consistency_wait: Duration,
    /// `CAIRN_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `CAIRN_HASH_CONCURRENCY`: password hashes computed at once.
    pub hash_concurrency: usize,
    /// `CAIRN_PASSWORD_QUEUE`: password hashes waiting for a thread; beyond it requests that
    /// need one answer 503 `SERVICE_UNAVAILABLE` with `Retry-After` (default 32 per thread).
    pub password_queue: usize,
    /// `CAIRN_STREAM_REPLICAS`: replicas of the EVENTS stream (3 on a cluster).
    pub stream_replicas: usize,
    /// `CAIRN_RELAY_BATCH`: events the relay publishes per round.
    pub relay_batch: i64,
    /// `CAIRN_PROJECTOR_BATCH`: events a projector applies per transaction.
    pub projector_batch: usize,
    /// `CAIRN_REBUILD_BATCH`: events a projection rebuild reads and applies per transaction
    /// (default 10000).
    pub rebuild_batch: i64,
    /// `CAIRN_FAULT_REBUILD_PAUSE_MS`: a test knob, refused in production. A rebuild pauses this
    /// long after every batch, so a test can watch one run and act on it meanwhile (default 0).
    pub fault_rebuild_pause: Duration,
    /// `CAIRN_REQUEST_TIMEOUT_SECS`.
    pub request_timeout: Duration,
    /// `CAIRN_SHUTDOWN_GRACE_SECS`: on SIGTERM, how long in-flight requests and background work
    /// may take to finish before what is left is aborted (default 10).
    pub shutdown_grace: Duration,
    /// `CAIRN_SESSION_LIFETIME_SECS`: absolute session lifetime (default 7 days).
    pub session_lifetime: Duration,
    /// `CAIRN_SESSION_IDLE_SECS`: idle timeout between refreshes (default 24 hours).
    pub session_idle: Duration,
    /// `CAIRN_SESSIONS_PURGE_AFTER_HOURS`: how long an ended session (expired, idle or revoked)
    /// stays in the read model before `sessions.purge` removes it (default 24).
    pub sessions_purge_after: Duration,
    /// `CAIRN_REFRESH_GRACE_SECS`: how long a just-rotated refresh token still gets the current session.
    pub refresh_grace: Duration,
    /// `CAIRN_COOKIE_SECURE`: mark the refresh cookie `Secure` (only `false` for plain-HTTP development).
    pub cookie_secure: bool,
    /// `CAIRN_ALLOWED_ORIGINS`: comma-separated origins for CORS and for cookie-authenticated endpoints.
    pub allowed_origins: Vec<String>,
    /// `CAIRN_TRUSTED_PROXIES`: comma-separated proxy IPs whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// `CAIRN_HSTS`: send `Strict-Transport-Security` (when TLS is terminated in front of cairn).
    pub hsts: bool,
    /// `CAIRN_RATE_LIMIT_AUTH`: per-IP limit on `/api/v1/auth/*` (e.g. `20/min`, `off`).
    pub rate_limit_auth: Option<RateLimit>,
    /// `CAIRN_RATE_LIMIT_PUBLIC`: per-IP limit outside `/api/`.
    pub rate_limit_public: Option<RateLimit>,
    /// `CAIRN_RATE_LIMIT_API`: per-IP limit on the rest of `/api/`.
    pub rate_limit_api: Option<RateLimit>,
    /// `CAIRN_RATE_LIMIT_USER`: per-user limit on authenticated API calls.
    pub rate_limit_user: Option<RateLimit>,
    /// `CAIRN_RATE_LIMIT_MAIL`: verification and reset mails each address may ask for (default `3/h`).
    pub rate_limit_mail: Option<RateLimit>,
    /// `CAIRN_RATE_LIMIT_SWEEP_SECS`: how often every rate limiter forgets the keys whose limit
    /// has run out (default 60).
    pub rate_limit_sweep: Duration,
    /// `CAIRN_METRICS_LISTEN`: when set, `/metrics` is served only on this address, and the main
    /// listener answers 404 for it.
    pub metrics_listen: Option<SocketAddr>,
    /// `CAIRN_VERIFIED_EMAIL_FOR`: permissions that also need a verified email address.
    pub verified_email_for: Vec<String>,
    /// `CAIRN_LOCKOUT_THRESHOLD`: failed sign-ins in a row that lock an account (default 5).
    pub lockout_threshold: u32,
    /// `CAIRN_LOCKOUT_BASE_SECS`: the first lock's length; later ones double (default 60).
    pub lockout_base: Duration,
    /// `CAIRN_LOCKOUT_MAX_SECS`: the longest lock (default 900).
    pub lockout_max: Duration,
    /// `CAIRN_OAUTH_PROVIDERS` and `CAIRN_OAUTH_<NAME>_*`: OAuth / OpenID Connect sign-in.
    pub oauth_providers: Vec<OAuthProvider>,
    /// `CAIRN_OAUTH_REDIRECT_URI`: the frontend page providers send the user back to
    /// (default `<CAIRN_PUBLIC_URL>/oauth/callback`).
    pub oauth_redirect_uri: String,
    /// `CAIRN_RATE_LIMIT_MESSAGES`: messages each user may send, over HTTP and sockets together (default `5/s`).
    pub rate_limit_messages: Option<RateLimit>,
    /// `CAIRN_WS_FRAME_RATE`: frames a socket may send before it is closed (default `20/s`).
    pub ws_frame_rate: Option<RateLimit>,
    /// `CAIRN_WS_QUEUE`: frames waiting to be written to one socket; a socket that falls this far
    /// behind is disconnected (default 256).
    pub ws_queue: usize,
    /// `CAIRN_WS_HEARTBEAT_SECS`: how often the server pings each socket and announces presence;
    /// a socket silent for three of these is dropped (default 10).
    pub ws_heartbeat: Duration,
    /// `CAIRN_WS_MAX_SOCKETS`: open sockets per process; beyond it upgrades answer 503 (default 20000).
    pub ws_max_sockets: usize,
    /// `CAIRN_WS_MAX_ROOMS`: rooms one socket may have joined at once (default 200).
    pub ws_max_rooms: usize,
    /// File storage: which store, its limits and its keys (`CAIRN_FILES_*`, `S3_*`).
    pub files: FilesSettings,
    /// Background jobs, schedules and webhooks (`CAIRN_JOBS_*`, `CAIRN_SCHEDULES_FILE`, `CAIRN_WEBHOOK_*`).
    pub jobs: crate::jobs::JobsSettings,
    /// The audit tree, its heads and keys (`CAIRN_AUDIT_*`).
    pub audit: crate::audit::AuditSettings,
    /// Where time comes from: the system clock, except in tests (never read from the environment).
    pub clock: crate::clock::SharedClock,
}

/// Which store keeps the bytes of uploaded files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStoreKind {
    /// A local directory, encrypted at rest.
    Local,
    /// An S3-compatible object store.
    S3,
}

/// Where and how uploaded files are kept.
#[derive(Clone)]
pub struct FilesSettings {
    /// `CAIRN_FILES_STORE`: `local` (default) or `s3`.
    pub store: FileStoreKind,
    /// `CAIRN_FILES_DIR`: the local store's directory (default `data/files`).
    pub dir: PathBuf,
    /// `CAIRN_FILES_MASTER_KEY_FILE`: the local store's master keys, one `<key id>:<base64 key>`
    /// per line, the last one writing. Unset in development: a built-in development key, which
    /// production refuses.
    pub master_key_file: Option<PathBuf>,
    /// `CAIRN_MAX_UPLOAD_BYTES`: the largest file (default 100 MiB), enforced while streaming.
    pub max_upload_bytes: u64,
    /// `CAIRN_USER_QUOTA_BYTES`: the bytes each user may keep stored (default 1 GiB).
    pub user_quota_bytes: u64,
    /// `CAIRN_FILES_URL_TTL_SECS`: how long a presigned URL or a download token lives (default 300).
    pub url_ttl: Duration,
    /// `CAIRN_FILES_ALLOWED_TYPES`: comma-separated content types uploads may have (sniffed).
    pub allowed_types: Vec<String>,
    /// `CAIRN_FILES_INLINE_TYPES`: content types served `inline` rather than as an attachment.
    pub inline_types: Vec<String>,
    /// `CAIRN_FILES_ORPHAN_GRACE_SECS`: how old stored bytes that no event names must be before
    /// the sweeper removes them (default 3600).
    pub orphan_grace: Duration,
    /// `CAIRN_FAULT_UPLOAD_PAUSE_MS`: a test knob, refused in production. An upload whose bytes
    /// are stored waits this long before its FileUploaded is appended, so a test can kill the
    /// process in between and see what a crash there leaves (default 0: no pause).
    pub fault_upload_pause: Duration,
    /// `S3_*`: the S3 store.
    pub s3: S3Settings,
}

impl std::fmt::Debug for FilesSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesSettings")
            .field("store", &self.store)
            .field("dir", &self.dir)
            .field("master_key_file", &self.master_key_file)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("user_quota_bytes", &self.user_quota_bytes)
            .field("url_ttl", &self.url_ttl)
            .field("allowed_types", &self.allowed_types)
            .field("inline_types", &self.inline_types)
            .field("orphan_grace", &self.orphan_grace)
            .field("fault_upload_pause", &self.fault_upload_pause)
            .field("s3", &self.s3)
            .finish()
    }
}

/// The S3-compatible store.
#[derive(Clone)]
pub struct S3Settings {
    /// `S3_ENDPOINT`: the server's URL (MinIO, s3s-fs, …); unset means AWS.
    pub endpoint: Option<String>,
    /// `S3_BUCKET` (default `cairn`).
    pub bucket: String,
    /// `S3_REGION` (default `us-east-1`).
    pub region: String,
    /// `S3_ACCESS_KEY_ID`; unset means the AWS default chain is not consulted and requests are
    /// refused at start (set both keys).
    pub access_key_id: Option<String>,
    /// `S3_SECRET_ACCESS_KEY` or the file named by `S3_SECRET_ACCESS_KEY_FILE`.
    pub secret_access_key: Option<String>,
    /// `S3_FORCE_PATH_STYLE`: `http://host/bucket/key` addressing (default true when
    /// `S3_ENDPOINT` is set, as MinIO and most S3-compatible servers need).
    pub force_path_style: bool,
    /// `S3_PART_SIZE`: uploads larger than this go up in parts of this size (default 8 MiB,
    /// at least 5 MiB as S3 requires).
    pub part_size: u64,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "REDACTED"))
            .field("force_path_style", &self.force_path_style)
            .field("part_size", &self.part_size)
            .finish()
    }
}

/// The content types uploads may have unless `CAIRN_FILES_ALLOWED_TYPES` says otherwise.
pub const DEFAULT_ALLOWED_TYPES: &str = "image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain,\
text/csv,application/json,application/zip,application/gzip,audio/mpeg,audio/ogg,video/mp4,video/webm,application/octet-stream";

/// The content types served inline unless `CAIRN_FILES_INLINE_TYPES` says otherwise: images a
/// browser shows without running anything (no SVG, which can carry script).
pub const DEFAULT_INLINE_TYPES: &str = "image/png,image/jpeg,image/gif,image/webp";

fn list(raw: &str) -> Vec<String> {
    raw.split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()).collect()
}

impl FilesSettings {
    fn from_lookup(
        lookup: &impl Fn(&str) -> Option<String>,
        get: &impl Fn(&str, &str) -> String,
        num: &impl Fn(&str, u64) -> anyhow::Result<u64>,
        environment: Environment,
    ) -> anyhow::Result<Self> {
        let store = match get("CAIRN_FILES_STORE", "local").as_str() {
            "local" => FileStoreKind::Local,
            "s3" => FileStoreKind::S3,
            other => bail!("CAIRN_FILES_STORE must be 'local' or 's3', not '{other}'"),
        };
        let master_key_file = lookup("CAIRN_FILES_MASTER_KEY_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
        if environment == Environment::Production && store == FileStoreKind::Local && master_key_file.is_none() {
            bail!("CAIRN_FILES_MASTER_KEY_FILE is required in production with the local file store (run `cairn admin rotate-files-key` to create one)");
        }
        let endpoint = lookup("S3_ENDPOINT").filter(|v| !v.is_empty());
        let secret_access_key = match (
            lookup("S3_SECRET_ACCESS_KEY").filter(|v| !v.is_empty()),
            lookup("S3_SECRET_ACCESS_KEY_FILE").filter(|v| !v.is_empty()),
        ) {
            (Some(_), Some(_)) => bail!("set S3_SECRET_ACCESS_KEY or S3_SECRET_ACCESS_KEY_FILE, not both"),
            (Some(secret), None) => Some(secret),
            (None, Some(file)) => Some(
                std::fs::read_to_string(&file)
                    .with_context(|| format!("S3_SECRET_ACCESS_KEY_FILE: cannot read {file}"))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let force_path_style = match lookup("S3_FORCE_PATH_STYLE").filter(|v| !v.is_empty()) {
            None => endpoint.is_some(),
            Some(v) => v.parse::<bool>().context("S3_FORCE_PATH_STYLE must be true or false")?,
        };
        let part_size = num("S3_PART_SIZE", 8 * 1024 * 1024)?;
        if part_size < 5 * 1024 * 1024 {
            bail!("S3_PART_SIZE must be at least 5 MiB (5242880), as S3 requires");
        }
        let allowed_types = list(&get("CAIRN_FILES_ALLOWED_TYPES", DEFAULT_ALLOWED_TYPES));
        if allowed_types.is_empty() {
            bail!("CAIRN_FILES_ALLOWED_TYPES must name at least one content type");
        }
        let fault_upload_pause = Duration::from_millis(num("CAIRN_FAULT_UPLOAD_PAUSE_MS", 0)?);
        if environment == Environment::Production && !fault_upload_pause.is_zero() {
            bail!("CAIRN_FAULT_UPLOAD_PAUSE_MS is a test knob; production refuses it");
        }
        Ok(Self {
            store,
            dir: PathBuf::from(get("CAIRN_FILES_DIR", "data/files")),
            master_key_file,
            max_upload_bytes: num("CAIRN_MAX_UPLOAD_BYTES", 100 * 1024 * 1024)?.max(1),
            user_quota_bytes: num("CAIRN_USER_QUOTA_BYTES", 1024 * 1024 * 1024)?,
            url_ttl: Duration::from_secs(num("CAIRN_FILES_URL_TTL_SECS", 300)?.clamp(1, 7 * 24 * 3600)),
            allowed_types,
            inline_types: list(&get("CAIRN_FILES_INLINE_TYPES", DEFAULT_INLINE_TYPES)),
            orphan_grace: Duration::from_secs(num("CAIRN_FILES_ORPHAN_GRACE_SECS", 3600)?),
            fault_upload_pause,
            s3: S3Settings {
                endpoint,
                bucket: get("S3_BUCKET", "cairn"),
                region: get("S3_REGION", "us-east-1"),
                access_key_id: lookup("S3_ACCESS_KEY_ID").filter(|v| !v.is_empty()),
                secret_access_key,
                force_path_style,
                part_size,
            },
        })
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &"REDACTED")
            .field("db_max_connections", &self.db_max_connections)
            .field("nats_url", &"REDACTED")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("namespace", &self.namespace)
            .field("environment", &self.environment)
            .field("keys_dir", &self.keys_dir)
            .field("log_format", &self.log_format)
            .field("token_issuer", &self.token_issuer)
            .field("token_audience", &self.token_audience)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("hash_concurrency", &self.hash_concurrency)
            .field("password_queue", &self.password_queue)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("allowed_origins", &self.allowed_origins)
            .field("oauth_providers", &self.oauth_providers)
            .field("files", &self.files)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// How a provider proves who the user is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthKind {
    /// OpenID Connect: a signed ID token with `email`, `email_verified` and our `nonce`.
    Oidc,
    /// GitHub: the API's list of the user's verified email addresses.
    Github,
}

/// One configured OAuth provider.
#[derive(Clone)]
pub struct OAuthProvider {
    /// Its name in URLs (`google`, `github`, …).
    pub name: String,
    /// OIDC or GitHub.
    pub kind: OAuthKind,
    /// Client id.
    pub client_id: String,
    /// Client secret (from `…_CLIENT_SECRET` or the file named by `…_CLIENT_SECRET_FILE`).
    pub client_secret: String,
    /// Authorization endpoint.
    pub authorize_url: String,
    /// Token endpoint.
    pub token_url: String,
    /// OIDC: the provider's keys; GitHub: unused.
    pub jwks_url: String,
    /// OIDC: the expected `iss`.
    pub issuer: String,
    /// GitHub: the user endpoint; OIDC: unused.
    pub userinfo_url: String,
    /// GitHub: the emails endpoint.
    pub emails_url: String,
    /// Requested scopes.
    pub scopes: String,
}

impl std::fmt::Debug for OAuthProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthProvider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("client_id", &self.client_id)
            .field("client_secret", &"REDACTED")
            .finish_non_exhaustive()
    }
}

/// Reads the providers named in `CAIRN_OAUTH_PROVIDERS`; `google` and `github` come with their
/// endpoints preset, so only the client id and secret are needed for them.
fn oauth_providers(lookup: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Vec<OAuthProvider>> {
    let names = lookup("CAIRN_OAUTH_PROVIDERS").unwrap_or_default();
    let mut providers = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            bail!("CAIRN_OAUTH_PROVIDERS: '{name}' must be lower-case letters, digits and '-'");
        }
        let prefix = format!("CAIRN_OAUTH_{}_", name.to_uppercase().replace('-', "_"));
        let var = |key: &str| lookup(&format!("{prefix}{key}")).filter(|v| !v.is_empty());
        let (kind, authorize, token, jwks, issuer, userinfo, emails, scopes) = match name {
            "google" => (
                OAuthKind::Oidc,
                "https://accounts.google.com/o/oauth2/v2/auth",
                "https://oauth2.googleapis.com/token",
                "https://www.googleapis.com/oauth2/v3/certs",
                "https://accounts.google.com",
                "",
                "",
                "openid email profile",
            ),
            "github" => (
                OAuthKind::Github,
                "https://github.com/login/oauth/authorize",
                "https://github.com/login/oauth/access_token",
                "",
                "",
                "https://api.github.com/user",
                "https://api.github.com/user/emails",
                "read:user user:email",
            ),
            _ => (OAuthKind::Oidc, "", "", "", "", "", "", "openid email profile"),
        };
        let kind = match var("KIND").as_deref() {
            None => kind,
            Some("oidc") => OAuthKind::Oidc,
            Some("github") => OAuthKind::Github,
            Some(other) => bail!("{prefix}KIND must be oidc or github, not '{other}'"),
        };
        let required = |key: &str, preset: &str| -> anyhow::Result<String> {
            var(key)
                .or_else(|| (!preset.is_empty()).then(|| preset.to_owned()))
                .with_context(|| format!("{prefix}{key} is required"))
        };
        let client_secret = match (var("CLIENT_SECRET"), var("CLIENT_SECRET_FILE")) {
            (Some(secret), None) => secret,
            (None, Some(file)) => std::fs::read_to_string(&file)
                .with_context(|| format!("{prefix}CLIENT_SECRET_FILE: cannot read {file}"))?
                .trim()
                .to_owned(),
            (Some(_), Some(_)) => bail!("set {prefix}CLIENT_SECRET or {prefix}CLIENT_SECRET_FILE, not both"),
            (None, None) => bail!("{prefix}CLIENT_SECRET or {prefix}CLIENT_SECRET_FILE is required"),
        };
        providers.push(OAuthProvider {
            name: name.to_owned(),
            kind,
            client_id: required("CLIENT_ID", "")?,
            client_secret,
            authorize_url: required("AUTHORIZE_URL", authorize)?,
            token_url: required("TOKEN_URL", token)?,
            jwks_url: if kind == OAuthKind::Oidc { required("JWKS_URL", jwks)? } else { String::new() },
            issuer: if kind == OAuthKind::Oidc { required("ISSUER", issuer)? } else { String::new() },
            userinfo_url: if kind == OAuthKind::Github { required("USERINFO_URL", userinfo)? } else { String::new() },
            emails_url: if kind == OAuthKind::Github { required("EMAILS_URL", emails)? } else { String::new() },
            scopes: var("SCOPES").unwrap_or_else(|| scopes.to_owned()),
        });
    }
    Ok(providers)
}

/// A rate: `count` requests per `period`, refilled evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per period (also the burst).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl RateLimit {
    /// Parses `COUNT/PERIOD` with PERIOD one of `s`, `sec`, `min`, `h`; `off` means no limit.
    ///
    /// # Errors
    /// When the text is malformed.
    pub fn parse(text: &str) -> anyhow::Result<Option<Self>> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let (count, period) = text.split_once('/').context("rate limits look like '20/min' or 'off'")?;
        let count: u32 = count.trim().parse().context("rate limit count must be a positive integer")?;
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => bail!("rate limit period must be s, min or h, not '{other}'"),
        };
        if count == 0 {
            bail!("rate limit count must be positive (use 'off' for none)");
        }
        Ok(Some(Self { count, period }))
    }
}

/// Origins a local frontend is served from during development.
pub const DEVELOPMENT_ORIGINS: &str =
    "http://localhost:3000,http://localhost:5173,http://localhost:8080,http://127.0.0.1:3000,http://127.0.0.1:5173,http://127.0.0.1:8080";

/// Where the keys live unless `CAIRN_KEYS_DIR` says otherwise (development only).
pub const DEFAULT_KEYS_DIR: &str = ".cairn/keys";

impl Settings {
    /// Reads the environment.
    ///
    /// # Errors
    /// When a variable is present but malformed.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    ///
    /// # Errors
    /// When a value is malformed.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get =
            |key: &str, default: &str| lookup(key).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned());
        let num = |key: &str, default: u64| -> anyhow::Result<u64> {
            get(key, &default.to_string())
                .parse::<u64>()
                .with_context(|| format!("{key} must be a non-negative integer"))
        };
        let environment = match get("CAIRN_ENV", "development").as_str() {
            "development" | "dev" => Environment::Development,
            "production" | "prod" => Environment::Production,
            other => bail!("CAIRN_ENV must be 'development' or 'production', not '{other}'"),
        };
        let log_format = match get("CAIRN_LOG_FORMAT", "pretty").as_str() {
            "pretty" | "text" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => bail!("CAIRN_LOG_FORMAT must be 'pretty' or 'json', not '{other}'"),
        };
        let namespace = get("CAIRN_NAMESPACE", "");
        if !namespace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("CAIRN_NAMESPACE may hold only letters, digits, '_' and '-'");
        }
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let hash_concurrency = usize::try_from(num("CAIRN_HASH_CONCURRENCY", cores as u64)?)?.max(1);
        Ok(Self {
            database_url: get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/cairn"),
            db_max_connections: u32::try_from(num("CAIRN_DB_MAX_CONNECTIONS", 20)?)
                .context("CAIRN_DB_MAX_CONNECTIONS too large")?,
            nats_url: get("NATS_URL", "nats://127.0.0.1:4222"),
            listen: get("CAIRN_LISTEN", "127.0.0.1:8080").parse().context("CAIRN_LISTEN must be host:port")?,
            namespace,
            environment,
            keys_dir: PathBuf::from(get("CAIRN_KEYS_DIR", DEFAULT_KEYS_DIR)),
            log_format,
            token_issuer: get("CAIRN_TOKEN_ISSUER", "cairn"),
            token_audience: get("CAIRN_TOKEN_AUDIENCE", "cairn-api"),
            access_token_ttl: Duration::from_secs(num("CAIRN_ACCESS_TOKEN_TTL_SECS", 900)?),
            consistency_wait: Duration::from_millis(num("CAIRN_CONSISTENCY_WAIT_MS", 5000)?),
            max_body_bytes: usize::try_from(num("CAIRN_MAX_BODY_BYTES", 64 * 1024)?)?,
            hash_concurrency,
            password_queue: usize::try_from(num("CAIRN_PASSWORD_QUEUE", 32 * hash_concurrency as u64)?)?.max(1),
            stream_replicas: usize::try_from(num("CAIRN_STREAM_REPLICAS", 1)?)?.max(1),
            relay_batch: i64::try_from(num("CAIRN_RELAY_BATCH", 1000)?)?.max(1),
            projector_batch: usize::try_from(num("CAIRN_PROJECTOR_BATCH", 500)?)?.max(1),
            rebuild_batch: i64::try_from(num("CAIRN_REBUILD_BATCH", 10_000)?)?.max(1),
            fault_rebuild_pause: {
                let pause = Duration::from_millis(num("CAIRN_FAULT_REBUILD_PAUSE_MS", 0)?);
                if environment == Environment::Production && !pause.is_zero() {
                    bail!("CAIRN_FAULT_REBUILD_PAUSE_MS is a test knob; production refuses it");
                }
                pause
            },
            request_timeout: Duration::from_secs(num("CAIRN_REQUEST_TIMEOUT_SECS", 30)?),
            shutdown_grace: Duration::from_secs(num("CAIRN_SHUTDOWN_GRACE_SECS", 10)?),
            session_lifetime: Duration::from_secs(num("CAIRN_SESSION_LIFETIME_SECS", 7 * 86_400)?),
            session_idle: Duration::from_secs(num("CAIRN_SESSION_IDLE_SECS", 86_400)?),
            sessions_purge_after: Duration::from_secs(
                num("CAIRN_SESSIONS_PURGE_AFTER_HOURS", 24)?.saturating_mul(3600),
            ),
            refresh_grace: Duration::from_secs(num("CAIRN_REFRESH_GRACE_SECS", 10)?),
            cookie_secure: match get("CAIRN_COOKIE_SECURE", "true").as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" if environment == Environment::Development => false,
                "false" | "0" | "no" => bail!("CAIRN_COOKIE_SECURE=false is for plain-HTTP development only"),
                other => bail!("CAIRN_COOKIE_SECURE must be true or false, not '{other}'"),
            },
            allowed_origins: {
                let default = if environment == Environment::Development { DEVELOPMENT_ORIGINS } else { "" };
                get("CAIRN_ALLOWED_ORIGINS", default)
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            },
            trusted_proxies: get("CAIRN_TRUSTED_PROXIES", "")
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().with_context(|| format!("CAIRN_TRUSTED_PROXIES: '{p}' is not an IP address")))
                .collect::<anyhow::Result<_>>()?,
            hsts: matches!(get("CAIRN_HSTS", "false").as_str(), "true" | "1" | "yes"),
            rate_limit_auth: RateLimit::parse(&get("CAIRN_RATE_LIMIT_AUTH", "30/min"))
                .context("CAIRN_RATE_LIMIT_AUTH")?,
            rate_limit_public: RateLimit::parse(&get("CAIRN_RATE_LIMIT_PUBLIC", "600/min"))
                .context("CAIRN_RATE_LIMIT_PUBLIC")?,
            rate_limit_api: RateLimit::parse(&get("CAIRN_RATE_LIMIT_API", "1200/min"))
                .context("CAIRN_RATE_LIMIT_API")?,
            verified_email_for: get("CAIRN_VERIFIED_EMAIL_FOR", "rooms:write,messages:write,files:write")
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            rate_limit_user: RateLimit::parse(&get("CAIRN_RATE_LIMIT_USER", "1200/min"))
                .context("CAIRN_RATE_LIMIT_USER")?,
            rate_limit_mail: RateLimit::parse(&get("CAIRN_RATE_LIMIT_MAIL", "3/h")).context("CAIRN_RATE_LIMIT_MAIL")?,
            rate_limit_sweep: Duration::from_secs(num("CAIRN_RATE_LIMIT_SWEEP_SECS", 60)?.max(1)),
            metrics_listen: lookup("CAIRN_METRICS_LISTEN")
                .filter(|v| !v.is_empty())
                .map(|v| v.parse().context("CAIRN_METRICS_LISTEN must be host:port"))
                .transpose()?,
            lockout_threshold: u32::try_from(num("CAIRN_LOCKOUT_THRESHOLD", 5)?)?.max(1),
            lockout_base: Duration::from_secs(num("CAIRN_LOCKOUT_BASE_SECS", 60)?.max(1)),
            lockout_max: Duration::from_secs(num("CAIRN_LOCKOUT_MAX_SECS", 900)?.max(1)),
            oauth_providers: oauth_providers(&lookup)?,
            oauth_redirect_uri: lookup("CAIRN_OAUTH_REDIRECT_URI").filter(|v| !v.is_empty()).unwrap_or_else(|| {
                format!("{}/oauth/callback", get("CAIRN_PUBLIC_URL", "http://localhost:8080").trim_end_matches('/'))
            }),
            rate_limit_messages: RateLimit::parse(&get("CAIRN_RATE_LIMIT_MESSAGES", "5/s"))
                .context("CAIRN_RATE_LIMIT_MESSAGES")?,
            ws_frame_rate: RateLimit::parse(&get("CAIRN_WS_FRAME_RATE", "20/s")).context("CAIRN_WS_FRAME_RATE")?,
            ws_queue: usize::try_from(num("CAIRN_WS_QUEUE", 256)?)?.max(1),
            ws_heartbeat: Duration::from_secs(num("CAIRN_WS_HEARTBEAT_SECS", 10)?.max(1)),
            ws_max_sockets: usize::try_from(num("CAIRN_WS_MAX_SOCKETS", 20_000)?)?.max(1),
            ws_max_rooms: usize::try_from(num("CAIRN_WS_MAX_ROOMS", 200)?)?.max(1),
            files: FilesSettings::from_lookup(&lookup, &get, &num, environment)?,
            jobs: crate::jobs::JobsSettings::from_lookup(&lookup, environment)?,
            audit: crate::audit::AuditSettings::from_lookup(&lookup)?,
            clock: crate::clock::system(),
        })
    }

    /// Whether this is a production deployment.
    #[must_use]
    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_readme() -> anyhow::Result<()> {
        let s = settings(&[])?;
        assert_eq!(s.database_url, "postgres://postgres@127.0.0.1:5432/cairn");
        assert_eq!(s.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.environment, Environment::Development);
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        Ok(())
    }

    #[test]
    fn rate_limits_parse() -> anyhow::Result<()> {
        assert_eq!(RateLimit::parse("20/min")?, Some(RateLimit { count: 20, period: Duration::from_secs(60) }));
        assert_eq!(RateLimit::parse("off")?, None);
        assert!(RateLimit::parse("20").is_err());
        assert!(RateLimit::parse("0/s").is_err());
        assert!(RateLimit::parse("5/week").is_err());
        Ok(())
    }

    #[test]
    fn debug_output_holds_no_secret() -> anyhow::Result<()> {
        let s = settings(&[
            ("DATABASE_URL", "postgres://cairn:db-secret-1@db.internal/cairn"),
            ("NATS_URL", "nats://relay:nats-secret-2@nats.internal:4222"),
            ("CAIRN_OAUTH_PROVIDERS", "google"),
            ("CAIRN_OAUTH_GOOGLE_CLIENT_ID", "client-id"),
            ("CAIRN_OAUTH_GOOGLE_CLIENT_SECRET", "oauth-secret-3"),
        ])?;
        let printed = format!("{s:?} {s:#?}");
        for secret in ["db-secret-1", "nats-secret-2", "oauth-secret-3"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(printed.contains("REDACTED"));
        Ok(())
    }

    #[test]
    fn production_refuses_insecure_cookies() {
        assert!(settings(&[("CAIRN_COOKIE_SECURE", "false")]).is_ok());
        assert!(settings(&[("CAIRN_ENV", "production"), ("CAIRN_COOKIE_SECURE", "false")]).is_err());
    }

    #[test]
    fn production_refuses_the_rebuild_fault_knob() -> anyhow::Result<()> {
        assert_eq!(settings(&[("CAIRN_FAULT_REBUILD_PAUSE_MS", "40")])?.fault_rebuild_pause, Duration::from_millis(40));
        assert_eq!(settings(&[])?.fault_rebuild_pause, Duration::ZERO);
        let err = settings(&[
            ("CAIRN_ENV", "production"),
            ("CAIRN_FILES_MASTER_KEY_FILE", "keys"),
            ("CAIRN_FAULT_REBUILD_PAUSE_MS", "40"),
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("CAIRN_FAULT_REBUILD_PAUSE_MS"), "{err}");
        Ok(())
    }

    #[test]
    fn production_refuses_the_upload_fault_knob() -> anyhow::Result<()> {
        let s = settings(&[("CAIRN_FAULT_UPLOAD_PAUSE_MS", "250")])?;
        assert_eq!(s.files.fault_upload_pause, Duration::from_millis(250));
        assert_eq!(settings(&[])?.files.fault_upload_pause, Duration::ZERO);
        let err = settings(&[
            ("CAIRN_ENV", "production"),
            ("CAIRN_FILES_MASTER_KEY_FILE", "keys"),
            ("CAIRN_FAULT_UPLOAD_PAUSE_MS", "250"),
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("CAIRN_FAULT_UPLOAD_PAUSE_MS"), "{err}");
        Ok(())
    }

    #[test]
    fn malformed_values_are_refused_with_the_variable_named() {
        let err = settings(&[("CAIRN_ENV", "staging")]).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("CAIRN_ENV"), "{err}");
        let err = settings(&[("CAIRN_LISTEN", "nowhere")]).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("CAIRN_LISTEN"), "{err}");
        let err = settings(&[("CAIRN_NAMESPACE", "a.b")]).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("CAIRN_NAMESPACE"), "{err}");
    }
}
