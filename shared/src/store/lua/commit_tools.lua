-- Point 4 of a step: append the user message with every tool_result and move to the next step.
-- Fenced on step and phase. KEYS: meta, msgs   ARGV: step, user message, now ms
local meta, msgs = KEYS[1], KEYS[2]
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= 'tools' then return 0 end
redis.call('RPUSH', msgs, ARGV[2])
redis.call('HSET', meta, 'step', tonumber(ARGV[1]) + 1, 'phase', 'llm', 'updated_ms', ARGV[3])
return 1
