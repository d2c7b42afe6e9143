-- AIMD on the adaptive request bucket of one provider+model (fields ar, ac, al: see buckets.lua).
-- An overload (529 or 429) starts it at the configured requests per minute, or at the rate the
-- fleet was granted over the last 1-20 s (gw, gc, gp), and multiplies it by `decrease`; a success
-- adds `increase` × the starting rate; back at the start, the bucket is gone. Never below `floor`.
-- Without a configured rate, each overload also raises the starting rate to what the fleet was
-- granted over the last 1-20 s when that is more: grants a worker let through on its own are only
-- counted with its next call, so the first overload of a busy fleet can see a fraction of its rate,
-- and a storm must not hold the fleet at that fraction.
-- A success while no adaptive bucket exists reads one field and writes nothing.
-- KEYS: rate   ARGV: now ms, signal (ok|overload), configured rpm (0: none), floor rpm, decrease,
--   increase, ttl ms, grants this worker let through on its own and has not counted yet
-- Returns the adaptive rate per minute as text, '' when there is none.
local key = KEYS[1]
local now, overload = tonumber(ARGV[1]), ARGV[2] == 'overload'
local configured, floor = tonumber(ARGV[3]), tonumber(ARGV[4])
local decrease, increase = tonumber(ARGV[5]), tonumber(ARGV[6])
local f = redis.call('HMGET', key, 'ar', 'ac')
local rate, ceiling = tonumber(f[1]), tonumber(f[2])
local function text(x) return string.format('%.3f', x) end
if not overload then
  if not rate then return '' end
  rate = rate + increase * ceiling
  if rate >= ceiling then
    redis.call('HDEL', key, 'ar', 'ac', 'al')
    return ''
  end
  redis.call('HSET', key, 'ar', string.format('%.17g', rate))
  return text(rate)
end
-- The grants of this 10 s window and the one before (this worker's uncounted ones added), over the
-- time they span (at least 1 s, and no more than counting has run: a fresh count is not diluted by
-- windows it never saw), per minute.
local function granted_rate()
  local g = redis.call('HMGET', key, 'gw', 'gc', 'gp', 'g0')
  local win, gw = math.floor(now / 10000), tonumber(g[1])
  local gc, gp, g0 = tonumber(g[2]) or 0, tonumber(g[3]) or 0, tonumber(g[4]) or now
  local extra = tonumber(ARGV[8]) or 0
  if extra > 0 then
    if gw == win then
      gc = gc + extra
    else
      gp, gc = (gw == win - 1) and gc or 0, extra
      gw = win
    end
    redis.call('HSET', key, 'gw', string.format('%.0f', win), 'gc', gc, 'gp', gp, 'g0', string.format('%.0f', g0))
  end
  local count, span = 0, 1000
  if gw == win then
    count, span = gc + gp, now - (win - 1) * 10000
  elseif gw == win - 1 then
    count, span = gc, now - (win - 1) * 10000
  end
  return count * 60000 / math.max(1000, math.min(span, now - g0))
end
if configured <= 0 then
  ceiling = math.max(ceiling or 0, granted_rate())
elseif not rate then
  ceiling = configured
end
ceiling = math.max(floor, ceiling)
rate = rate or ceiling
rate = math.max(floor, rate * decrease)
redis.call('HSET', key, 'ar', string.format('%.17g', rate), 'ac', string.format('%.17g', ceiling))
redis.call('PEXPIRE', key, ARGV[7])
return text(rate)
