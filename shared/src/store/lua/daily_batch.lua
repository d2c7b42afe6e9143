-- One fleet-wide daily spend counter (an agent's or a tenant's), for a batch of a worker's steps at
-- once (see store/daily.rs: a worker may take an allowance beyond what a call needs, and reserves
-- its next calls from it without a round trip).
-- The counter reads as spent plus held (reservations of calls in flight and unspent allowances);
-- its companion key counts the held part alone, so that a refusal can say whether the cap is spent
-- or only held: held room comes back within seconds, spent room does not.
-- First the net corrections (a counter only changes while it exists): the counter by the change of
-- spent plus held, the held part by that change minus what was newly spent. Then each reservation,
-- in order: refused if it would cross its cap (a cap below 0 means none: the spend is still
-- counted), else taken, with as much of the allowance asked for as keeps the counter under 7/8 of
-- the cap, and no more than half the room left there.
-- KEYS: the counter, its held part   ARGV: expiry (Unix s: the end of the counter's day plus a
--   margin, the same for every write, so neither key outlives it), correction micro-USD (may be
--   negative), micro-USD newly spent, then per reservation: amount micro-USD, cap, allowance asked for
-- Returns per reservation the allowance granted with it (0 or more); -1 when refused with the cap
-- spent, -2 when refused only because of what is held.
local key, heldkey, expiry = KEYS[1], KEYS[2], ARGV[1]
local delta, spent = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', key) == 1 then
  if delta ~= 0 then redis.call('INCRBY', key, delta) end
  if delta - spent ~= 0 and redis.call('EXISTS', heldkey) == 1 then redis.call('INCRBY', heldkey, delta - spent) end
  redis.call('EXPIREAT', key, expiry)
  redis.call('EXPIREAT', heldkey, expiry)
end
local level = tonumber(redis.call('GET', key) or '0')
-- A held part out of step with its counter (an older counter without one) reads as nothing held.
local held = math.min(math.max(tonumber(redis.call('GET', heldkey) or '0'), 0), level)
local out, taken = {}, 0
for i = 4, #ARGV - 2, 3 do
  local amount, cap, chunk = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local after = level + taken + amount
  if cap >= 0 and after > cap then
    if level - held + amount <= cap then out[#out + 1] = -2 else out[#out + 1] = -1 end
  else
    local grant = chunk
    if cap >= 0 then grant = math.max(0, math.min(chunk, math.floor((cap * 7 / 8 - after) / 2))) end
    taken = taken + amount + grant
    out[#out + 1] = grant
  end
end
if taken > 0 then
  redis.call('INCRBY', key, taken)
  redis.call('INCRBY', heldkey, taken)
  redis.call('EXPIREAT', key, expiry)
  redis.call('EXPIREAT', heldkey, expiry)
end
return out
