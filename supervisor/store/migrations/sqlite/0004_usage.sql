-- Usage (docs/operations.md#usage): per session, and per tenant by hour and node, added to by the
-- node that runs the session's process. No foreign key to sessions: usage outlives retention.
CREATE TABLE session_usage (
    session_id         TEXT PRIMARY KEY,
    tenant             TEXT NOT NULL,
    node               TEXT,
    starts             INTEGER NOT NULL DEFAULT 0,
    turns              INTEGER NOT NULL DEFAULT 0,
    messages_in        INTEGER NOT NULL DEFAULT 0,
    messages_out       INTEGER NOT NULL DEFAULT 0,
    bytes_in           INTEGER NOT NULL DEFAULT 0,
    bytes_out          INTEGER NOT NULL DEFAULT 0,
    cpu_seconds        REAL NOT NULL DEFAULT 0,
    memory_mib_seconds REAL NOT NULL DEFAULT 0,
    memory_peak_bytes  INTEGER NOT NULL DEFAULT 0,
    egress_bytes       INTEGER NOT NULL DEFAULT 0,
    egress_requests    INTEGER NOT NULL DEFAULT 0,
    ends               INTEGER NOT NULL DEFAULT 0,
    last_end_reason    TEXT,
    updated_at         REAL NOT NULL
);
CREATE INDEX session_usage_tenant_idx ON session_usage (tenant);

CREATE TABLE tenant_usage (
    tenant             TEXT NOT NULL,
    hour               REAL NOT NULL,             -- unix seconds of the hour's start
    node               TEXT NOT NULL,
    starts             INTEGER NOT NULL DEFAULT 0,
    turns              INTEGER NOT NULL DEFAULT 0,
    messages_in        INTEGER NOT NULL DEFAULT 0,
    messages_out       INTEGER NOT NULL DEFAULT 0,
    bytes_in           INTEGER NOT NULL DEFAULT 0,
    bytes_out          INTEGER NOT NULL DEFAULT 0,
    cpu_seconds        REAL NOT NULL DEFAULT 0,
    memory_mib_seconds REAL NOT NULL DEFAULT 0,
    memory_peak_bytes  INTEGER NOT NULL DEFAULT 0,
    egress_bytes       INTEGER NOT NULL DEFAULT 0,
    egress_requests    INTEGER NOT NULL DEFAULT 0,
    ends               INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour, node)
);

CREATE TABLE tenant_usage_ends (
    tenant TEXT NOT NULL,
    hour   REAL NOT NULL,
    node   TEXT NOT NULL,
    reason TEXT NOT NULL,
    count  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour, node, reason)
);
