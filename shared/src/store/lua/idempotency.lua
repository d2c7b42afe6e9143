-- Maps an idempotency key to a session id and the request's fingerprint once.
-- KEYS: idem key   ARGV: session id, fingerprint, ttl s
-- Returns the stored "id fingerprint" (a value from before fingerprints is just the id).
local v = redis.call('GET', KEYS[1])
if v then return v end
local value = ARGV[1] .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'EX', ARGV[3])
return value
