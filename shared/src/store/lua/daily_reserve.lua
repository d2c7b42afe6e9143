-- Reserves an amount against the fleet-wide daily caps of an agent and a tenant, atomically.
-- Both keys share the `{budget}` hash tag. A cap below 0 means none (the spend is still counted).
-- KEYS: agent day, tenant day   ARGV: amount micro-USD, agent cap, tenant cap, expiry (Unix s): the
-- end of the counter's day plus a margin, the same for every write, so a counter never outlives it
-- Returns 0 when reserved, 1 when the agent's cap is in the way, 2 for the tenant's.
local amount = tonumber(ARGV[1])
for i = 1, 2 do
  local cap = tonumber(ARGV[i + 1])
  if cap >= 0 and tonumber(redis.call('GET', KEYS[i]) or '0') + amount > cap then return i end
end
for i = 1, 2 do
  redis.call('INCRBY', KEYS[i], amount)
  redis.call('EXPIREAT', KEYS[i], ARGV[4])
end
return 0
