-- Drops a reservation of a call that was certainly not billed (the API answered with an error),
-- and counts the failed attempt. KEYS: resv, trace, usage   ARGV: reservation id, trace record
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'r', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'model_errors', 1)
return redis.call('HDEL', KEYS[1], ARGV[1])
