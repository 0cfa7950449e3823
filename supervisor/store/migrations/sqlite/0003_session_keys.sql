-- Session ids are per tenant (supervisor/session_keys.py): a row's id is its key, "tenant/id",
-- and the dev tenant's ("default") its bare id. Rows of other tenants get their tenant in front.
PRAGMA defer_foreign_keys = ON;
UPDATE messages SET session_id = (SELECT tenant FROM sessions WHERE sessions.id = messages.session_id) || '/' || session_id
    WHERE session_id IN (SELECT id FROM sessions WHERE tenant <> 'default');
UPDATE sessions SET id = tenant || '/' || id WHERE tenant <> 'default';
