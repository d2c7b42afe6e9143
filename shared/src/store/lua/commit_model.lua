-- Point 3 of a step: reconcile the model call's usage and checkpoint its reply, in one round trip.
-- The reconciliation comes first and is not fenced: the call was billed whatever happened to the
-- step since (see orphan.lua, prepended). The checkpoint is fenced: only while this worker holds the
-- lease (-1 otherwise), and only if the session is still at this step and in the model phase (0
-- otherwise), so a late commit changes nothing.
-- KEYS: usage, resv, trace, meta, msgs, lease
-- ARGV: reservation id, input, output, cache write, cache read tokens, cost micro-USD, trace record,
--   step, mode (tools|next|done), status, result, error, now ms, lease token, the next step's planned
--   reservation ('' for none), message count, messages...
-- Returns {checkpoint (-1|0|1), usage totals after the call (empty when it was already counted)}.
local totals = reconcile() or {}
local meta, msgs, step = KEYS[4], KEYS[5], tonumber(ARGV[8])
if redis.call('GET', KEYS[6]) ~= ARGV[14] then return {-1, totals} end
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= step or f[2] ~= 'llm' then return {0, totals} end
local count = tonumber(ARGV[16])
for i = 1, count do redis.call('RPUSH', msgs, ARGV[16 + i]) end
local mode = ARGV[9]
-- Retries are counted per step and phase: the tool phase starts its own count.
redis.call('HDEL', meta, 'attempt')
if mode == 'tools' then
  redis.call('HSET', meta, 'phase', 'tools', 'updated_ms', ARGV[13])
elseif mode == 'next' then
  redis.call('HSET', meta, 'step', step + 1, 'phase', 'llm', 'updated_ms', ARGV[13])
  if ARGV[15] ~= '' then redis.call('HSET', meta, 'resv_next', (step + 1) .. '|' .. ARGV[15]) end
else
  redis.call('HSET', meta, 'phase', 'done', 'status', ARGV[10], 'result', ARGV[11], 'error', ARGV[12],
    'updated_ms', ARGV[13])
end
return {1, totals}
