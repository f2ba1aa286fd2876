-- The auditors' filters of the log (`GET /api/v1/audit/events` and its export), each served by an
-- index. Every index ends in the log position (transaction_id, global_position), so one page of
-- a filter, oldest first after a cursor, is one ordered range scan of its index, never a sort of
-- everything the filter matches. Four indexes, one per equality filter; a combination uses the
-- most selective one and checks the others on the rows it reads. Position and time need none:
-- positions use events_relay_order, times map to positions through audit_leaves_log_time.
-- Each costs every append one index insertion; nothing else reads them.

-- aggregate_id alone or with any other filter (an aggregate has few events).
CREATE INDEX events_audit_aggregate ON events (aggregate_id, transaction_id, global_position);
-- aggregate_type alone (the primary key starts with it but is ordered by aggregate, not position).
CREATE INDEX events_audit_aggregate_type ON events (aggregate_type, transaction_id, global_position);
-- event_type.
CREATE INDEX events_audit_event_type ON events (event_type, transaction_id, global_position);
-- metadata.actor_id: who caused it.
CREATE INDEX events_audit_actor ON events ((metadata ->> 'actor_id'), transaction_id, global_position);
