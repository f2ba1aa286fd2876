//! The `rooms`, `room_members` and `messages` read models.
//!
//! A batch is folded in memory like [`crate::users`]: the rooms and messages it touches are read
//! with one query per table, every event is applied to them in order, and each table is written
//! with multi-row statements (one upsert for rooms, one delete and one insert for members, one
//! upsert for messages). Re-applying an event changes nothing: a room or message row only takes an
//! event above its `version`, and a membership change is taken only when its room takes the event
//! that made it (membership events are events of the room's stream).

use std::collections::HashMap;

use cairn_domain::{MessageEvent, RoomEvent};
use cairn_platform::envelope::EventEnvelope;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::Projection;

/// Projects `Room` and `Message` events into `rooms`, `room_members` and `messages`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoomsProjection;

/// One row of `rooms`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct RoomRow {
    id: Uuid,
    name: String,
    topic: Option<String>,
    visibility: String,
    owner_id: Uuid,
    archived_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

/// One row of `messages`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct MessageRow {
    id: Uuid,
    room_id: Uuid,
    author_id: Uuid,
    body: Option<String>,
    client_id: Option<String>,
    attachments: Vec<Uuid>,
    tx: i64,
    pos: i64,
    changed_tx: i64,
    changed_pos: i64,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    version: i64,
}

/// What a batch did to one membership: whether it removed it at some point (so the stored row
/// goes first), and whether it holds at the end (role and joined_at).
#[derive(Debug, Default)]
struct Membership {
    removed: bool,
    current: Option<(&'static str, DateTime<Utc>)>,
}

/// The rooms and memberships a batch changed.
#[derive(Default)]
struct RoomChanges {
    rooms: HashMap<Uuid, (RoomRow, bool)>,
    members: HashMap<(Uuid, Uuid), Membership>,
}

impl RoomChanges {
    fn join(&mut self, room: Uuid, user: Uuid, role: &'static str, at: DateTime<Utc>) {
        let m = self.members.entry((room, user)).or_default();
        // Joining twice keeps the first join (as ON CONFLICT DO NOTHING does for a stored row).
        if m.current.is_none() {
            m.current = Some((role, at));
        }
    }

    fn leave(&mut self, room: Uuid, user: Uuid) {
        let m = self.members.entry((room, user)).or_default();
        m.removed = true;
        m.current = None;
    }

    /// Applies one event of room `id`, unless its row has taken it already.
    fn apply(&mut self, id: Uuid, event: RoomEvent, sequence: i64, at: DateTime<Utc>) {
        let membership = match (self.rooms.get_mut(&id), event) {
            (None, RoomEvent::RoomCreated { name, topic, visibility, owner_id }) => {
                let row = RoomRow {
                    id,
                    name,
                    topic,
                    visibility: visibility.as_str().to_owned(),
                    owner_id,
                    archived_at: None,
                    created_at: at,
                    updated_at: at,
                    version: sequence,
                };
                self.rooms.insert(id, (row, true));
                self.join(id, owner_id, "owner", at);
                return;
            }
            // A change to a room this table never saw created: nothing to change.
            (None, _) => return,
            (Some((row, _)), _) if row.version >= sequence => return,
            (Some((row, changed)), event) => {
                *changed = true;
                row.version = sequence;
                match event {
                    // Cannot happen twice for one id (the event store's sequence forbids it).
                    RoomEvent::RoomCreated { .. } => None,
                    RoomEvent::RoomRenamed { name } => {
                        row.name = name;
                        row.updated_at = at;
                        None
                    }
                    RoomEvent::RoomTopicChanged { topic } => {
                        row.topic = topic;
                        row.updated_at = at;
                        None
                    }
                    RoomEvent::RoomArchived {} => {
                        row.archived_at = Some(at);
                        row.updated_at = at;
                        None
                    }
                    RoomEvent::MemberJoined { user_id } | RoomEvent::MemberInvited { user_id, .. } => {
                        Some((user_id, true))
                    }
                    RoomEvent::MemberLeft { user_id } | RoomEvent::MemberRemoved { user_id, .. } => {
                        Some((user_id, false))
                    }
                }
            }
        };
        match membership {
            Some((user, true)) => self.join(id, user, "member", at),
            Some((user, false)) => self.leave(id, user),
            None => {}
        }
    }
}

impl MessageRow {
    /// Applies an edit or a delete, unless the row has taken it already. Returns whether it changed.
    fn apply(&mut self, event: MessageEvent, sequence: i64, at: DateTime<Utc>, position: (i64, i64)) -> bool {
        if self.version >= sequence {
            return false;
        }
        match event {
            // Cannot happen twice for one id (the event store's sequence forbids it).
            MessageEvent::MessageSent { .. } => return false,
            MessageEvent::MessageEdited { body, .. } => {
                self.body = Some(body);
                self.edited_at = Some(at);
            }
            MessageEvent::MessageDeleted { .. } => {
                self.body = None;
                self.deleted_at = Some(at);
            }
        }
        (self.changed_tx, self.changed_pos) = position;
        self.version = sequence;
        true
    }
}

impl Projection for RoomsProjection {
    const NAME: &'static str = "rooms";
    const TABLES: &'static [&'static str] = &["rooms", "room_members", "messages"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        matches!(event.aggregate_type.as_str(), "Room" | "Message")
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        self.apply_batch(conn, schema, &[event]).await
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&EventEnvelope],
    ) -> anyhow::Result<()> {
        let mut room_events = Vec::new();
        let mut message_events = Vec::new();
        for event in events {
            let id = event.aggregate_id.parse::<Uuid>()?;
            match event.aggregate_type.as_str() {
                "Room" => {
                    room_events.push((id, event.sequence, event.recorded_at, RoomEvent::deserialize(&event.payload)?))
                }
                "Message" => {
                    let position = cairn_platform::rooms::columns(event.position());
                    let message = MessageEvent::deserialize(&event.payload)?;
                    message_events.push((id, event.sequence, event.recorded_at, position, message));
                }
                _ => {}
            }
        }
        if !room_events.is_empty() {
            apply_rooms(conn, schema, room_events).await?;
        }
        if !message_events.is_empty() {
            apply_messages(conn, schema, message_events).await?;
        }
        Ok(())
    }
}

type RoomChange = (Uuid, i64, DateTime<Utc>, RoomEvent);
type MessageChange = (Uuid, i64, DateTime<Utc>, (i64, i64), MessageEvent);

async fn apply_rooms(conn: &mut PgConnection, schema: &str, changes: Vec<RoomChange>) -> anyhow::Result<()> {
    let mut ids: Vec<Uuid> = changes.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let existing: Vec<RoomRow> = sqlx::query_as(&format!(
        "SELECT id, name, topic, visibility, owner_id, archived_at, created_at, updated_at, version \
         FROM {schema}.rooms WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut fold =
        RoomChanges { rooms: existing.into_iter().map(|r| (r.id, (r, false))).collect(), members: HashMap::new() };
    for (id, sequence, at, event) in changes {
        fold.apply(id, event, sequence, at);
    }
    write_rooms(conn, schema, fold.rooms.values().filter(|(_, changed)| *changed).map(|(row, _)| row)).await?;
    write_members(conn, schema, &fold.members).await
}

/// Upserts `rows` with one statement; a row only replaces an older version of itself.
async fn write_rooms<'a>(
    conn: &mut PgConnection,
    schema: &str,
    rows: impl Iterator<Item = &'a RoomRow>,
) -> anyhow::Result<()> {
    let (mut id, mut name, mut topic, mut visibility, mut owner) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut archived, mut created, mut updated, mut version) = (vec![], vec![], vec![], vec![]);
    for row in rows {
        id.push(row.id);
        name.push(row.name.as_str());
        topic.push(row.topic.as_deref());
        visibility.push(row.visibility.as_str());
        owner.push(row.owner_id);
        archived.push(row.archived_at);
        created.push(row.created_at);
        updated.push(row.updated_at);
        version.push(row.version);
    }
    if id.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {schema}.rooms AS t (id, name, topic, visibility, owner_id, archived_at, created_at, updated_at, version) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[], \
                              $7::timestamptz[], $8::timestamptz[], $9::int8[]) \
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, topic = EXCLUDED.topic, \
             archived_at = EXCLUDED.archived_at, updated_at = EXCLUDED.updated_at, version = EXCLUDED.version \
         WHERE t.version < EXCLUDED.version"
    ))
    .bind(&id)
    .bind(&name)
    .bind(&topic)
    .bind(&visibility)
    .bind(&owner)
    .bind(&archived)
    .bind(&created)
    .bind(&updated)
    .bind(&version)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes the memberships the batch removed, then inserts those that hold at its end: two
/// statements however many changed.
async fn write_members(
    conn: &mut PgConnection,
    schema: &str,
    members: &HashMap<(Uuid, Uuid), Membership>,
) -> anyhow::Result<()> {
    let (mut gone_room, mut gone_user) = (vec![], vec![]);
    let (mut room, mut user, mut role, mut joined) = (vec![], vec![], vec![], vec![]);
    for ((room_id, user_id), m) in members {
        if m.removed {
            gone_room.push(*room_id);
            gone_user.push(*user_id);
        }
        if let Some((r, at)) = m.current {
            room.push(*room_id);
            user.push(*user_id);
            role.push(r);
            joined.push(at);
        }
    }
    if !gone_room.is_empty() {
        sqlx::query(&format!(
            "DELETE FROM {schema}.room_members m USING unnest($1::uuid[], $2::uuid[]) AS g(room_id, user_id) \
             WHERE m.room_id = g.room_id AND m.user_id = g.user_id"
        ))
        .bind(&gone_room)
        .bind(&gone_user)
        .execute(&mut *conn)
        .await?;
    }
    if !room.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {schema}.room_members (room_id, user_id, role, joined_at) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]) \
             ON CONFLICT (room_id, user_id) DO NOTHING"
        ))
        .bind(&room)
        .bind(&user)
        .bind(&role)
        .bind(&joined)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn apply_messages(conn: &mut PgConnection, schema: &str, changes: Vec<MessageChange>) -> anyhow::Result<()> {
    let mut ids: Vec<Uuid> = changes.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let existing: Vec<MessageRow> = sqlx::query_as(&format!(
        "SELECT id, room_id, author_id, body, client_id, attachments, tx, pos, changed_tx, changed_pos, \
                created_at, edited_at, deleted_at, version \
         FROM {schema}.messages WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<Uuid, (MessageRow, bool)> = existing.into_iter().map(|r| (r.id, (r, false))).collect();
    for (id, sequence, at, position, event) in changes {
        match (rows.get_mut(&id), event) {
            (Some((row, changed)), event) => *changed |= row.apply(event, sequence, at, position),
            (None, MessageEvent::MessageSent { room_id, author_id, body, client_id, attachments }) => {
                let row = MessageRow {
                    id,
                    room_id,
                    author_id,
                    body: Some(body),
                    client_id,
                    attachments,
                    tx: position.0,
                    pos: position.1,
                    changed_tx: position.0,
                    changed_pos: position.1,
                    created_at: at,
                    edited_at: None,
                    deleted_at: None,
                    version: sequence,
                };
                rows.insert(id, (row, true));
            }
            // A change to a message this table never saw sent: nothing to change.
            (None, _) => {}
        }
    }
    write_messages(conn, schema, rows.values().filter(|(_, changed)| *changed).map(|(row, _)| row)).await
}

/// Upserts `rows` with one statement; a row only replaces an older version of itself.
async fn write_messages<'a>(
    conn: &mut PgConnection,
    schema: &str,
    rows: impl Iterator<Item = &'a MessageRow>,
) -> anyhow::Result<()> {
    let (mut id, mut room, mut author, mut body, mut client) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut attachments, mut tx, mut pos, mut ctx, mut cpos) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut created, mut edited, mut deleted, mut version) = (vec![], vec![], vec![], vec![]);
    for row in rows {
        id.push(row.id);
        room.push(row.room_id);
        author.push(row.author_id);
        body.push(row.body.as_deref());
        client.push(row.client_id.as_deref());
        // unnest flattens a two-dimensional array, so each row's list travels as JSON text.
        attachments.push(serde_json::to_string(&row.attachments)?);
        tx.push(row.tx);
        pos.push(row.pos);
        ctx.push(row.changed_tx);
        cpos.push(row.changed_pos);
        created.push(row.created_at);
        edited.push(row.edited_at);
        deleted.push(row.deleted_at);
        version.push(row.version);
    }
    if id.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {schema}.messages AS t (id, room_id, author_id, body, client_id, attachments, tx, pos, \
                                             changed_tx, changed_pos, created_at, edited_at, deleted_at, version) \
         SELECT r.id, r.room_id, r.author_id, r.body, r.client_id, \
                ARRAY(SELECT jsonb_array_elements_text(r.attachments::jsonb))::uuid[], \
                r.tx, r.pos, r.changed_tx, r.changed_pos, r.created_at, r.edited_at, r.deleted_at, r.version \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::int8[], \
                     $9::int8[], $10::int8[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::int8[]) \
              AS r(id, room_id, author_id, body, client_id, attachments, tx, pos, changed_tx, changed_pos, \
                   created_at, edited_at, deleted_at, version) \
         ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, changed_tx = EXCLUDED.changed_tx, \
             changed_pos = EXCLUDED.changed_pos, edited_at = EXCLUDED.edited_at, deleted_at = EXCLUDED.deleted_at, \
             version = EXCLUDED.version \
         WHERE t.version < EXCLUDED.version"
    ))
    .bind(&id)
    .bind(&room)
    .bind(&author)
    .bind(&body)
    .bind(&client)
    .bind(&attachments)
    .bind(&tx)
    .bind(&pos)
    .bind(&ctx)
    .bind(&cpos)
    .bind(&created)
    .bind(&edited)
    .bind(&deleted)
    .bind(&version)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cairn_domain::RoomVisibility;

    use super::*;

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap()
    }

    fn created(owner: Uuid) -> RoomEvent {
        RoomEvent::RoomCreated {
            name: "general".into(),
            topic: None,
            visibility: RoomVisibility::Public,
            owner_id: owner,
        }
    }

    #[test]
    fn a_created_room_has_its_owner_as_member_and_takes_later_events_once() {
        let (room, owner, bob) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut fold = RoomChanges::default();
        fold.apply(room, created(owner), 1, at(1));
        fold.apply(room, RoomEvent::MemberJoined { user_id: bob }, 2, at(2));
        fold.apply(room, RoomEvent::RoomRenamed { name: "random".into() }, 3, at(3));
        // Delivered again: nothing changes.
        fold.apply(room, RoomEvent::RoomRenamed { name: "stale".into() }, 3, at(9));
        fold.apply(room, RoomEvent::MemberLeft { user_id: bob }, 2, at(9));
        let (row, changed) = &fold.rooms[&room];
        assert!(changed);
        assert_eq!((row.name.as_str(), row.version, row.updated_at), ("random", 3, at(3)));
        assert_eq!(fold.members[&(room, owner)].current, Some(("owner", at(1))));
        let bob_membership = &fold.members[&(room, bob)];
        assert_eq!((bob_membership.removed, bob_membership.current), (false, Some(("member", at(2)))));
    }

    #[test]
    fn leaving_and_joining_again_in_one_batch_replaces_the_stored_membership() {
        let (room, owner, bob) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut fold = RoomChanges::default();
        fold.apply(room, created(owner), 1, at(1));
        let (row, _) = fold.rooms.remove(&room).unwrap();
        // As if read from the table: the row, and a membership stored by an earlier batch.
        let mut fold = RoomChanges { rooms: HashMap::from([(room, (row, false))]), members: HashMap::new() };
        fold.apply(room, RoomEvent::MemberLeft { user_id: bob }, 3, at(3));
        fold.apply(room, RoomEvent::MemberInvited { user_id: bob, by: owner }, 4, at(4));
        let m = &fold.members[&(room, bob)];
        assert_eq!((m.removed, m.current), (true, Some(("member", at(4)))));
        fold.apply(room, RoomEvent::MemberRemoved { user_id: bob, by: owner }, 5, at(5));
        let m = &fold.members[&(room, bob)];
        assert_eq!((m.removed, m.current), (true, None));
    }

    #[test]
    fn events_of_a_room_never_created_change_nothing() {
        let mut fold = RoomChanges::default();
        fold.apply(Uuid::new_v4(), RoomEvent::MemberJoined { user_id: Uuid::new_v4() }, 2, at(2));
        assert!(fold.rooms.is_empty() && fold.members.is_empty());
    }

    #[test]
    fn an_edit_or_delete_moves_the_change_position_once() {
        let mut row = MessageRow {
            id: Uuid::new_v4(),
            room_id: Uuid::new_v4(),
            author_id: Uuid::new_v4(),
            body: Some("hi".into()),
            client_id: None,
            attachments: vec![],
            tx: 10,
            pos: 5,
            changed_tx: 10,
            changed_pos: 5,
            created_at: at(1),
            edited_at: None,
            deleted_at: None,
            version: 1,
        };
        let room_id = row.room_id;
        assert!(row.apply(MessageEvent::MessageEdited { room_id, body: "hello".into() }, 2, at(2), (11, 7)));
        assert!(!row.apply(MessageEvent::MessageEdited { room_id, body: "stale".into() }, 2, at(2), (11, 7)));
        assert_eq!(
            (row.body.as_deref(), row.edited_at, row.changed_tx, row.changed_pos),
            (Some("hello"), Some(at(2)), 11, 7)
        );
        assert!(row.apply(MessageEvent::MessageDeleted { room_id, by: row.author_id }, 3, at(3), (12, 9)));
        assert_eq!((row.body.as_deref(), row.deleted_at, (row.tx, row.pos)), (None, Some(at(3)), (10, 5)));
    }
}
