//! `hostile`: what a client that never signs in can make the service hold, and what sign-in
//! answers reveal by their timing.
//!
//! Memory: 20,000 requests (2,000 with `--quick`), each from its own `X-Forwarded-For` address
//! (the service trusts the bench as its proxy) and for its own unknown email: password-reset and
//! resend-verification requests, and one in ten a sign-in. Resident memory is read before, right
//! after, and once a rate-limit sweep has forgotten the addresses (`CAIRN_RATE_LIMIT_SWEEP_SECS=5`;
//! `cairn_rate_limit_keys{limiter="ip_auth"}` back to 0); the goal is to end within 20 MiB of the
//! start. The rate limits are on, at their defaults. The per-address mail limits (3 an hour) still count their addresses then, by design:
//! forgetting them would hand each address its mails again; they go once their hour has run out.
//!
//! Timing: the median of a sign-in with an unknown email, with any password to an account locked
//! by failed sign-ins, to an unknown email locked the same way, and with a wrong password to an
//! ordinary account, sent one at a time and interleaved. The lock is kept per address, account or
//! not, so the pairs an attacker could compare to learn whether an address has an account are
//! (locked account, locked unknown address) and (wrong password, unknown address): each must not
//! be told apart (within 10 %).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::stats::Summary;

/// Concurrent clients of the memory phase.
const CLIENTS: usize = 32;
/// How often the service sweeps its rate limiters in this scenario.
const SWEEP_SECS: u64 = 5;
/// Failed sign-ins that lock an account (the service's default).
const LOCKOUT_THRESHOLD: usize = 5;
/// Wrong passwords sent to each ordinary account: fewer than lock it.
const WRONG_PER_ACCOUNT: usize = LOCKOUT_THRESHOLD - 1;

/// A client that says which address it forwards for.
#[derive(Clone)]
struct Attacker {
    http: reqwest::Client,
    base: String,
}

impl Attacker {
    fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }

    /// POSTs `body` to `path` as if forwarded for `from`; the status and how long it took.
    async fn post(&self, path: &str, from: &str, body: &Value) -> anyhow::Result<(StatusCode, Duration)> {
        let began = Instant::now();
        let response =
            self.http.post(format!("{}{path}", self.base)).header("x-forwarded-for", from).json(body).send().await?;
        let status = response.status();
        response.bytes().await?;
        Ok((status, began.elapsed()))
    }

    async fn login(&self, from: &str, email: &str, password: &str) -> anyhow::Result<(StatusCode, Duration)> {
        self.post("/api/v1/auth/login", from, &json!({ "email": email, "password": password })).await
    }

    /// `/metrics` as text.
    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.http.get(format!("{}/metrics", self.base)).send().await?.text().await?)
    }

    /// `cairn_rate_limit_keys{limiter}` as last swept, if it was.
    async fn limiter_keys(&self, limiter: &str) -> anyhow::Result<Option<f64>> {
        let prefix = format!("cairn_rate_limit_keys{{limiter=\"{limiter}\"}} ");
        Ok(self.metrics().await?.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()))
    }

    /// A counter's value (0 when it was never incremented).
    async fn counter(&self, name: &str) -> anyhow::Result<f64> {
        let prefix = format!("{name} ");
        Ok(self.metrics().await?.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0.0))
    }
}

/// The `n`th address of the /8 network `range`.
fn address(range: u8, n: usize) -> String {
    format!("{range}.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or the service answers what it must not.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let sweep = SWEEP_SECS.to_string();
    // The rate limits are on, at their defaults (the other scenarios turn them off): they are
    // what the flood fills.
    let running = Running::start(
        env,
        &[
            ("CAIRN_TRUSTED_PROXIES", "127.0.0.1"),
            ("CAIRN_RATE_LIMIT_SWEEP_SECS", &sweep),
            ("CAIRN_RATE_LIMIT_AUTH", "30/min"),
            ("CAIRN_RATE_LIMIT_API", "1200/min"),
            ("CAIRN_RATE_LIMIT_PUBLIC", "600/min"),
            ("CAIRN_RATE_LIMIT_USER", "1200/min"),
        ],
    )
    .await?;
    let attacker = Attacker::new(&running.service.base_url)?;
    let samples = ctx.pick(15, 40);
    let timing = timing(&attacker, samples).await?;

    // Every hashing thread has worked (their memory is part of the start), then the start.
    let warm = (0..16).map(|i| {
        let attacker = attacker.clone();
        async move { attacker.login(&address(172, 60_000 + i), &format!("warm{i}@hostile.example"), "x").await }
    });
    futures::future::try_join_all(warm).await?;
    let before = running.service.memory()?;

    let requests = ctx.pick(2_000, 20_000);
    let started = Instant::now();
    let statuses = flood(&attacker, requests).await?;
    let flood_seconds = started.elapsed().as_secs_f64();
    let after = running.service.memory()?;
    let held_after = attacker.limiter_keys("ip_auth").await?;

    // Until a sweep has forgotten every address (and a little longer, for the allocator).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if attacker.limiter_keys("ip_auth").await? == Some(0.0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the rate limiters still held addresses two minutes after the flood");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let swept = running.service.memory()?;
    let mail_keys = attacker.limiter_keys("mail").await?.unwrap_or(0.0);
    let dropped = attacker.counter("cairn_mail_requests_dropped_total").await?;
    let refused = attacker.counter("cairn_password_hashes_refused_total").await?;
    running.service.stop().await?;

    let unexpected: Vec<String> = statuses
        .iter()
        .filter(|(status, _)| ![202, 401].contains(status))
        .map(|(status, n)| format!("{n} × {status}"))
        .collect();
    out.note(format!(
        "{requests} requests in {flood_seconds:.1} s at {CLIENTS} clients, each from its own forwarded address and for \
         its own unknown email (4 in 10 password-reset, 5 in 10 resend-verification, 1 in 10 sign-in); answers: {}; \
         mail look-ups dropped under load: {dropped:.0}; hashes refused by a full queue: {refused:.0}; addresses \
         held at the first sweep after: {}; mail limits still counting after the sweep: {mail_keys:.0}",
        statuses.iter().map(|(s, n)| format!("{n} × {s}")).collect::<Vec<_>>().join(", "),
        held_after.map_or_else(|| "not swept yet".to_owned(), |k| format!("{k:.0}")),
    ));
    let growth = swept.rss_mib - before.rss_mib;
    out.rows.push(Row::new("RSS before the flood", Measure::rate(before.rss_mib, "MiB", None)).memory(Some(before)));
    out.rows.push(
        Row::new(format!("RSS right after {requests} hostile requests"), Measure::rate(after.rss_mib, "MiB", None))
            .memory(Some(after))
            .errors(unexpected.len() as u64)
            .extra("answers", json!(statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<Vec<_>>())),
    );
    out.rows.push(
        Row::new("RSS after the rate-limit sweep", Measure::rate(swept.rss_mib, "MiB", None))
            .memory(Some(swept))
            .extra("growth_mib", growth)
            .extra("mail_limit_keys", mail_keys)
            .target("<= 20 MiB above before", growth <= 20.0),
    );
    timing.rows(out);
    if !unexpected.is_empty() {
        bail!("unexpected answers to the flood: {}", unexpected.join(", "));
    }
    Ok(())
}

/// Sends `requests` hostile requests at [`CLIENTS`] clients; the count of each status.
async fn flood(attacker: &Attacker, requests: usize) -> anyhow::Result<Vec<(u16, u64)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..600).map(|_| AtomicU64::new(0)).collect());
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (attacker, next, counts) = (attacker.clone(), next.clone(), counts.clone());
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return anyhow::Ok(());
                }
                let (from, email) = (address(10, n), format!("stranger{n}@hostile.example"));
                let (status, _) = match n % 10 {
                    0 => attacker.login(&from, &email, "not the password").await?,
                    1..=4 => attacker.post("/api/v1/auth/password-reset", &from, &json!({ "email": email })).await?,
                    _ => attacker.post("/api/v1/auth/verify-email/resend", &from, &json!({ "email": email })).await?,
                };
                if let Some(count) = counts.get(usize::from(status.as_u16())) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined.context("a client panicked")??;
    }
    Ok(counts
        .iter()
        .enumerate()
        .filter_map(|(status, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| (u16::try_from(status).unwrap_or(0), n))
        })
        .collect())
}

/// The three kinds of refused sign-in, timed.
struct Timing {
    unknown: Option<Summary>,
    locked: Option<Summary>,
    locked_unknown: Option<Summary>,
    wrong: Option<Summary>,
    statuses: Vec<String>,
}

impl Timing {
    fn rows(&self, out: &mut Output) {
        let p50 = |s: &Option<Summary>| s.map_or(0.0, |s| s.p50_ms);
        let ratio = |a: &Option<Summary>, b: &Option<Summary>| if p50(b) > 0.0 { p50(a) / p50(b) } else { 0.0 };
        out.note(format!("sign-in answers timed: {}", self.statuses.join("; ")));
        out.rows.push(Row::new("sign-in p50, unknown email", Measure::rate(p50(&self.unknown), "ms", self.unknown)));
        let wrong = ratio(&self.wrong, &self.unknown);
        out.rows.push(
            Row::new("sign-in p50, wrong password", Measure::rate(p50(&self.wrong), "ms", self.wrong))
                .ratio(wrong)
                .target("wrong password ÷ unknown within 0.9–1.1", (0.9..=1.1).contains(&wrong)),
        );
        out.rows.push(Row::new(
            "sign-in p50, unknown email locked",
            Measure::rate(p50(&self.locked_unknown), "ms", self.locked_unknown),
        ));
        let locked = ratio(&self.locked, &self.locked_unknown);
        out.rows.push(
            Row::new("sign-in p50, locked account", Measure::rate(p50(&self.locked), "ms", self.locked))
                .ratio(locked)
                .target("locked account ÷ locked unknown within 0.9–1.1", (0.9..=1.1).contains(&locked)),
        );
    }
}

/// Registers the accounts, locks one, and times `samples` sign-ins of each kind, interleaved.
async fn timing(attacker: &Attacker, samples: usize) -> anyhow::Result<Timing> {
    let mut from = 0usize;
    let mut next_address = || {
        from += 1;
        address(192, from)
    };
    let password = crate::seed::PASSWORD;
    let register = |email: String, from: String| async move {
        let body = json!({ "email": email, "password": password, "display_name": "Hostile bench" });
        let (status, _) = attacker.post("/api/v1/auth/register", &from, &body).await?;
        if status != StatusCode::CREATED {
            bail!("registering {email}: HTTP {status}");
        }
        anyhow::Ok(())
    };
    let locked = "locked@hostile.example".to_owned();
    register(locked.clone(), next_address()).await?;
    let ordinary: Vec<String> =
        (0..samples.div_ceil(WRONG_PER_ACCOUNT)).map(|i| format!("ordinary{i}@hostile.example")).collect();
    for email in &ordinary {
        register(email.clone(), next_address()).await?;
    }
    let locked_unknown = "nobody-locked@hostile.example".to_owned();
    for _ in 0..LOCKOUT_THRESHOLD {
        attacker.login(&next_address(), &locked, "a wrong guess").await?;
        attacker.login(&next_address(), &locked_unknown, "a wrong guess").await?;
    }

    let (mut unknown, mut locked_times, mut locked_unknown_times, mut wrong) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut count = |kind: &str, status: StatusCode| *statuses.entry(format!("{kind} {status}")).or_default() += 1;
    for i in 0..samples {
        let (status, took) = attacker.login(&next_address(), &format!("nobody{i}@hostile.example"), "a guess").await?;
        count("unknown", status);
        unknown.push(took);
        let (status, took) = attacker.login(&next_address(), &locked, "a guess").await?;
        count("locked", status);
        locked_times.push(took);
        let (status, took) = attacker.login(&next_address(), &locked_unknown, "a guess").await?;
        count("locked unknown", status);
        locked_unknown_times.push(took);
        let (status, took) =
            attacker.login(&next_address(), &ordinary[i / WRONG_PER_ACCOUNT], "a wrong password").await?;
        count("wrong password", status);
        wrong.push(took);
    }
    Ok(Timing {
        unknown: Summary::of(&unknown),
        locked: Summary::of(&locked_times),
        locked_unknown: Summary::of(&locked_unknown_times),
        wrong: Summary::of(&wrong),
        statuses: statuses.into_iter().map(|(k, n)| format!("{n} × {k}")).collect(),
    })
}
