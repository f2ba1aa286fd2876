//! `login`: sign-ins per second at 16 clients, and the latency of a cheap authenticated GET
//! (`/api/v1/users/me`, a steady probe of 4 clients × 50 requests/s) while they run, beside the
//! same probe with no sign-ins.
//!
//! Baseline: argon2id verifications (m = 19 MiB, t = 2, p = 1, cairn's parameters) per second
//! on one thread per core, measured after the service has stopped. A sign-in is one verification
//! plus the service's own work, so this is the ceiling.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};

use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::load::{closed_loop, paced_loop, Outcome, Window};
use crate::report::{Measure, Row};
use crate::seed;
use crate::stats::Summary;

/// Clients signing in.
const LOGIN_CLIENTS: usize = 16;
/// Clients reading their profile meanwhile.
const READ_CLIENTS: usize = 4;
/// How often each of them sends a request.
const READ_PACE: Duration = Duration::from_millis(20);
/// Users that sign in, in turn.
const USERS: usize = 256;

async fn me_load(running: &Running, token: &Arc<String>, window: Window) -> anyhow::Result<Outcome> {
    let (api, token) = (running.api.clone(), token.clone());
    paced_loop(vec![(); READ_CLIENTS], window, READ_PACE, move |()| {
        let (api, token) = (api.clone(), token.clone());
        async move { ((), api.me(&token).await.map(|()| "me")) }
    })
    .await
}

async fn login_load(running: &Running, emails: &Arc<Vec<String>>, window: Window) -> anyhow::Result<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let (api, emails) = (running.api.clone(), emails.clone());
    closed_loop(vec![(); LOGIN_CLIENTS], window, move |()| {
        let (api, emails, next) = (api.clone(), emails.clone(), next.clone());
        async move {
            let email = &emails[next.fetch_add(1, Ordering::Relaxed) % emails.len()];
            ((), api.login(email, seed::PASSWORD).await.map(|_| "login"))
        }
    })
    .await
}

/// Verifies the bench password against `hash` on one thread per core through `window`; returns
/// verifications per second and their latencies.
async fn argon2_baseline(hash: &str, window: Window) -> anyhow::Result<(f64, Option<Summary>, usize)> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let started = Instant::now();
    let (from, to) = (started + window.warmup, started + window.warmup + window.measure);
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (hash, failed) = (hash.to_owned(), failed.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let mut latencies = Vec::new();
            let (Ok(argon2), Ok(parsed)) = (seed::argon2id(), PasswordHash::new(&hash)) else {
                failed.store(true, Ordering::Relaxed);
                return latencies;
            };
            loop {
                let began = Instant::now();
                if began >= to {
                    break;
                }
                if argon2.verify_password(seed::PASSWORD.as_bytes(), &parsed).is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                let ended = Instant::now();
                if began >= from && ended <= to {
                    latencies.push(ended - began);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await?);
    }
    anyhow::ensure!(!failed.load(Ordering::Relaxed), "argon2 verification failed");
    Ok((all.len() as f64 / window.measure.as_secs_f64(), Summary::of(&all), threads))
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or a load measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let window = ctx.window();
    let hash = seed::password_hash()?;
    let spec =
        seed::Users { label: "signer", users: USERS, events_per_user: 1, chunk_events: 5_000, password_hash: &hash };
    seed::users(&env.pool, &spec).await?;
    let emails: Arc<Vec<String>> = Arc::new((0..USERS).map(|n| spec.email(n)).collect());
    let running = Running::start(env, &[]).await?;
    seed::wait_projected(&env.pool, Duration::from_secs(120)).await?;
    let reader = Arc::new(running.api.login(&spec.email(0), seed::PASSWORD).await?);

    let quiet = me_load(&running, &reader, window).await?;
    quiet.require_success("GET /users/me alone")?;
    let (logins, loaded) = tokio::join!(login_load(&running, &emails, window), me_load(&running, &reader, window));
    let (logins, loaded) = (logins?, loaded?);
    logins.require_success("sign-ins")?;
    loaded.require_success("GET /users/me under sign-ins")?;
    let memory = running.service.memory().ok();
    running.service.stop().await?;
    let (hashes, hash_latency, threads) = argon2_baseline(&hash, window).await?;
    out.note(format!(
        "{USERS} users sign in in turn from {LOGIN_CLIENTS} clients while {READ_CLIENTS} clients read /users/me every \
         {} ms each",
        READ_PACE.as_millis()
    ));
    let mut row = Row::new(
        format!("login, {LOGIN_CLIENTS} clients"),
        Measure::rate(logins.throughput(), "logins/s", logins.summary()),
    )
    .errors(logins.errors)
    .memory(memory)
    .baseline(format!("argon2id verify, {threads} threads"), Measure::rate(hashes, "hashes/s", hash_latency));
    if let Some(e) = &logins.first_error {
        row = row.extra("first_error", e.clone());
    }
    out.rows.push(row);
    out.rows.push(
        Row::new(
            format!("GET /api/v1/users/me during logins, {READ_CLIENTS} clients × 50/s"),
            Measure::rate(loaded.throughput(), "req/s", loaded.summary()),
        )
        .errors(loaded.errors)
        .memory(memory)
        .baseline(
            "same GET probe with no logins".to_owned(),
            Measure::rate(quiet.throughput(), "req/s", quiet.summary()),
        ),
    );
    Ok(())
}
