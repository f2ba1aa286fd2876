//! `files`: upload and download throughput (MiB/s) of 1 MiB and 100 MiB files at 1 and 8
//! clients, for each store (the encrypted local directory and S3), with the service's peak RSS,
//! and how far one 1 GiB upload moves the service's RSS (goal: under 64 MiB).
//!
//! Baselines, in the same run, on the same machine and the same bytes:
//! - S3: the same bytes put and got with aws-sdk-s3 directly (PutObject / GetObject) against the
//!   same s3s-fs, from this process;
//! - local: the same bytes written and read with plain file I/O, and through cairn-storage's local
//!   store in this process (the encryption alone, without HTTP, auth or the log).
//!
//! S3 runs against a private s3s-fs this scenario starts from the binary `.ci/run` installs
//! (`BENCH_S3S_FS` names another), with its data in the scenario's scratch directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinSet;

use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::service::memory_of;

const MIB: usize = 1024 * 1024;
const ACCESS_KEY: &str = "bench";
const SECRET_KEY: &str = "bench-secret";

/// The two stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    S3,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::S3 => "s3",
        }
    }
}

/// A private s3s-fs, stopped when dropped.
struct S3Server {
    child: tokio::process::Child,
    endpoint: String,
}

impl S3Server {
    async fn start(env: &BenchEnv) -> anyhow::Result<Self> {
        let binary = std::env::var_os("BENCH_S3S_FS").map_or_else(
            || {
                let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
                home.join(".cache/cairn/s3s-fs/bin/s3s-fs")
            },
            PathBuf::from,
        );
        if !binary.is_file() {
            bail!("{} is missing: run .ci/run (it installs s3s-fs), or set BENCH_S3S_FS", binary.display());
        }
        let data = env.scratch_file("s3s-data");
        std::fs::create_dir_all(&data)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = tokio::process::Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
            .args(["--secret-key", SECRET_KEY])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("s3s-fs did not listen on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, endpoint: format!("http://127.0.0.1:{port}") })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The service's settings for `store`.
fn service_env(store: Store, dir: &Path, s3: &S3Server, bucket: &str) -> Vec<(String, String)> {
    let mut vars = vec![
        ("CAIRN_FILES_STORE".to_owned(), store.name().to_owned()),
        ("CAIRN_FILES_DIR".to_owned(), dir.display().to_string()),
        ("CAIRN_MAX_UPLOAD_BYTES".to_owned(), (2 * 1024 * MIB).to_string()),
        ("CAIRN_USER_QUOTA_BYTES".to_owned(), (1u64 << 40).to_string()),
        ("CAIRN_VERIFIED_EMAIL_FOR".to_owned(), "none".to_owned()),
    ];
    if store == Store::S3 {
        vars.extend([
            ("S3_ENDPOINT".to_owned(), s3.endpoint.clone()),
            ("S3_BUCKET".to_owned(), bucket.to_owned()),
            ("S3_ACCESS_KEY_ID".to_owned(), ACCESS_KEY.to_owned()),
            ("S3_SECRET_ACCESS_KEY".to_owned(), SECRET_KEY.to_owned()),
        ]);
    }
    vars
}

/// The client side of one store: uploads and downloads through cairn's HTTP API.
#[derive(Clone)]
struct FilesApi {
    http: reqwest::Client,
    base: String,
    token: Arc<str>,
}

impl FilesApi {
    /// `POST /api/v1/files` with `size` bytes of `data` (repeated as needed), streamed; the id.
    async fn upload(&self, data: &Bytes, size: usize) -> anyhow::Result<String> {
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(repeat(data, size)), size as u64)
                .file_name("bench.bin")
                .mime_str("application/octet-stream")?;
        let form = reqwest::multipart::Form::new().part("file", part);
        let response = self
            .http
            .post(format!("{}/api/v1/files", self.base))
            .bearer_auth(&*self.token)
            .multipart(form)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("upload: HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        }
        let envelope: Value = serde_json::from_slice(&body)?;
        envelope.pointer("/data/file/id").and_then(Value::as_str).map(str::to_owned).context("no data.file.id")
    }

    /// `GET /api/v1/files/{id}/download` (following S3's redirect); the bytes received.
    async fn download(&self, id: &str) -> anyhow::Result<u64> {
        let response =
            self.http.get(format!("{}/api/v1/files/{id}/download", self.base)).bearer_auth(&*self.token).send().await?;
        let status = response.status();
        if !status.is_success() {
            bail!("download: HTTP {status}");
        }
        drain(response).await
    }
}

async fn drain(response: reqwest::Response) -> anyhow::Result<u64> {
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    while let Some(piece) = body.next().await {
        received += piece?.len() as u64;
    }
    Ok(received)
}

/// `size` bytes: `data` repeated, in its own pieces (no copy).
fn repeat(data: &Bytes, size: usize) -> futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>> {
    let data = data.clone();
    let pieces = (0..size.div_ceil(data.len())).map(move |i| {
        let left = size - i * data.len();
        Ok(data.slice(..left.min(data.len())))
    });
    futures::stream::iter(pieces).boxed()
}

/// Runs `rounds` operations on each of `clients` clients at once; MiB/s over all of them.
async fn throughput<F, Fut>(clients: usize, rounds: usize, bytes_each: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..clients {
        let op = op.clone();
        set.spawn(async move {
            for round in 0..rounds {
                op(client, round).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((clients * rounds * bytes_each) as f64 / MIB as f64 / seconds)
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or an operation fails.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let s3 = S3Server::start(env).await?;
    // Random bytes, so neither compression nor sniffing finds a pattern; one 8 MiB block repeated.
    let block: Bytes = (0..8 * MIB).map(|_| rand::random::<u8>()).collect::<Vec<u8>>().into();
    let sizes = [(MIB, ctx.pick(4, 16)), (100 * MIB, ctx.pick(1, 2))];
    let big = ctx.pick(256 * MIB, 1024 * MIB);
    out.note(format!(
        "random bytes; rounds per client: {} × 1 MiB, {} × 100 MiB; uploads stream from the client (never whole in \
         memory on either side); downloads of S3 follow the 302 to s3s-fs; a private s3s-fs (pid {:?}) on the same machine",
        sizes[0].1,
        sizes[1].1,
        s3.pid()
    ));

    for store in [Store::Local, Store::S3] {
        let dir = env.scratch_file(&format!("files-{}", store.name()));
        let bucket = format!("bench-{}", &env.namespace[5..].to_lowercase());
        let vars = service_env(store, &dir, &s3, &bucket);
        let vars_ref: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let running = Running::start(env, &vars_ref).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
        let api = FilesApi { http, base: running.service.base_url.clone(), token: running.admin_token.clone().into() };

        // One large upload first, on a fresh process: how far it moves the RSS.
        let before = running.service.memory()?;
        let started = Instant::now();
        let id = api.upload(&block, big).await?;
        let seconds = started.elapsed().as_secs_f64();
        let after = running.service.memory()?;
        let moved = after.peak_mib - before.rss_mib;
        out.rows.push(
            Row::new(
                format!("{}: RSS moved by one {} MiB upload", store.name(), big / MIB),
                Measure::rate(moved, "MiB", None),
            )
            .memory(Some(after))
            .extra("upload_mib_per_second", (big / MIB) as f64 / seconds)
            .target("< 64 MiB", moved < 64.0),
        );
        let _ = id;

        for &(size, rounds) in &sizes {
            for clients in [1usize, 8] {
                let label = format!("{} MiB × {clients} client{}", size / MIB, if clients == 1 { "" } else { "s" });
                let ids = Arc::new(tokio::sync::Mutex::new(Vec::new()));
                let (up_api, up_ids, up_block) = (api.clone(), Arc::clone(&ids), block.clone());
                let upload = throughput(clients, rounds, size, move |_, _| {
                    let (api, ids, block) = (up_api.clone(), Arc::clone(&up_ids), up_block.clone());
                    async move {
                        let id = api.upload(&block, size).await?;
                        ids.lock().await.push(id);
                        Ok(())
                    }
                })
                .await?;
                let ids: Arc<Vec<String>> = Arc::new(ids.lock().await.clone());
                // The read side serves a file once its projection has it.
                wait_files(env, ids.len()).await?;
                let (down_api, down_ids) = (api.clone(), Arc::clone(&ids));
                let download = throughput(clients, rounds, size, move |client, round| {
                    let (api, ids) = (down_api.clone(), Arc::clone(&down_ids));
                    async move {
                        let received = api.download(&ids[(client * rounds + round) % ids.len()]).await?;
                        if received != size as u64 {
                            bail!("downloaded {received} bytes of {size}");
                        }
                        Ok(())
                    }
                })
                .await?;
                let (upload_base, download_base, base_name) = match store {
                    Store::Local => {
                        let (up, down) = plain_files(env, &block, size, clients, rounds).await?;
                        (up, down, "plain file write / read")
                    }
                    Store::S3 => {
                        let (up, down) = direct_s3(&s3, &bucket, &block, size, clients, rounds).await?;
                        (up, down, "aws-sdk-s3 PutObject / GetObject")
                    }
                };
                let memory = memory_of(running.service.pid()).ok();
                let large = size >= 100 * MIB;
                let mut up_row =
                    Row::new(format!("{}: upload {label}", store.name()), Measure::rate(upload, "MiB/s", None))
                        .baseline(base_name, Measure::rate(upload_base, "MiB/s", None))
                        .memory(memory);
                let mut down_row =
                    Row::new(format!("{}: download {label}", store.name()), Measure::rate(download, "MiB/s", None))
                        .baseline(base_name, Measure::rate(download_base, "MiB/s", None))
                        .memory(memory);
                if large {
                    up_row = up_row.target(">= 0.7 x baseline", upload >= 0.7 * upload_base);
                    down_row = down_row.target(">= 0.7 x baseline", download >= 0.7 * download_base);
                }
                if store == Store::Local {
                    let (up, down) = encryption_alone(&dir, &block, size, clients, rounds).await?;
                    up_row = up_row.extra("encryption_alone_upload_mib_per_second", up);
                    down_row = down_row.extra("encryption_alone_download_mib_per_second", down);
                }
                out.rows.push(up_row);
                out.rows.push(down_row);
            }
        }
        let memory = running.service.stop().await?;
        out.note(format!("{}: peak RSS of the service over the whole run {:.0} MiB", store.name(), memory.peak_mib));
    }
    Ok(())
}

/// Waits until the files projection holds `at_least` more files than it did (two minutes at most).
async fn wait_files(env: &BenchEnv, _at_least: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e WHERE e.event_type = 'FileUploaded' \
             AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id::text = e.aggregate_id)",
        )
        .fetch_one(&env.pool)
        .await?;
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pending} uploaded files are still not in the files read model after two minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Plain file I/O of the same bytes: write (and fsync, as the store does) then read, MiB/s.
async fn plain_files(
    env: &BenchEnv,
    block: &Bytes,
    size: usize,
    clients: usize,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let dir = Arc::new(env.scratch_file("plain"));
    std::fs::create_dir_all(&*dir)?;
    let (w_dir, w_block) = (Arc::clone(&dir), block.clone());
    let write = throughput(clients, rounds, size, move |client, round| {
        let (dir, block) = (Arc::clone(&w_dir), w_block.clone());
        async move {
            use tokio::io::AsyncWriteExt;
            let mut file = tokio::fs::File::create(dir.join(format!("{client}-{round}"))).await?;
            let mut pieces = repeat(&block, size);
            while let Some(piece) = pieces.next().await {
                file.write_all(&piece?).await?;
            }
            file.sync_all().await?;
            Ok(())
        }
    })
    .await?;
    let r_dir = Arc::clone(&dir);
    let read = throughput(clients, rounds, size, move |client, round| {
        let dir = Arc::clone(&r_dir);
        async move {
            use tokio::io::AsyncReadExt;
            let mut file = tokio::fs::File::open(dir.join(format!("{client}-{round}"))).await?;
            let mut buffer = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                total += n;
            }
            if total != size {
                bail!("read {total} of {size}");
            }
            Ok(())
        }
    })
    .await?;
    std::fs::remove_dir_all(&*dir)?;
    Ok((write, read))
}

/// cairn-storage's local store in this process: the encryption and the file I/O, no HTTP.
async fn encryption_alone(
    dir: &Path,
    block: &Bytes,
    size: usize,
    clients: usize,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let vars = [("CAIRN_FILES_DIR".to_owned(), dir.join("alone").display().to_string())];
    let settings =
        cairn_platform::Settings::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
    let store = cairn_storage::FileStore::open(&settings.files, false).await?;
    let keys: Arc<Vec<String>> =
        Arc::new((0..clients * rounds).map(|_| cairn_storage::FileStore::key_for(uuid::Uuid::new_v4())).collect());
    let (w_store, w_keys, w_block) = (store.clone(), Arc::clone(&keys), block.clone());
    let write = throughput(clients, rounds, size, move |client, round| {
        let (store, keys, block) = (w_store.clone(), Arc::clone(&w_keys), w_block.clone());
        async move {
            store.put(&keys[client * rounds + round], repeat(&block, size)).await?;
            Ok(())
        }
    })
    .await?;
    let (r_store, r_keys) = (store.clone(), Arc::clone(&keys));
    let read = throughput(clients, rounds, size, move |client, round| {
        let (store, keys) = (r_store.clone(), Arc::clone(&r_keys));
        async move {
            let mut body = store.get(&keys[client * rounds + round], None).await?.body;
            let mut total = 0;
            while let Some(piece) = body.next().await {
                total += piece?.len();
            }
            if total != size {
                bail!("read {total} of {size}");
            }
            Ok(())
        }
    })
    .await?;
    for key in keys.iter() {
        store.delete(key).await?;
    }
    Ok((write, read))
}

/// aws-sdk-s3 directly against the same server: PutObject then GetObject of the same bytes.
async fn direct_s3(
    s3: &S3Server,
    bucket: &str,
    block: &Bytes,
    size: usize,
    clients: usize,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "bench"))
        .endpoint_url(&s3.endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    let (w_client, w_bucket, w_prefix) = (client.clone(), bucket.to_owned(), prefix.clone());
    // The SDK needs the body's length up front: one contiguous buffer of `size`, built once.
    let body: Bytes = {
        let mut all = Vec::with_capacity(size);
        while all.len() < size {
            let take = (size - all.len()).min(block.len());
            all.extend_from_slice(&block[..take]);
        }
        all.into()
    };
    let write = throughput(clients, rounds, size, move |client_no, round| {
        let (client, bucket, prefix, body) = (w_client.clone(), w_bucket.clone(), w_prefix.clone(), body.clone());
        async move {
            client
                .put_object()
                .bucket(&bucket)
                .key(format!("baseline/{prefix}/{client_no}-{round}"))
                .body(aws_sdk_s3::primitives::ByteStream::from(body))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("PutObject: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
            Ok(())
        }
    })
    .await?;
    let (r_client, r_bucket, r_prefix) = (client.clone(), bucket.to_owned(), prefix.clone());
    let read = throughput(clients, rounds, size, move |client_no, round| {
        let (client, bucket, prefix) = (r_client.clone(), r_bucket.clone(), r_prefix.clone());
        async move {
            let object = client
                .get_object()
                .bucket(&bucket)
                .key(format!("baseline/{prefix}/{client_no}-{round}"))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("GetObject: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
            let mut body = object.body;
            let mut total = 0;
            while let Some(piece) = body.next().await {
                total += piece?.len();
            }
            if total != size {
                bail!("read {total} of {size}");
            }
            Ok(())
        }
    })
    .await?;
    Ok((write, read))
}
