-- Marks the session's budget alert as sent; 1 only for the first caller. KEYS: meta   ARGV: limit
return redis.call('HSETNX', KEYS[1], 'alerted', ARGV[1])
