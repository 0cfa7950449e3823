-- Usage (docs/operations.md#usage): per session, and per tenant by hour and node, added to by the
-- node that runs the session's process. No foreign key to sessions: usage outlives retention.
CREATE TABLE session_usage (
    session_id         text PRIMARY KEY,
    tenant             text NOT NULL,
    node               text,
    starts             bigint NOT NULL DEFAULT 0,
    turns              bigint NOT NULL DEFAULT 0,
    messages_in        bigint NOT NULL DEFAULT 0,
    messages_out       bigint NOT NULL DEFAULT 0,
    bytes_in           bigint NOT NULL DEFAULT 0,
    bytes_out          bigint NOT NULL DEFAULT 0,
    cpu_seconds        double precision NOT NULL DEFAULT 0,
    memory_mib_seconds double precision NOT NULL DEFAULT 0,
    memory_peak_bytes  bigint NOT NULL DEFAULT 0,
    egress_bytes       bigint NOT NULL DEFAULT 0,
    egress_requests    bigint NOT NULL DEFAULT 0,
    ends               bigint NOT NULL DEFAULT 0,
    last_end_reason    text,
    updated_at         double precision NOT NULL     -- unix seconds
);
CREATE INDEX session_usage_tenant_idx ON session_usage (tenant);

CREATE TABLE tenant_usage (
    tenant             text NOT NULL,
    hour               double precision NOT NULL,       -- unix seconds of the hour's start
    node               text NOT NULL,
    starts             bigint NOT NULL DEFAULT 0,
    turns              bigint NOT NULL DEFAULT 0,
    messages_in        bigint NOT NULL DEFAULT 0,
    messages_out       bigint NOT NULL DEFAULT 0,
    bytes_in           bigint NOT NULL DEFAULT 0,
    bytes_out          bigint NOT NULL DEFAULT 0,
    cpu_seconds        double precision NOT NULL DEFAULT 0,
    memory_mib_seconds double precision NOT NULL DEFAULT 0,
    memory_peak_bytes  bigint NOT NULL DEFAULT 0,
    egress_bytes       bigint NOT NULL DEFAULT 0,
    egress_requests    bigint NOT NULL DEFAULT 0,
    ends               bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour, node)
);

CREATE TABLE tenant_usage_ends (
    tenant text NOT NULL,
    hour   double precision NOT NULL,
    node   text NOT NULL,
    reason text NOT NULL,
    count  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour, node, reason)
);
