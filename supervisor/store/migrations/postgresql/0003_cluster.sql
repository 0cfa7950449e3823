-- Cluster membership and single activation (docs/cluster.md).
-- One row per running node, renewed by one timer per node; a node whose expires_at has passed
-- is dead for everyone (times from the database's clock, never the nodes' own).
CREATE TABLE nodes (
    id           text PRIMARY KEY,              -- unique per run: host name + random suffix
    url          text NOT NULL,                 -- where the other nodes forward its sessions' requests
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    info         jsonb NOT NULL DEFAULT '{}'    -- live sessions, memory: what /admin/nodes shows
);
-- sessions.node is the owner; epoch grows by one on every claim, and every write of the session
-- names the epoch it was claimed at (fencing: a write with an older one is refused).
ALTER TABLE sessions ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
