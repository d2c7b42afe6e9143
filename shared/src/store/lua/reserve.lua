-- Holds the worst case of a model call before it is made (DESIGN §5). A crash before the call is
-- reconciled leaves the reservation open, and the next claim counts it: a billed call is never lost.
-- KEYS: resv   ARGV: reservation id, "cost|input|output"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
