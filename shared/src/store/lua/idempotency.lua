-- Maps an idempotency key to a session id once. KEYS: idem key   ARGV: session id, ttl s
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
