-- Records one tool call's outcome in the ledger at once, the first write wins, and traces it.
-- Fenced on the lease: -1 when this worker no longer holds it (the next holder runs the call again,
-- under the same idempotency key).
-- KEYS: ledger, trace, lease   ARGV: tool_use_id, outcome JSON, trace record, lease token
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
local first = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'r', ARGV[3])
return first
