-- Point 4 of a step: append the user message with every tool_result and move to the next step.
-- Fenced on the lease (-1) and on step and phase (0).
-- KEYS: meta, msgs, lease   ARGV: step, user message, now ms, lease token
local meta, msgs = KEYS[1], KEYS[2]
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= 'tools' then return 0 end
redis.call('RPUSH', msgs, ARGV[2])
redis.call('HSET', meta, 'step', tonumber(ARGV[1]) + 1, 'phase', 'llm', 'updated_ms', ARGV[3])
redis.call('HDEL', meta, 'attempt')
return 1
