-- The outcome of a call that `check` let through. Returns the transition: '', 'opened', 'ramped',
-- 'closed' or 'reopened'.
-- Closed: the outcome is counted in the time bucket of `now` (fields n<bucket> calls, f<bucket>
-- failures; buckets older than the window are dropped). A failure that leaves at least `min calls`
-- in the window, `failure rate` of them failed, opens the breaker (the buckets are dropped).
-- Half-open: only the trials of this half-open spell count (fields sc, sf: calls and failures of
-- the stage). A failure that brings the stage's failures to `failure rate` reopens it; a success
-- once the stage has lasted its interval moves to the next stage, or closes the breaker after the
-- last one. Open: nothing counts (the call started before it opened).
-- Successes of plain calls a worker has not reported one by one (it batches them while the breaker is
-- closed) come as a count with the next report, and are counted in the closed window with it.
-- KEYS: breaker   ARGV: now ms, trial gen (0: a plain call), success (0|1), failure rate, min calls,
--   window ms, buckets, cool-down ms, ramp interval ms, stages, key ttl ms, batched successes
local key = KEYS[1]
local now, gen, success = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local rate, min_calls = tonumber(ARGV[4]), tonumber(ARGV[5])
local window, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
local cool, ramp, stages, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local f = redis.call('HMGET', key, 'state', 'gen', 'stage', 'stage_until', 'sc', 'sf')
local state = f[1] or 'closed'

local function open(calls, fails)
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'open', 'until', string.format('%.0f', now + cool), 'calls', calls,
    'failures', fails)
  redis.call('PEXPIRE', key, ttl)
end

if state == 'closed' then
  local width = math.max(1, math.floor(window / buckets))
  local cur = math.floor(now / width)
  redis.call('HINCRBY', key, 'n' .. string.format('%.0f', cur), 1 + (tonumber(ARGV[12]) or 0))
  if not success then redis.call('HINCRBY', key, 'f' .. string.format('%.0f', cur), 1) end
  local all = redis.call('HGETALL', key)
  local calls, fails, stale = 0, 0, {}
  for i = 1, #all, 2 do
    local kind, b = string.match(all[i], '^([nf])(%d+)$')
    if kind then
      if tonumber(b) <= cur - buckets then
        stale[#stale + 1] = all[i]
      elseif kind == 'n' then
        calls = calls + tonumber(all[i + 1])
      else
        fails = fails + tonumber(all[i + 1])
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if not success and calls >= min_calls and fails >= rate * calls - 1e-9 then
    open(calls, fails)
    return 'opened'
  end
  redis.call('PEXPIRE', key, ttl)
  return ''
end
if state ~= 'half_open' or gen == 0 or gen ~= tonumber(f[2] or '0') then return '' end
local sc, sf = tonumber(f[5] or '0') + 1, tonumber(f[6] or '0')
if not success then sf = sf + 1 end
if not success and sf >= rate * sc - 1e-9 then
  open(sc, sf)
  return 'reopened'
end
local stage, stage_until = tonumber(f[3] or '0'), tonumber(f[4] or '0')
if success and now >= stage_until then
  if stage + 1 >= stages then
    redis.call('DEL', key)
    return 'closed'
  end
  redis.call('HSET', key, 'stage', stage + 1, 'stage_until', string.format('%.0f', now + ramp), 'seen', 0,
    'adm', 0, 'sc', 0, 'sf', 0)
  redis.call('PEXPIRE', key, ttl)
  return 'ramped'
end
redis.call('HSET', key, 'sc', sc, 'sf', sf)
redis.call('PEXPIRE', key, ttl)
return ''
