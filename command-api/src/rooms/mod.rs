//! Rooms and messages: the command services every entry point shares (HTTP and the realtime
//! sockets' `send`), and their routes.

mod commands;
mod routes;

pub use commands::{message_id_for, message_view, CreateRoom, MessageCommands, RoomCommands, MAX_ATTACHMENTS};
pub use routes::routes;
