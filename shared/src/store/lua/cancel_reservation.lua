-- Drops a reservation of a call that was certainly not billed (the API answered with an error).
-- KEYS: resv, trace   ARGV: reservation id, trace record
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'r', ARGV[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
