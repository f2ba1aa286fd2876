//! The shapes of the command side's answers (`data` of the envelope), for the OpenAPI document.
//! The handlers build them as JSON; the schemathesis pass run by CI checks every answer against
//! these shapes, so they cannot drift apart.

#![allow(dead_code)]

use utoipa::ToSchema;
use uuid::Uuid;

/// The user a command was about.
#[derive(Debug, ToSchema)]
pub struct UserIdData {
    /// The user.
    pub user_id: Uuid,
}

/// A role granted to or revoked from a user.
#[derive(Debug, ToSchema)]
pub struct UserRoleData {
    /// The user.
    pub user_id: Uuid,
    /// The role.
    pub role: String,
}

/// A role defined or changed.
#[derive(Debug, ToSchema)]
pub struct RoleNameData {
    /// The role.
    pub name: String,
}

/// A session ended.
#[derive(Debug, ToSchema)]
pub struct SessionIdData {
    /// The session.
    pub session_id: Uuid,
}

/// A request taken, whatever it leads to.
#[derive(Debug, ToSchema)]
pub struct AcceptedData {
    /// Always `true`.
    pub accepted: bool,
}

/// An email address verified.
#[derive(Debug, ToSchema)]
pub struct EmailVerifiedData {
    /// The user.
    pub user_id: Uuid,
    /// Always `true`.
    pub email_verified: bool,
}

/// A new access token (and, for native clients, the next refresh token).
#[derive(Debug, ToSchema)]
pub struct TokensData {
    /// The EdDSA-signed JWT to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Only when asked for in the body (native clients): `<session id>.<secret>`.
    #[schema(pattern = r"^[0-9a-f-]{36}\.[A-Za-z0-9_-]+$")]
    pub refresh_token: Option<String>,
}

/// The user who signed in.
#[derive(Debug, ToSchema)]
pub struct SignedInUser {
    /// Id.
    pub id: Uuid,
    /// Email.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// Roles held.
    pub roles: Vec<String>,
    /// Permissions of those roles.
    pub permissions: Vec<String>,
    /// Whether the email is verified.
    pub email_verified: bool,
}

/// A sign-in: the tokens, the user and the new session.
#[derive(Debug, ToSchema)]
pub struct SignInData {
    /// The EdDSA-signed JWT to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Only when asked for with `refresh_token_in_body` (native clients): `<session id>.<secret>`.
    #[schema(pattern = r"^[0-9a-f-]{36}\.[A-Za-z0-9_-]+$")]
    pub refresh_token: Option<String>,
    /// The user.
    pub user: SignedInUser,
    /// The session started.
    pub session_id: Uuid,
}

/// Where to send the user to sign in with a provider.
#[derive(Debug, ToSchema)]
pub struct OAuthStartData {
    /// The provider's authorization URL, with state and PKCE challenge.
    pub authorize_url: String,
    /// The state to hand back with the code.
    pub state: String,
    /// `browser` (bound by the `cairn_oauth` cookie) or `native` (bound by the client's PKCE verifier).
    #[schema(pattern = "^(browser|native)$")]
    pub mode: String,
}

/// An operator's decision about a parked event, recorded.
#[derive(Debug, ToSchema)]
pub struct ParkedDecisionData {
    /// The projection or worker.
    pub consumer: String,
    /// The event.
    pub event_id: Uuid,
    /// Always `true`.
    pub accepted: bool,
}

/// One public key (RFC 8037, Ed25519).
#[derive(Debug, ToSchema)]
pub struct Jwk {
    /// `OKP`.
    pub kty: String,
    /// `Ed25519`.
    pub crv: String,
    /// `EdDSA`.
    pub alg: String,
    /// `sig`.
    #[schema(rename = "use")]
    pub use_: String,
    /// The key id tokens name in their header.
    pub kid: String,
    /// The public key, base64url.
    pub x: String,
}

/// The keys that verify access tokens (RFC 7517), served raw.
#[derive(Debug, ToSchema)]
pub struct Jwks {
    /// Every key that verifies.
    pub keys: Vec<Jwk>,
}

/// A room created.
#[derive(Debug, ToSchema)]
pub struct RoomData {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: Option<String>,
    /// `public` or `private`.
    #[schema(pattern = "^(public|private)$")]
    pub visibility: String,
    /// The creator.
    pub owner_id: Uuid,
    /// Always `false` for a new room.
    pub archived: bool,
}

/// The room a command was about.
#[derive(Debug, ToSchema)]
pub struct RoomIdData {
    /// The room.
    pub id: Uuid,
}

/// A membership change.
#[derive(Debug, ToSchema)]
pub struct RoomMemberData {
    /// The room.
    pub room_id: Uuid,
    /// The member.
    pub user_id: Uuid,
}

/// A message sent or edited, as readers see it.
#[derive(Debug, ToSchema)]
pub struct MessageData {
    /// The message.
    pub message: cairn_platform::rooms::MessageView,
}

/// The message a command was about.
#[derive(Debug, ToSchema)]
pub struct MessageIdData {
    /// The message.
    pub id: Uuid,
}

/// A read marker moved.
#[derive(Debug, ToSchema)]
pub struct ReadMarkerData {
    /// The room.
    pub room_id: Uuid,
    /// The last message read.
    pub message_id: Uuid,
    /// Its position, `<transaction>.<position>`.
    #[schema(example = "7421.1093")]
    pub position: String,
}

/// A file uploaded, as every reader sees it.
#[derive(Debug, ToSchema)]
pub struct FileData {
    /// The file.
    pub file: cairn_platform::files::FileView,
}

/// The file a command was about.
#[derive(Debug, ToSchema)]
pub struct FileIdData {
    /// The file.
    pub id: Uuid,
}

/// A share granted or taken back.
#[derive(Debug, ToSchema)]
pub struct FileShareData {
    /// The file.
    pub file_id: Uuid,
    /// The user it is (or was) shared with.
    pub user_id: Uuid,
}

/// A job accepted (or the one its idempotency key already named).
#[derive(Debug, ToSchema)]
pub struct JobIdData {
    /// The job.
    pub job_id: Uuid,
}

/// A job an operator retried or cancelled.
#[derive(Debug, ToSchema)]
pub struct JobStatusData {
    /// The job.
    pub job_id: Uuid,
    /// Its status now: `queued` or `cancelled`.
    pub status: String,
}

/// A schedule defined or removed.
#[derive(Debug, ToSchema)]
pub struct ScheduleNameData {
    /// The schedule.
    pub name: String,
}
