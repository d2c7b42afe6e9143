-- Records one tool call's outcome in the ledger at once, the first write wins, and traces it.
-- KEYS: ledger, trace   ARGV: tool_use_id, outcome JSON, trace record
local first = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'r', ARGV[3])
return first
