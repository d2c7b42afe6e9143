-- Marks the session's budget alert as sent; 1 only for the first caller, -1 without the lease.
-- KEYS: meta, lease   ARGV: limit, lease token
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
return redis.call('HSETNX', KEYS[1], 'alerted', ARGV[1])
