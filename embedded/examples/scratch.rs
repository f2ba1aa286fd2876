//! scratch
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_default();
    let mut s = cairn_embedded::EmbeddedServices::start(cairn_embedded::EmbeddedOptions {
        data_dir: dir.into(),
        database_url: "postgres://x@127.0.0.1:1/postgres".into(),
        nats_url: "nats://127.0.0.1:4222".into(),
    }).await?;
    let out = std::process::Command::new("psql").arg(s.database_url()).args(["-XtAc", "show unix_socket_directories"]).output()?;
    eprintln!("{} -> {:?}", s.database_url(), String::from_utf8_lossy(&out.stdout));
    s.stop().await
}
