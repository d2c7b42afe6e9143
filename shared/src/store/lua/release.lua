-- Gives the lease back (only our own) and notes that the successor step is in the broker. A step
-- that will be tried again records its attempt count here, under the lease: the count lives in the
-- session, never in the (forgeable) message.
-- The reservation the claim held for a model call this step never made is dropped (whoever holds
-- the lease now: no call was made under it).
-- KEYS: lease, meta, resv   ARGV: token, published step (0 for none), attempt "<step>:<n>" ('' for
-- none), reservation to drop ('' for none)
if ARGV[4] and ARGV[4] ~= '' then redis.call('HDEL', KEYS[3], ARGV[4]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[3] and ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'attempt', ARGV[3]) end
  redis.call('DEL', KEYS[1])
end
local p = tonumber(ARGV[2])
if p > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  local cur = tonumber(redis.call('HGET', KEYS[2], 'published') or '0')
  if p > cur then redis.call('HSET', KEYS[2], 'published', p) end
end
return 1
