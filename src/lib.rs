//! cairn: the operator binary. `serve` runs every service in one process; `command-api`,
//! `query-api`, `projector`, `workers` and `relay` run one each (split mode); `migrate`,
//! `replay` and `admin` are operator tasks.
//!
//! - [`app`]: builds a process from settings and the services it should run.
//! - [`cli`]: the command line.

pub mod app;
pub mod cli;

pub use app::{Application, Services};
