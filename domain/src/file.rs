//! The `File` aggregate: one stored file's facts (who owns it, what it is, where its bytes are),
//! who it is shared with, and its deletion. The bytes themselves never enter the log: they are
//! stored first, and `FileUploaded` is appended only once they are.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::FileName;

/// Who may read a file besides its owner, admins, the users it is shared with and the members of
/// rooms it is attached to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileVisibility {
    /// Nobody else (the default).
    #[default]
    Private,
    /// Every signed-in caller with `files:read` (avatars, public documents).
    Public,
}

impl FileVisibility {
    /// `private` or `public`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
        }
    }

    /// Parses `private` or `public`.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "private" => Some(Self::Private),
            "public" => Some(Self::Public),
            _ => None,
        }
    }
}

/// What happened to a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileEvent {
    /// Its bytes were stored; from now on it exists.
    FileUploaded {
        /// Who uploaded it (its owner).
        owner_id: Uuid,
        /// The original name, sanitised.
        name: String,
        /// Its size in bytes.
        size: u64,
        /// The content type sniffed from its bytes.
        content_type: String,
        /// The SHA-256 of its bytes, lowercase hex.
        sha256: String,
        /// Who else may read it.
        visibility: FileVisibility,
        /// The store holding the bytes: `local` or `s3`.
        backend: String,
        /// The bytes' key in that store.
        key: String,
    },
    /// Its owner (or an admin) let another user read it.
    FileShared {
        /// The user it is shared with.
        user_id: Uuid,
        /// Who shared it.
        by: Uuid,
    },
    /// That user may no longer read it.
    FileUnshared {
        /// The user it was shared with.
        user_id: Uuid,
        /// Who unshared it.
        by: Uuid,
    },
    /// Deleted: reads stop at once, a worker removes the bytes. Carries what the quota and the
    /// remover need, so neither reads another event.
    FileDeleted {
        /// Who deleted it.
        by: Uuid,
        /// Its owner.
        owner_id: Uuid,
        /// Its size in bytes (given back to the owner's quota).
        size: u64,
        /// The store holding the bytes.
        backend: String,
        /// The bytes' key in that store.
        key: String,
    },
}

impl DomainEvent for FileEvent {
    fn event_type(&self) -> String {
        match self {
            Self::FileUploaded { .. } => "FileUploaded",
            Self::FileShared { .. } => "FileShared",
            Self::FileUnshared { .. } => "FileUnshared",
            Self::FileDeleted { .. } => "FileDeleted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// A file as the command side sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct File {
    /// Whether FileUploaded happened.
    pub uploaded: bool,
    /// Its owner.
    pub owner_id: Uuid,
    /// Its size.
    pub size: u64,
    /// Its store.
    pub backend: String,
    /// Its key in the store.
    pub key: String,
    /// Who it is shared with.
    pub shared_with: BTreeSet<Uuid>,
    /// Whether it was deleted.
    pub deleted: bool,
}

/// Who asks, as the handler found them: their id and whether they hold admin rights over files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileActor {
    /// The caller.
    pub id: Uuid,
    /// Whether the caller is an admin (may share, unshare and delete any file).
    pub admin: bool,
}

/// What can be asked of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCommand {
    /// Record bytes already stored as this file.
    RecordUpload {
        /// The uploader.
        owner_id: Uuid,
        /// The original name, sanitised.
        name: FileName,
        /// Size in bytes.
        size: u64,
        /// Sniffed content type.
        content_type: String,
        /// SHA-256, lowercase hex.
        sha256: String,
        /// Who else may read it.
        visibility: FileVisibility,
        /// `local` or `s3`.
        backend: String,
        /// The key in the store.
        key: String,
    },
    /// Let `user_id` read it.
    Share {
        /// Who asks.
        actor: FileActor,
        /// The user to share with.
        user_id: Uuid,
        /// Whether that user exists (and is not deleted), as the handler found.
        user_exists: bool,
    },
    /// Stop letting `user_id` read it.
    Unshare {
        /// Who asks.
        actor: FileActor,
        /// The user.
        user_id: Uuid,
    },
    /// Delete it.
    Delete {
        /// Who asks.
        actor: FileActor,
    },
}

/// Why a file command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// This id was recorded already (409).
    #[error("file already recorded")]
    AlreadyUploaded,
    /// No such file, deleted, or not visible to the caller (404).
    #[error("file not found")]
    NotFound,
    /// The caller may read the file but only its owner or an admin may do this (403).
    #[error("only the file's owner or an admin may do this")]
    NotOwner,
    /// No such user to share with (404 naming the user).
    #[error("user not found")]
    UnknownUser,
    /// The owner needs no share (400).
    #[error("a file cannot be shared with its owner")]
    ShareWithOwner,
    /// Already shared with that user (409).
    #[error("the file is already shared with this user")]
    AlreadyShared,
    /// Not shared with that user (404).
    #[error("the file is not shared with this user")]
    NotShared,
}

impl Aggregate for File {
    const TYPE: &'static str = "File";
    type Command = FileCommand;
    type Event = FileEvent;
    type Error = FileError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            FileCommand::RecordUpload { owner_id, name, size, content_type, sha256, visibility, backend, key } => {
                if self.uploaded {
                    return Err(FileError::AlreadyUploaded);
                }
                FileEvent::FileUploaded {
                    owner_id,
                    name: name.into_string(),
                    size,
                    content_type,
                    sha256,
                    visibility,
                    backend,
                    key,
                }
            }
            FileCommand::Share { actor, user_id, user_exists } => {
                self.check_manager(actor)?;
                if user_id == self.owner_id {
                    return Err(FileError::ShareWithOwner);
                }
                if !user_exists {
                    return Err(FileError::UnknownUser);
                }
                if self.shared_with.contains(&user_id) {
                    return Err(FileError::AlreadyShared);
                }
                FileEvent::FileShared { user_id, by: actor.id }
            }
            FileCommand::Unshare { actor, user_id } => {
                self.check_manager(actor)?;
                if !self.shared_with.contains(&user_id) {
                    return Err(FileError::NotShared);
                }
                FileEvent::FileUnshared { user_id, by: actor.id }
            }
            FileCommand::Delete { actor } => {
                self.check_manager(actor)?;
                FileEvent::FileDeleted {
                    by: actor.id,
                    owner_id: self.owner_id,
                    size: self.size,
                    backend: self.backend.clone(),
                    key: self.key.clone(),
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            FileEvent::FileUploaded { owner_id, size, backend, key, .. } => {
                self.uploaded = true;
                self.owner_id = owner_id;
                self.size = size;
                self.backend = backend;
                self.key = key;
            }
            FileEvent::FileShared { user_id, .. } => {
                self.shared_with.insert(user_id);
            }
            FileEvent::FileUnshared { user_id, .. } => {
                self.shared_with.remove(&user_id);
            }
            FileEvent::FileDeleted { .. } => {
                self.deleted = true;
                self.shared_with.clear();
            }
        }
    }
}

impl File {
    /// Whether `user` may read the file as far as this aggregate knows (owner or shared with);
    /// room membership and visibility are the read side's to add.
    #[must_use]
    pub fn readable_by(&self, user: Uuid) -> bool {
        self.uploaded && !self.deleted && (self.owner_id == user || self.shared_with.contains(&user))
    }

    /// The owner or an admin may manage a live file; anyone else it is shared with is told no
    /// (403), everyone else that there is no such file (404).
    fn check_manager(&self, actor: FileActor) -> Result<(), FileError> {
        if !self.uploaded || self.deleted {
            return Err(FileError::NotFound);
        }
        if actor.admin || actor.id == self.owner_id {
            return Ok(());
        }
        if self.shared_with.contains(&actor.id) {
            return Err(FileError::NotOwner);
        }
        Err(FileError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type FileTest = TestFramework<File>;

    const OWNER: Uuid = Uuid::from_u128(1);
    const OTHER: Uuid = Uuid::from_u128(2);
    const ADMIN: Uuid = Uuid::from_u128(3);

    fn uploaded() -> FileEvent {
        FileEvent::FileUploaded {
            owner_id: OWNER,
            name: "a.png".into(),
            size: 10,
            content_type: "image/png".into(),
            sha256: "ab".repeat(32),
            visibility: FileVisibility::Private,
            backend: "local".into(),
            key: "files/x".into(),
        }
    }

    fn owner() -> FileActor {
        FileActor { id: OWNER, admin: false }
    }

    #[test]
    fn an_upload_is_recorded_once() {
        let record = FileCommand::RecordUpload {
            owner_id: OWNER,
            name: FileName::sanitise("a.png"),
            size: 10,
            content_type: "image/png".into(),
            sha256: "ab".repeat(32),
            visibility: FileVisibility::Private,
            backend: "local".into(),
            key: "files/x".into(),
        };
        FileTest::with(()).given_no_previous_events().when(record.clone()).then_expect_events(vec![uploaded()]);
        FileTest::with(()).given(vec![uploaded()]).when(record).then_expect_error(FileError::AlreadyUploaded);
    }

    #[test]
    fn the_owner_shares_and_unshares() {
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Share { actor: owner(), user_id: OTHER, user_exists: true })
            .then_expect_events(vec![FileEvent::FileShared { user_id: OTHER, by: OWNER }]);
        FileTest::with(())
            .given(vec![uploaded(), FileEvent::FileShared { user_id: OTHER, by: OWNER }])
            .when(FileCommand::Share { actor: owner(), user_id: OTHER, user_exists: true })
            .then_expect_error(FileError::AlreadyShared);
        FileTest::with(())
            .given(vec![uploaded(), FileEvent::FileShared { user_id: OTHER, by: OWNER }])
            .when(FileCommand::Unshare { actor: owner(), user_id: OTHER })
            .then_expect_events(vec![FileEvent::FileUnshared { user_id: OTHER, by: OWNER }]);
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Unshare { actor: owner(), user_id: OTHER })
            .then_expect_error(FileError::NotShared);
    }

    #[test]
    fn sharing_needs_a_real_user_other_than_the_owner() {
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Share { actor: owner(), user_id: OTHER, user_exists: false })
            .then_expect_error(FileError::UnknownUser);
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Share { actor: owner(), user_id: OWNER, user_exists: true })
            .then_expect_error(FileError::ShareWithOwner);
    }

    #[test]
    fn a_stranger_is_told_there_is_no_such_file_and_a_reader_that_it_is_not_theirs() {
        let stranger = FileActor { id: OTHER, admin: false };
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Delete { actor: stranger })
            .then_expect_error(FileError::NotFound);
        FileTest::with(())
            .given(vec![uploaded(), FileEvent::FileShared { user_id: OTHER, by: OWNER }])
            .when(FileCommand::Delete { actor: stranger })
            .then_expect_error(FileError::NotOwner);
    }

    #[test]
    fn deletion_carries_what_the_remover_and_the_quota_need_and_happens_once() {
        let admin = FileActor { id: ADMIN, admin: true };
        let deleted = FileEvent::FileDeleted {
            by: ADMIN,
            owner_id: OWNER,
            size: 10,
            backend: "local".into(),
            key: "files/x".into(),
        };
        FileTest::with(())
            .given(vec![uploaded()])
            .when(FileCommand::Delete { actor: admin })
            .then_expect_events(vec![deleted.clone()]);
        FileTest::with(())
            .given(vec![uploaded(), deleted])
            .when(FileCommand::Delete { actor: owner() })
            .then_expect_error(FileError::NotFound);
    }

    #[test]
    fn nothing_can_be_done_to_a_file_never_uploaded() {
        FileTest::with(())
            .given_no_previous_events()
            .when(FileCommand::Share { actor: owner(), user_id: OTHER, user_exists: true })
            .then_expect_error(FileError::NotFound);
    }
}
