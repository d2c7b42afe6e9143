-- May a call go through the breaker? Reads only while closed (a healthy breaker costs no write);
-- turns a cooled-down open breaker half-open; while half-open, lets through its stage's share of
-- the calls that ask, counted fleet-wide (the first call of each stage always goes through).
-- Hash fields: state (closed|open|half_open, missing = closed); open: until (end of the cool-down);
-- half_open: gen (when it turned half-open: names this half-open spell), stage (0-based index into
-- the shares), stage_until (earliest end of the stage), seen and adm (calls that asked and were let
-- through in this stage). Times are Unix ms from the callers.
-- KEYS: breaker   ARGV: now ms, ramp interval ms, key ttl ms, the shares of each stage...
-- Returns {verdict, retry_after_ms, gen}: {'allow', 0, 0}, {'trial', 0, gen} or {'deny', ms, 0}.
local key = KEYS[1]
local now, ramp = tonumber(ARGV[1]), tonumber(ARGV[2])
local f = redis.call('HMGET', key, 'state', 'until', 'gen', 'stage', 'stage_until', 'seen', 'adm')
local state = f[1]
if state ~= 'open' and state ~= 'half_open' then return {'allow', 0, 0} end
if state == 'open' then
  local till = tonumber(f[2] or '0')
  if now < till then return {'deny', till - now, 0} end
  -- The cool-down is over: half-open, and this caller is the stage's first call.
  redis.call('HDEL', key, 'until')
  redis.call('HSET', key, 'state', 'half_open', 'gen', string.format('%.0f', now), 'stage', 0,
    'stage_until', string.format('%.0f', now + ramp), 'seen', 1, 'adm', 1, 'sc', 0, 'sf', 0)
  redis.call('PEXPIRE', key, ARGV[3])
  return {'trial', 0, now}
end
local stage, stage_until = tonumber(f[4] or '0'), tonumber(f[5] or '0')
local seen, adm = tonumber(f[6] or '0'), tonumber(f[7] or '0')
local share = tonumber(ARGV[4 + stage] or '1')
redis.call('HINCRBY', key, 'seen', 1)
redis.call('PEXPIRE', key, ARGV[3])
-- Let through the calls that keep the admitted share at or under the stage's share.
if adm < math.ceil((seen + 1) * share - 1e-9) then
  redis.call('HINCRBY', key, 'adm', 1)
  return {'trial', 0, tonumber(f[3] or '0')}
end
return {'deny', math.max(1000, stage_until - now), 0}
