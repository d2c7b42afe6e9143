-- Holds the worst case of a model call before it is made (DESIGN §5). A crash before the call is
-- reconciled leaves the reservation open, and the next claim counts it: a billed call is never lost.
-- Fenced on the lease: -1 (and no call may be made) when this worker no longer holds it.
-- KEYS: resv, lease   ARGV: reservation id, "cost|input|output", lease token
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
