-- Shared prelude of the rate-limit scripts (Rust prepends it to each): loads and refills the token
-- buckets of one provider+model. Hash fields: r, i, o (levels of the request, input-token and
-- output-token buckets; a missing level is a full bucket; a level may be negative: debt) and ts (the
-- latest time the buckets were refilled to, Unix ms from the callers).
-- KEYS: rate   ARGV[1]: now ms; ARGV[2..7]: per-minute rate and capacity of r, i, o (rate 0 =
-- unlimited, no bucket); the operation's own arguments start at ARGV[8].
local key = KEYS[1]
local now = tonumber(ARGV[1])
local names = {'r', 'i', 'o'}
local stored = redis.call('HMGET', key, 'ts', 'r', 'i', 'o')
local ts = tonumber(stored[1]) or now
-- A caller whose clock is behind the latest one refills nothing and never moves time back.
local elapsed = math.max(0, now - ts)
local b = {}
for n = 1, 3 do
  local rate, cap = tonumber(ARGV[2 * n]), tonumber(ARGV[2 * n + 1])
  if rate > 0 then
    local per_ms = rate / 60000
    local level = tonumber(stored[n + 1]) or cap
    b[n] = {per_ms = per_ms, cap = cap, level = math.min(cap, level + elapsed * per_ms)}
  end
end

-- Writes the levels back; the key expires once every bucket would be full again anyway.
local function save()
  local args, refill_ms = {'ts', string.format('%.0f', math.max(now, ts))}, 0
  for n = 1, 3 do
    if b[n] then
      args[#args + 1] = names[n]
      args[#args + 1] = string.format('%.17g', b[n].level)
      refill_ms = math.max(refill_ms, (b[n].cap - b[n].level) / b[n].per_ms)
    end
  end
  redis.call('HSET', key, unpack(args))
  redis.call('PEXPIRE', key, math.ceil(refill_ms) + 60000)
end
