-- Rooms, their members and their messages: read models written only by the `rooms` projection
-- (rebuilt from the log like every projection), and the read markers, written directly by the
-- command side (they are per-user reading state, like typing, and never enter the log).

CREATE TABLE rooms (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    topic       text,
    visibility  text        NOT NULL CHECK (visibility IN ('public', 'private')),
    owner_id    uuid        NOT NULL,
    archived_at timestamptz,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     bigint      NOT NULL
);
CREATE INDEX rooms_created_order ON rooms (created_at DESC, id DESC);
CREATE INDEX rooms_public_order ON rooms (created_at DESC, id DESC) WHERE visibility = 'public';

CREATE TABLE room_members (
    room_id   uuid        NOT NULL,
    user_id   uuid        NOT NULL,
    role      text        NOT NULL CHECK (role IN ('owner', 'member')),
    joined_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id, room_id);

-- One row per message. (tx, pos) is the MessageSent event's place in the log's one order
-- (transaction id, global position): the order every consumer and every socket sees, so a
-- position a client saw live is the position it asks to resume after. changed_tx/changed_pos
-- is the last event that changed the row (sent, edited, deleted), for replaying changes.
CREATE TABLE messages (
    id          uuid        PRIMARY KEY,
    room_id     uuid        NOT NULL,
    author_id   uuid        NOT NULL,
    body        text,                     -- NULL once deleted (the event keeps it)
    client_id   text,
    attachments uuid[]      NOT NULL DEFAULT '{}',
    tx          bigint      NOT NULL,
    pos         bigint      NOT NULL,
    changed_tx  bigint      NOT NULL,
    changed_pos bigint      NOT NULL,
    created_at  timestamptz NOT NULL,
    edited_at   timestamptz,
    deleted_at  timestamptz,
    version     bigint      NOT NULL
);
CREATE UNIQUE INDEX messages_room_order ON messages (room_id, tx, pos);
CREATE INDEX messages_room_changes ON messages (room_id, changed_tx, changed_pos);

-- Where each member has read up to in a room: a message's position, moved forward only.
CREATE TABLE room_read_markers (
    user_id    uuid        NOT NULL,
    room_id    uuid        NOT NULL,
    message_id uuid        NOT NULL,
    tx         bigint      NOT NULL,
    pos        bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, room_id)
);
