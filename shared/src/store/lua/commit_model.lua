-- Point 3 of a step: record the model call. Fenced: only if the session is still at this step and
-- in the model phase, so a second worker's late commit changes nothing.
-- KEYS: meta, msgs, usage, trace
-- ARGV: step, mode (tools|next|done), status, result, error, now ms, trace record,
--       input, output, cache write, cache read tokens, cost micro-USD, message count, messages...
local meta, msgs, usage, trace = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= 'llm' then return 0 end
local count = tonumber(ARGV[13])
for i = 1, count do redis.call('RPUSH', msgs, ARGV[13 + i]) end
redis.call('HINCRBY', usage, 'input_tokens', ARGV[8])
redis.call('HINCRBY', usage, 'output_tokens', ARGV[9])
redis.call('HINCRBY', usage, 'cache_creation_input_tokens', ARGV[10])
redis.call('HINCRBY', usage, 'cache_read_input_tokens', ARGV[11])
redis.call('HINCRBY', usage, 'cost_micro_usd', ARGV[12])
redis.call('HINCRBY', usage, 'model_calls', 1)
local mode = ARGV[2]
if mode == 'tools' then
  redis.call('HSET', meta, 'phase', 'tools', 'updated_ms', ARGV[6])
elseif mode == 'next' then
  redis.call('HSET', meta, 'step', tonumber(ARGV[1]) + 1, 'phase', 'llm', 'updated_ms', ARGV[6])
else
  redis.call('HSET', meta, 'phase', 'done', 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'updated_ms', ARGV[6])
end
redis.call('XADD', trace, 'MAXLEN', '~', 10000, '*', 'r', ARGV[7])
return 1
