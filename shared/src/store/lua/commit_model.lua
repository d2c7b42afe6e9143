-- Point 3 of a step: checkpoint the model's reply (its usage was reconciled just before). Fenced:
-- only if the session is still at this step and in the model phase, so a late commit changes nothing.
-- KEYS: meta, msgs
-- ARGV: step, mode (tools|next|done), status, result, error, now ms, message count, messages...
local meta, msgs = KEYS[1], KEYS[2]
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= 'llm' then return 0 end
local count = tonumber(ARGV[7])
for i = 1, count do redis.call('RPUSH', msgs, ARGV[7 + i]) end
local mode = ARGV[2]
if mode == 'tools' then
  redis.call('HSET', meta, 'phase', 'tools', 'updated_ms', ARGV[6])
elseif mode == 'next' then
  redis.call('HSET', meta, 'step', tonumber(ARGV[1]) + 1, 'phase', 'llm', 'updated_ms', ARGV[6])
else
  redis.call('HSET', meta, 'phase', 'done', 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'updated_ms', ARGV[6])
end
return 1
