-- Shared prelude of the rate-limit scripts (Rust prepends it to each): loads and refills the token
-- buckets of one provider+model. Hash fields: r, i, o (levels of the request, input-token and
-- output-token buckets; a missing level is a full bucket; a level may be negative: debt), ts (the
-- latest time the buckets were refilled to, Unix ms from the callers), and while the provider is
-- overloaded the adaptive request bucket: ar (its rate per minute), ac (the rate it grows back to),
-- al (its level). gw, gc, gp count grants per 10 s (window number, this window, the one before) since
-- g0 (the first counted grant), from which the adaptive rate starts when no requests-per-minute
-- limit is configured.
-- KEYS: rate   ARGV[1]: now ms; ARGV[2..7]: per-minute rate and capacity of r, i, o (rate 0 =
-- unlimited, no bucket); ARGV[8]: 1 to count grants; the operation's own arguments start at ARGV[9].
local key = KEYS[1]
local now = tonumber(ARGV[1])
local names = {'r', 'i', 'o', 'al'}
local stored = redis.call('HMGET', key, 'ts', 'r', 'i', 'o', 'al', 'ar')
local ts = tonumber(stored[1]) or now
-- A caller whose clock is behind the latest one refills nothing and never moves time back.
local elapsed = math.max(0, now - ts)
local b = {}
local function bucket(n, rate, cap)
  local per_ms = rate / 60000
  local level = tonumber(stored[n + 1]) or cap
  b[n] = {per_ms = per_ms, cap = cap, level = math.min(cap, level + elapsed * per_ms)}
end
for n = 1, 3 do
  local rate, cap = tonumber(ARGV[2 * n]), tonumber(ARGV[2 * n + 1])
  if rate > 0 then bucket(n, rate, cap) end
end
-- The adaptive bucket holds 2 s worth of its rate, at least one request.
local adaptive = tonumber(stored[6])
if adaptive then bucket(4, adaptive, math.max(1, adaptive / 30)) end

-- Writes the levels back (and, when asked, counts the grants: ARGV[9], the requests of this call, and
-- ARGV[12], those a worker let through on its own since its last call); the key expires once every bucket
-- would be full again anyway, and at least a minute after the last write.
local function save(grant)
  local args, refill_ms = {'ts', string.format('%.0f', math.max(now, ts))}, 0
  for n = 1, 4 do
    if b[n] then
      args[#args + 1] = names[n]
      args[#args + 1] = string.format('%.17g', b[n].level)
      refill_ms = math.max(refill_ms, (b[n].cap - b[n].level) / b[n].per_ms)
    end
  end
  if grant and ARGV[8] == '1' then
    local g = redis.call('HMGET', key, 'gw', 'gc', 'g0')
    local win, gw, gc = math.floor(now / 10000), tonumber(g[1]), tonumber(g[2]) or 0
    if not g[3] then
      args[#args + 1] = 'g0'
      args[#args + 1] = string.format('%.0f', now)
    end
    local granted = (tonumber(ARGV[9]) or 1) + (tonumber(ARGV[12]) or 0)
    if gw == win then
      gc = gc + granted
    else
      args[#args + 1] = 'gp'
      args[#args + 1] = (gw == win - 1) and gc or 0
      gc = granted
    end
    args[#args + 1] = 'gw'
    args[#args + 1] = string.format('%.0f', win)
    args[#args + 1] = 'gc'
    args[#args + 1] = gc
  end
  redis.call('HSET', key, unpack(args))
  redis.call('PEXPIRE', key, math.ceil(refill_ms) + 60000)
end
