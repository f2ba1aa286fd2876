//! Files on the command side: uploads streamed to the file store and recorded as FileUploaded
//! ([`upload`](self::upload)), the quota and the uploads in flight ([`quota`]), sharing and
//! deletion ([`FileCommands`]), and their routes. Reads and downloads are the query side's.

mod commands;
pub mod quota;
mod routes;
pub mod upload;

pub use commands::{attachment_problem, FileCommands, UploadLimits};
pub use routes::routes;
