//! The rooms read models: the rooms a caller may read (with their unread count and last
//! message), a room's members, and its messages in the log's order.

mod routes;
mod store;

pub use routes::routes;
pub use store::{MemberView, Reader, RoomView, UNREAD_CAP};
