//! The file command service: the one path by which files are uploaded, shared, unshared and
//! deleted (the `File` aggregate), and the check that a message's attachments are files its
//! sender may attach.

use std::sync::Arc;
use std::time::Duration;

use cairn_domain::{File, FileActor, FileCommand, FileError, User, UserStatus};
use cairn_platform::auth::{Caller, SessionVersions};
use cairn_platform::clock::SharedClock;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_platform::settings::FilesSettings;
use cairn_relay::RelayWakeup;
use cairn_storage::FileStore;
use sqlx::PgPool;
use uuid::Uuid;

use crate::executor::{Executor, Refusal};

/// What uploads are held to (`CAIRN_MAX_UPLOAD_BYTES`, `CAIRN_USER_QUOTA_BYTES`,
/// `CAIRN_FILES_ALLOWED_TYPES`, `CAIRN_FAULT_UPLOAD_PAUSE_MS`).
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// The largest file, in bytes.
    pub max_upload_bytes: u64,
    /// The bytes each owner may keep stored.
    pub quota_bytes: u64,
    /// The content types a file may have.
    pub allowed_types: Arc<Vec<String>>,
    /// A test knob: how long a stored upload waits before its FileUploaded is appended.
    pub fault_pause: Duration,
    /// How long the body may send nothing before the upload is given up
    /// (`CAIRN_REQUEST_TIMEOUT_SECS`: an upload as a whole takes as long as its bytes take).
    pub body_idle: Duration,
}

impl UploadLimits {
    /// The limits `settings` give.
    #[must_use]
    pub fn from_settings(settings: &FilesSettings, body_idle: Duration) -> Self {
        Self {
            body_idle,
            max_upload_bytes: settings.max_upload_bytes,
            quota_bytes: settings.user_quota_bytes,
            allowed_types: Arc::new(settings.allowed_types.clone()),
            fault_pause: settings.fault_upload_pause,
        }
    }

    /// The request body the upload route accepts: the largest file and its multipart framing.
    #[must_use]
    pub fn body_limit(&self) -> usize {
        usize::try_from(self.max_upload_bytes.saturating_add(super::upload::MULTIPART_OVERHEAD)).unwrap_or(usize::MAX)
    }
}

/// Executes file commands.
#[derive(Clone)]
pub struct FileCommands {
    pub(super) files: Executor<File>,
    users: Executor<User>,
    pub(super) store: FileStore,
    pub(super) pool: PgPool,
    pub(super) limits: UploadLimits,
    pub(super) clock: SharedClock,
}

/// The caller as the file rules see it.
fn actor(caller: &Caller) -> FileActor {
    FileActor { id: caller.id(), admin: caller.is_admin() }
}

impl FileCommands {
    /// A service over `pool` storing bytes in `store`.
    #[must_use]
    pub fn new(
        pool: PgPool,
        sessions: SessionVersions,
        wake: RelayWakeup,
        store: FileStore,
        limits: UploadLimits,
        clock: SharedClock,
    ) -> Self {
        Self {
            files: Executor::new(pool.clone(), sessions.clone(), wake.clone()),
            users: Executor::new(pool.clone(), sessions, wake),
            store,
            pool,
            limits,
            clock,
        }
    }

    /// What uploads are held to.
    #[must_use]
    pub fn limits(&self) -> &UploadLimits {
        &self.limits
    }

    async fn execute(
        &self,
        id: Uuid,
        command: FileCommand,
        caller: &Caller,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        self.files.execute(&id.to_string(), command, ctx, Some(caller.id())).await
    }

    /// Lets `user_id` read file `id` (FileShared). Needs `files:write`, and the owner or an admin;
    /// the user must be active.
    ///
    /// # Errors
    /// NOT_FOUND (the file, or the user); FORBIDDEN (a reader who is not the owner);
    /// VALIDATION_FAILED (the owner); CONFLICT (shared already).
    pub async fn share(
        &self,
        caller: &Caller,
        id: Uuid,
        user_id: Uuid,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        caller.require("files:write")?;
        let user = self.users.load(&user_id.to_string()).await?;
        let command =
            FileCommand::Share { actor: actor(caller), user_id, user_exists: user.status == UserStatus::Active };
        self.execute(id, command, caller, ctx).await
    }

    /// Stops letting `user_id` read file `id` (FileUnshared). Needs `files:write`, and the owner
    /// or an admin.
    ///
    /// # Errors
    /// NOT_FOUND (the file, or no such share); FORBIDDEN.
    pub async fn unshare(
        &self,
        caller: &Caller,
        id: Uuid,
        user_id: Uuid,
        ctx: &RequestContext,
    ) -> Result<ConsistencyToken, ApiError> {
        caller.require("files:write")?;
        self.execute(id, FileCommand::Unshare { actor: actor(caller), user_id }, caller, ctx).await
    }

    /// Deletes file `id` (FileDeleted): reads stop at once; a worker removes the bytes. Needs
    /// `files:write`, and the owner or an admin.
    ///
    /// # Errors
    /// NOT_FOUND (also once deleted); FORBIDDEN.
    pub async fn delete(&self, caller: &Caller, id: Uuid, ctx: &RequestContext) -> Result<ConsistencyToken, ApiError> {
        caller.require("files:write")?;
        self.execute(id, FileCommand::Delete { actor: actor(caller) }, caller, ctx).await
    }
}

/// Whether `author` may attach each of `ids` to a message: each must be a live file of theirs,
/// read from the `File` aggregate (always current, so a file uploaded a moment ago can be
/// attached at once). `Some(problem)` names the first one that may not be.
///
/// # Errors
/// When Postgres fails.
pub async fn attachment_problem(
    files: &Executor<File>,
    author: Uuid,
    ids: &[Uuid],
) -> Result<Option<String>, ApiError> {
    for (n, id) in ids.iter().enumerate() {
        if ids[..n].contains(id) {
            return Ok(Some(format!("file {id} is attached twice")));
        }
    }
    for id in ids {
        let file = files.load(&id.to_string()).await?;
        // Someone else's file and no file at all get the same answer: the id tells nothing.
        if !file.uploaded || file.deleted || file.owner_id != author {
            return Ok(Some(format!("file {id} is not a file of yours")));
        }
    }
    Ok(None)
}

impl Refusal for FileError {
    fn to_api(&self) -> ApiError {
        match self {
            Self::NotFound | Self::NotShared | Self::UnknownUser => ApiError::NotFound(self.to_string()),
            Self::NotOwner => ApiError::Forbidden(self.to_string()),
            Self::ShareWithOwner => ApiError::field("user_id", self.to_string()),
            Self::AlreadyUploaded | Self::AlreadyShared => ApiError::Conflict(self.to_string()),
        }
    }
}
