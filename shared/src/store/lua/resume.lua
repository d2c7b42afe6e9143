-- Resumes a session that waits for people: a human's reply, an approval or a rejection.
-- KEYS: meta, ledger
-- ARGV: expected status, tool_use_id, tool result JSON ('' for none), approve ('1'/'0'), now ms
-- Returns {1, step, phase} when resumed, {0, status} when the session was not waiting so.
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= ARGV[1] then return {0, st or ''} end
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) end
if ARGV[4] == '1' then
  local approved = redis.call('HGET', KEYS[1], 'approved') or ''
  redis.call('HSET', KEYS[1], 'approved', approved .. ' ' .. ARGV[2])
end
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_ms', ARGV[5])
redis.call('HDEL', KEYS[1], 'escalation')
local f = redis.call('HMGET', KEYS[1], 'step', 'phase')
return {1, f[1], f[2]}
