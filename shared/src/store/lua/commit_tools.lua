-- Point 4 of a step: record the tool results not yet in the ledger (the first write wins) with their
-- trace records, append the user message with every tool_result and move to the next step, with the
-- next step's planned reservation (claim.lua holds it). Fenced on the lease (-1) and on step and
-- phase (0).
-- KEYS: meta, msgs, lease, ledger, trace
-- ARGV: step, user message, now ms, lease token, the next step's planned reservation ('' for none),
--   result count, then per result: tool_use_id, outcome JSON, trace record
local meta, msgs = KEYS[1], KEYS[2]
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
local f = redis.call('HMGET', meta, 'step', 'phase')
local step = tonumber(ARGV[1])
if tonumber(f[1]) ~= step or f[2] ~= 'tools' then return 0 end
for i = 0, tonumber(ARGV[6]) - 1 do
  local at = 7 + 3 * i
  redis.call('HSETNX', KEYS[4], ARGV[at], ARGV[at + 1])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'r', ARGV[at + 2])
end
redis.call('RPUSH', msgs, ARGV[2])
redis.call('HSET', meta, 'step', step + 1, 'phase', 'llm', 'updated_ms', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', meta, 'resv_next', (step + 1) .. '|' .. ARGV[5]) end
redis.call('HDEL', meta, 'attempt')
return 1
