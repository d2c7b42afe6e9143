-- Drops a reservation of a call that was certainly not billed (the API answered with an error),
-- and counts the failed attempt; a worst case another claim already counted for it is taken back.
-- KEYS: usage, resv, trace   ARGV: reservation id, trace record
local taken = take_reservation()
if not taken then return 0 end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'r', superseding(ARGV[2], taken))
redis.call('HINCRBY', KEYS[1], 'model_errors', 1)
return 1
