//! The HTTP edge every router shares: the envelope, the error type, extractors whose
//! rejections are the API's own errors, the request context, and the common layers.

mod context;
mod error;
mod extract;
mod layers;
pub mod limits;
mod ops;
mod response;
mod schema;

pub use context::RequestContext;
pub use error::{loggable, ApiError, ResultExt};
pub use extract::{json_from_slice, ApiJson, ApiPath, ApiQuery};
pub use layers::finish_router;
pub use ops::{metrics_router, ops_router, probes_router, OpsState, OPS_ROUTES};
pub use response::{ApiResponse, Page, PageParams};
pub use schema::{document_errors, Envelope, ErrorCode, ErrorEnvelope, ErrorObject, Meta};
