-- Reserves an amount against one fleet-wide daily cap (an agent's or a tenant's). Each counter is
-- its own key and hash tag, so counters spread over a cluster's slots; the store reserves against the
-- agent's and the tenant's counters with one call each and gives one back if the other refuses.
-- A cap below 0 means none (the spend is still counted).
-- KEYS: the counter   ARGV: amount micro-USD, cap, expiry (Unix s): the end of the counter's day plus
-- a margin, the same for every write, so a counter never outlives it
-- Returns 0 when reserved, 1 when the cap is in the way.
local amount = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
if cap >= 0 and tonumber(redis.call('GET', KEYS[1]) or '0') + amount > cap then return 1 end
redis.call('INCRBY', KEYS[1], amount)
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return 0
