-- Extends the lease while the step runs, only if it is still ours. KEYS: lease   ARGV: token, ms
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
