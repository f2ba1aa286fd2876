//! An SMTP server that answers the greeting, EHLO, MAIL and RCPT at once and then, while told
//! to stall, holds its answer to DATA: the way an overloaded or half-broken mail server keeps a
//! client waiting for as long as the client's timeout allows. Told not to stall, it takes the
//! message and keeps it.
//!
//! Shared by the end-to-end tests and the `stalled-smtp` benchmark (which includes this file).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A message the server accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The envelope recipients (RCPT TO), without angle brackets.
    pub recipients: Vec<String>,
    /// The message as sent after DATA, dot-stuffing removed.
    pub data: String,
}

#[derive(Default)]
struct Shared {
    /// How long DATA is held, in milliseconds; 0 answers at once.
    stall_ms: AtomicU64,
    /// DATA commands being held right now.
    stalled_now: AtomicUsize,
    /// DATA commands held so far.
    stalled_total: AtomicUsize,
    accepted: Mutex<Vec<Accepted>>,
}

/// The server; stops (and drops every connection) when dropped.
pub struct StallingSmtp {
    port: u16,
    shared: Arc<Shared>,
    accepting: tokio::task::JoinHandle<()>,
}

impl StallingSmtp {
    /// Listens on 127.0.0.1:`port` (0 picks one), holding DATA for `stall`.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(port: u16, stall: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        shared.stall_ms.store(millis(stall), Ordering::SeqCst);
        let accepting = tokio::spawn(accept(listener, Arc::clone(&shared)));
        Ok(Self { port, shared, accepting })
    }

    /// The port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long DATA is held from now on (zero: answered at once). A DATA held already stays held.
    pub fn set_stall(&self, stall: Duration) {
        self.shared.stall_ms.store(millis(stall), Ordering::SeqCst);
    }

    /// DATA commands being held right now.
    #[must_use]
    pub fn stalled_now(&self) -> usize {
        self.shared.stalled_now.load(Ordering::SeqCst)
    }

    /// DATA commands held so far.
    #[must_use]
    pub fn stalled_total(&self) -> usize {
        self.shared.stalled_total.load(Ordering::SeqCst)
    }

    /// Every message accepted so far.
    #[must_use]
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.accepted.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Drop for StallingSmtp {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every connection.
        self.accepting.abort();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(session(stream, Arc::clone(&shared)));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One SMTP session; any I/O error ends it.
async fn session(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 stalling.test ESMTP\r\n").await?;
    let mut recipients = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 stalling.test\r\n"
        } else if command.starts_with("MAIL") {
            recipients.clear();
            b"250 OK\r\n"
        } else if command.starts_with("RCPT") {
            let address = line.trim_end().split_once(':').map_or("", |(_, a)| a.trim());
            recipients.push(address.trim_start_matches('<').trim_end_matches('>').to_owned());
            b"250 OK\r\n"
        } else if command == "DATA" {
            hold(&shared).await;
            write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            if let Ok(mut accepted) = shared.accepted.lock() {
                accepted.push(Accepted { recipients: std::mem::take(&mut recipients), data });
            }
            b"250 OK queued\r\n"
        } else if command.starts_with("RSET") || command.starts_with("NOOP") {
            b"250 OK\r\n"
        } else if command.starts_with("QUIT") {
            write.write_all(b"221 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// Holds a DATA command for as long as the server is told to stall.
async fn hold(shared: &Shared) {
    let stall = shared.stall_ms.load(Ordering::SeqCst);
    if stall == 0 {
        return;
    }
    shared.stalled_total.fetch_add(1, Ordering::SeqCst);
    shared.stalled_now.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(stall)).await;
    shared.stalled_now.fetch_sub(1, Ordering::SeqCst);
}
