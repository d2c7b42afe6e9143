-- Point 3 of a step: checkpoint the model's reply (its usage was reconciled just before). Fenced:
-- only while this worker holds the lease (-1 otherwise), and only if the session is still at this
-- step and in the model phase (0 otherwise), so a late commit changes nothing.
-- KEYS: meta, msgs, lease
-- ARGV: step, mode (tools|next|done), status, result, error, now ms, lease token, message count, messages...
local meta, msgs = KEYS[1], KEYS[2]
if redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= 'llm' then return 0 end
local count = tonumber(ARGV[8])
for i = 1, count do redis.call('RPUSH', msgs, ARGV[8 + i]) end
local mode = ARGV[2]
-- Retries are counted per step and phase: the tool phase starts its own count.
redis.call('HDEL', meta, 'attempt')
if mode == 'tools' then
  redis.call('HSET', meta, 'phase', 'tools', 'updated_ms', ARGV[6])
elseif mode == 'next' then
  redis.call('HSET', meta, 'step', tonumber(ARGV[1]) + 1, 'phase', 'llm', 'updated_ms', ARGV[6])
else
  redis.call('HSET', meta, 'phase', 'done', 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'updated_ms', ARGV[6])
end
return 1
