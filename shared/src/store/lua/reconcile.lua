-- Replaces a call's reservation with its actual usage, once, and traces the call. Not fenced: the
-- call was billed whatever happened to the step since. A reservation another claim already counted
-- at its worst case (the worker was paused past its lease) is corrected to the actual usage.
-- KEYS: usage, resv, trace
-- ARGV: reservation id, input, output, cache write, cache read tokens, cost micro-USD, trace record
local taken = take_reservation()
if not taken then return {} end
redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'cache_creation_input_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'cache_read_input_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'cost_micro_usd', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'model_calls', 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'r', superseding(ARGV[7], taken))
return redis.call('HGETALL', KEYS[1])
