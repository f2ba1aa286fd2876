-- Files. The `files` and `file_shares` tables are read models written only by the `files`
-- projection (rebuilt from the log like every projection). `file_uploads` and `file_quota` are
-- the command side's own: uploads whose bytes are being stored, and each owner's bytes stored
-- and reserved, kept exact by a trigger on the log itself so that the quota is decided in the
-- same transaction as the append.

CREATE TABLE files (
    id           uuid        PRIMARY KEY,
    owner_id     uuid        NOT NULL,
    name         text        NOT NULL,
    size         bigint      NOT NULL CHECK (size >= 0),
    content_type text        NOT NULL,
    sha256       text        NOT NULL,
    visibility   text        NOT NULL CHECK (visibility IN ('private', 'public')),
    backend      text        NOT NULL CHECK (backend IN ('local', 's3')),
    storage_key  text        NOT NULL,
    -- The FileUploaded event's global position: the order of lists and their cursor.
    position     bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    deleted_at   timestamptz,
    version      bigint      NOT NULL
);
CREATE INDEX files_owner_order ON files (owner_id, position DESC) WHERE deleted_at IS NULL;

CREATE TABLE file_shares (
    file_id   uuid        NOT NULL,
    user_id   uuid        NOT NULL,
    shared_by uuid        NOT NULL,
    shared_at timestamptz NOT NULL,
    -- The FileShared event's global position: the order of "shared with me" and its cursor.
    position  bigint      NOT NULL,
    PRIMARY KEY (file_id, user_id)
);
CREATE INDEX file_shares_user_order ON file_shares (user_id, position DESC);

-- "Is this file attached to a message in a room the caller belongs to" is one index probe.
CREATE INDEX messages_attachments ON messages USING gin (attachments) WHERE deleted_at IS NULL;

-- An upload in flight: registered before the first byte is stored, gone in the transaction that
-- appends its FileUploaded (the trigger below), which refuses a FileUploaded without one. A row
-- older than the sweeper's grace period is an upload that died: its bytes are removed and its
-- reservation given back.
CREATE TABLE file_uploads (
    file_id        uuid        PRIMARY KEY,
    owner_id       uuid        NOT NULL,
    backend        text        NOT NULL,
    storage_key    text        NOT NULL,
    reserved_bytes bigint      NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    started_at     timestamptz NOT NULL
);
CREATE INDEX file_uploads_started ON file_uploads (started_at);

-- Each owner's quota use. An upload reserves bytes as they stream in, with one conditional
-- UPDATE (`stored + reserved + n <= quota`) whose row lock orders concurrent uploads, so together
-- they can never overshoot; appending FileUploaded turns the reservation into stored bytes and
-- FileDeleted gives them back, both here, in the append's own transaction.
CREATE TABLE file_quota (
    owner_id       uuid   PRIMARY KEY,
    stored_bytes   bigint NOT NULL DEFAULT 0 CHECK (stored_bytes >= 0),
    reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0)
);

CREATE FUNCTION files_account_quota() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    reserved bigint;
BEGIN
    IF NEW.event_type = 'FileUploaded' THEN
        DELETE FROM file_uploads WHERE file_id = NEW.aggregate_id::uuid
            RETURNING reserved_bytes INTO reserved;
        -- No row: the sweeper gave this upload up (it stalled past the grace period) and removed
        -- its bytes, so the file must not be recorded; the append fails and the upload with it.
        IF NOT FOUND THEN
            RAISE EXCEPTION 'file % is not an upload in flight (given up by the sweeper?)', NEW.aggregate_id
                USING ERRCODE = 'P0002';
        END IF;
        INSERT INTO file_quota AS q (owner_id, stored_bytes)
            VALUES ((NEW.payload -> 'FileUploaded' ->> 'owner_id')::uuid,
                    (NEW.payload -> 'FileUploaded' ->> 'size')::bigint)
            ON CONFLICT (owner_id) DO UPDATE
                SET stored_bytes = q.stored_bytes + EXCLUDED.stored_bytes,
                    reserved_bytes = greatest(q.reserved_bytes - coalesce(reserved, 0), 0);
    ELSIF NEW.event_type = 'FileDeleted' THEN
        UPDATE file_quota
            SET stored_bytes = greatest(stored_bytes - (NEW.payload -> 'FileDeleted' ->> 'size')::bigint, 0)
            WHERE owner_id = (NEW.payload -> 'FileDeleted' ->> 'owner_id')::uuid;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_file_quota AFTER INSERT ON events
    FOR EACH ROW WHEN (NEW.aggregate_type = 'File') EXECUTE FUNCTION files_account_quota();
