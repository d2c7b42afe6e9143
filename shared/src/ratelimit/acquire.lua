-- Takes `amount` from every limited bucket at once, or from none. ARGV[8..10]: requests, input
-- tokens, output tokens. Returns {1, 0} when granted, {0, ms} with the wait until the emptiest bucket
-- holds enough. A bucket holds "enough" for an amount above its capacity once it is full: the call
-- then goes into debt, which the refill repays, so an oversized call is slowed, never starved.
local wait = 0
for n = 1, 3 do
  local amount = tonumber(ARGV[7 + n])
  if b[n] and amount > 0 then
    local need = math.min(amount, b[n].cap)
    if b[n].level < need then wait = math.max(wait, (need - b[n].level) / b[n].per_ms) end
  end
end
if wait > 0 then return {0, math.max(1, math.ceil(wait))} end
for n = 1, 3 do
  if b[n] then b[n].level = b[n].level - tonumber(ARGV[7 + n]) end
end
save()
return {1, 0}
