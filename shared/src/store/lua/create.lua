-- Creates a session once: meta, the goal as the first message, zeroed usage.
-- KEYS: meta, msgs, usage   ARGV: goal message, then meta field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'input_tokens', 0, 'output_tokens', 0, 'cache_creation_input_tokens', 0,
  'cache_read_input_tokens', 0, 'cost_micro_usd', 0, 'model_calls', 0)
return 1
