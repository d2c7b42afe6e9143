-- Takes `amount` from every limited bucket at once, or from none. ARGV[9..11]: requests, input
-- tokens, output tokens (the adaptive bucket, when there is one, counts requests); ARGV[12]: grants
-- made elsewhere, only counted. Returns {1, 0, a}
-- when granted, {0, ms, a} with the wait until the emptiest bucket holds enough; `a` is 1 while an
-- adaptive bucket exists (the provider is being slowed down), 0 otherwise. A bucket holds
-- "enough" for an amount above its capacity once it is full: the call then goes into debt, which
-- the refill repays, so an oversized call is slowed, never starved.
local amounts = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[9])}
local wait = 0
for n = 1, 4 do
  if b[n] and amounts[n] > 0 then
    local need = math.min(amounts[n], b[n].cap)
    if b[n].level < need then wait = math.max(wait, (need - b[n].level) / b[n].per_ms) end
  end
end
local slowed = b[4] and 1 or 0
if wait > 0 then return {0, math.max(1, math.ceil(wait)), slowed} end
for n = 1, 4 do
  if b[n] then b[n].level = b[n].level - amounts[n] end
end
save(true)
return {1, 0, slowed}
