//! The S3 store: objects in one bucket of an S3-compatible server (AWS, MinIO, s3s-fs).
//!
//! An upload holds at most one part in memory: the body fills a buffer of `S3_PART_SIZE`; a body
//! that ends first goes up as one PutObject, a longer one as a multipart upload, part by part,
//! aborted on any failure (or when the caller gives up) so nothing is left half-written.
//! Downloads are served by the server itself through presigned URLs; `get` exists for ranges and
//! for the operator's tools.

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;

use cairn_platform::settings::S3Settings;

use crate::{ByteRange, ByteStream, Object, StoreError, StoredObject};

/// The prefix every object of this store lives under.
const PREFIX: &str = "files/";

/// Objects in one bucket.
pub struct S3Store {
    client: Client,
    bucket: String,
    part_size: usize,
}

/// The message of an SDK error with its causes (the bare `Display` says only "service error").
fn describe<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    DisplayErrorContext(e).to_string()
}

fn unavailable<E: std::error::Error + 'static, R: std::fmt::Debug>(what: &str, e: &SdkError<E, R>) -> StoreError {
    StoreError::Unavailable(format!("S3 {what}: {}", describe(e)))
}

/// The HTTP status the server answered with, when it answered.
fn status<E, R: HttpStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(HttpStatus::status)
}

/// The raw response's status code, whatever the SDK's response type.
trait HttpStatus {
    fn status(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3Store {
    /// Connects and checks the bucket: a missing one is created in development and an error in
    /// production.
    pub async fn open(settings: &S3Settings, production: bool) -> Result<Self, StoreError> {
        let (Some(access_key_id), Some(secret_access_key)) = (&settings.access_key_id, &settings.secret_access_key)
        else {
            return Err(StoreError::Config(
                "the S3 store needs S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY (or S3_SECRET_ACCESS_KEY_FILE)".into(),
            ));
        };
        let credentials = Credentials::new(access_key_id, secret_access_key, None, None, "cairn-settings");
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(settings.force_path_style)
            // Bodies go up with a known length; checksums only where S3 requires them keep
            // every S3-compatible server happy (no aws-chunked trailers).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let client = Client::from_conf(config.build());
        let bucket = settings.bucket.clone();
        let part_size = usize::try_from(settings.part_size)
            .map_err(|_| StoreError::Config("S3_PART_SIZE is too large for this machine".into()))?;

        match client.head_bucket().bucket(&bucket).send().await {
            Ok(_) => {}
            Err(e) if status(&e) == Some(404) => {
                if production {
                    return Err(StoreError::Config(format!("the S3 bucket {bucket} does not exist (create it first)")));
                }
                client
                    .create_bucket()
                    .bucket(&bucket)
                    .send()
                    .await
                    .map_err(|e| StoreError::Config(format!("creating the S3 bucket {bucket}: {}", describe(&e))))?;
                tracing::info!(bucket, "created the S3 bucket (development)");
            }
            Err(e) => return Err(StoreError::Config(format!("the S3 bucket {bucket}: {}", describe(&e)))),
        }
        Ok(Self { client, bucket, part_size })
    }

    /// Stores `body` under `key`, all or nothing (see [`crate::FileStore::put`]).
    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StoreError> {
        let mut reader = PartReader { carry: Bytes::new(), ended: false, size: 0, part_size: self.part_size };
        let first = reader.fill(&mut body).await?;
        if reader.at_end(&mut body).await? {
            let size = first.len() as u64;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(S3Body::from(first))
                .send()
                .await
                .map_err(|e| unavailable("PutObject", &e))?;
            return Ok(size);
        }

        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| unavailable("CreateMultipartUpload", &e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::Unavailable("S3 CreateMultipartUpload: no upload id".into()))?
            .to_owned();
        // Aborts the upload unless completed: on an error and when the caller gives up alike.
        let pending = PendingUpload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: Some(upload_id.clone()),
        };
        match self.upload_parts(key, &upload_id, first, &mut reader, &mut body).await {
            Ok(()) => {
                pending.completed();
                Ok(reader.size)
            }
            Err(e) => {
                pending.abort().await;
                Err(e)
            }
        }
    }

    /// Sends `first` and the rest of `body` as the parts of `upload_id`, then completes it.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: Bytes,
        reader: &mut PartReader,
        body: &mut ByteStream,
    ) -> Result<(), StoreError> {
        let mut parts = Vec::new();
        let mut part = first;
        loop {
            let number = i32::try_from(parts.len() + 1)
                .map_err(|_| StoreError::Unavailable("S3: too many parts for one upload".into()))?;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(S3Body::from(part))
                .send()
                .await
                .map_err(|e| unavailable("UploadPart", &e))?;
            parts.push(
                CompletedPart::builder().set_e_tag(uploaded.e_tag().map(str::to_owned)).part_number(number).build(),
            );
            if reader.at_end(body).await? {
                break;
            }
            part = reader.fill(body).await?;
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| unavailable("CompleteMultipartUpload", &e))?;
        Ok(())
    }

    /// Reads `key` back, whole or a range (see [`crate::FileStore::get`]).
    pub async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Object, StoreError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(r) = range {
            request = request.range(format!("bytes={}-{}", r.start, r.end));
        }
        let output = match request.send().await {
            Ok(output) => output,
            Err(e) if e.code() == Some("NoSuchKey") || status(&e) == Some(404) => {
                return Err(StoreError::NotFound(key.to_owned()))
            }
            Err(e) if e.code() == Some("InvalidRange") || status(&e) == Some(416) => {
                let size = self.size_of(key).await?;
                return Err(StoreError::RangeNotSatisfiable { size });
            }
            Err(e) => return Err(unavailable("GetObject", &e)),
        };
        // "bytes <first>-<last>/<size>" for a range; the length itself for a whole object.
        let size = match output.content_range() {
            Some(content_range) => {
                content_range.rsplit('/').next().and_then(|total| total.parse::<u64>().ok()).ok_or_else(|| {
                    StoreError::Unavailable(format!("S3 GetObject: unreadable Content-Range {content_range:?}"))
                })?
            }
            None => output.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
        };
        let body = futures::stream::unfold(output.body, |mut body| async move {
            body.next().await.map(|piece| (piece.map_err(std::io::Error::other), body))
        })
        .boxed();
        Ok(Object { size, body })
    }

    async fn size_of(&self, key: &str) -> Result<u64, StoreError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(head) => Ok(head.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0)),
            Err(e) if status(&e) == Some(404) => Err(StoreError::NotFound(key.to_owned())),
            Err(e) => Err(unavailable("HeadObject", &e)),
        }
    }

    /// A GET URL signed for `ttl` that answers with the given type and disposition.
    pub async fn presigned_get(
        &self,
        key: &str,
        ttl: Duration,
        content_type: &str,
        content_disposition: &str,
    ) -> Result<String, StoreError> {
        let config = PresigningConfig::expires_in(ttl)
            .map_err(|e| StoreError::Config(format!("presigned URL lifetime: {e}")))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .response_content_type(content_type)
            .response_content_disposition(content_disposition)
            .presigned(config)
            .await
            .map_err(|e| unavailable("presigning GetObject", &e))?;
        Ok(request.uri().to_owned())
    }

    /// Removes `key`; what is not there is already removed.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchKey") => Ok(()),
            Err(e) => Err(unavailable("DeleteObject", &e)),
        }
    }

    /// Objects under `files/` last written before `before`, a page at a time; stale multipart
    /// uploads are aborted first.
    pub fn list_before(&self, before: DateTime<Utc>) -> BoxStream<'static, Result<StoredObject, StoreError>> {
        let (client, bucket) = (self.client.clone(), self.bucket.clone());
        let aborted = abort_stale_uploads(client.clone(), bucket.clone(), before);
        // One page at a time: memory stays bounded however many objects the bucket holds.
        let pages = futures::stream::unfold(Some(None::<String>), move |token| {
            let (client, bucket) = (client.clone(), bucket.clone());
            async move {
                let token = token?;
                let page =
                    client.list_objects_v2().bucket(&bucket).prefix(PREFIX).set_continuation_token(token).send().await;
                match page {
                    Err(e) => Some((Err(unavailable("ListObjectsV2", &e)), None)),
                    Ok(page) => {
                        let next = if page.is_truncated() == Some(true) {
                            page.next_continuation_token().map(|t| Some(t.to_owned()))
                        } else {
                            None
                        };
                        let objects: Vec<StoredObject> = page
                            .contents()
                            .iter()
                            .filter_map(|o| {
                                let modified = o.last_modified()?;
                                let modified = DateTime::from_timestamp(modified.secs(), modified.subsec_nanos())?;
                                Some(StoredObject { key: o.key()?.to_owned(), modified })
                            })
                            .filter(|o| o.modified < before)
                            .collect();
                        Some((Ok(objects), next))
                    }
                }
            }
        });
        futures::stream::once(aborted)
            .filter_map(|()| async { None })
            .chain(pages.flat_map(|page| match page {
                Ok(objects) => futures::stream::iter(objects.into_iter().map(Ok)).boxed(),
                Err(e) => futures::stream::once(async { Err(e) }).boxed(),
            }))
            .boxed()
    }
}

/// Aborts multipart uploads under `files/` started before `before` (a process that died mid-upload
/// leaves its parts stored, and billed, until then). A server without ListMultipartUploads
/// (s3s-fs) is passed over: its uploads cannot be listed, so none can be found stale.
async fn abort_stale_uploads(client: Client, bucket: String, before: DateTime<Utc>) {
    let listed = client.list_multipart_uploads().bucket(&bucket).prefix(PREFIX).send().await;
    let uploads = match listed {
        Ok(listed) => listed.uploads,
        Err(e) => {
            tracing::debug!(bucket, error = %describe(&e), "cannot list multipart uploads; stale ones are not aborted");
            return;
        }
    };
    for upload in uploads.unwrap_or_default() {
        let started = upload.initiated().and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()));
        let (Some(key), Some(upload_id), Some(started)) = (upload.key(), upload.upload_id(), started) else { continue };
        if started >= before {
            continue;
        }
        match client.abort_multipart_upload().bucket(&bucket).key(key).upload_id(upload_id).send().await {
            Ok(_) => tracing::info!(key, upload_id, "aborted a stale multipart upload"),
            Err(e) => tracing::warn!(key, upload_id, error = %describe(&e), "could not abort a stale multipart upload"),
        }
    }
}

/// Cuts a body into parts of `part_size` bytes, holding one part and at most one piece of the
/// body beyond it.
struct PartReader {
    /// What the last piece read held beyond the part it filled.
    carry: Bytes,
    ended: bool,
    size: u64,
    part_size: usize,
}

impl PartReader {
    /// The next part: `part_size` bytes, or fewer when the body ends first.
    async fn fill(&mut self, body: &mut ByteStream) -> Result<Bytes, StoreError> {
        let mut part = BytesMut::with_capacity(self.part_size);
        loop {
            if !self.carry.is_empty() {
                let take = self.carry.len().min(self.part_size - part.len());
                part.extend_from_slice(&self.carry.split_to(take));
            }
            if part.len() == self.part_size || self.ended {
                return Ok(part.freeze());
            }
            match body.next().await {
                Some(Ok(piece)) => {
                    self.size += piece.len() as u64;
                    self.carry = piece;
                }
                Some(Err(e)) => return Err(StoreError::Source(e)),
                None => self.ended = true,
            }
        }
    }

    /// Whether the body has nothing left (reads ahead one piece to know).
    async fn at_end(&mut self, body: &mut ByteStream) -> Result<bool, StoreError> {
        while self.carry.is_empty() && !self.ended {
            match body.next().await {
                Some(Ok(piece)) => {
                    self.size += piece.len() as u64;
                    self.carry = piece;
                }
                Some(Err(e)) => return Err(StoreError::Source(e)),
                None => self.ended = true,
            }
        }
        Ok(self.carry.is_empty() && self.ended)
    }
}

/// A multipart upload in progress: aborted when dropped before it completed.
struct PendingUpload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl PendingUpload {
    fn completed(mut self) {
        self.upload_id = None;
    }

    /// Aborts now, so that when `put` returns its error nothing of the upload is left.
    async fn abort(mut self) {
        let Some(upload_id) = self.upload_id.take() else { return };
        let request = self.client.abort_multipart_upload().bucket(&self.bucket).key(&self.key).upload_id(&upload_id);
        if let Err(e) = request.send().await {
            tracing::warn!(key = self.key, upload_id, error = %describe(&e), "could not abort a multipart upload; the sweeper will");
        }
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = self.key, upload_id, "no runtime to abort a multipart upload; the sweeper will");
            return;
        };
        let request = self.client.abort_multipart_upload().bucket(&self.bucket).key(&self.key).upload_id(&upload_id);
        let key = self.key.clone();
        runtime.spawn(async move {
            match request.send().await {
                Ok(_) => tracing::debug!(key, upload_id, "aborted an unfinished multipart upload"),
                Err(e) => tracing::warn!(key, upload_id, error = %describe(&e), "could not abort a multipart upload; the sweeper will"),
            }
        });
    }
}
