-- Creates a session once: meta, its first messages (the goal, or a fork's conversation), zeroed
-- usage.
-- KEYS: meta, msgs, usage   ARGV: n, n messages, then meta field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[1])
local fields = {}
for i = n + 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local messages = {}
for i = 2, n + 1 do messages[#messages + 1] = ARGV[i] end
redis.call('RPUSH', KEYS[2], unpack(messages))
redis.call('HSET', KEYS[3], 'input_tokens', 0, 'output_tokens', 0, 'cache_creation_input_tokens', 0,
  'cache_read_input_tokens', 0, 'cost_micro_usd', 0, 'model_calls', 0)
return 1
