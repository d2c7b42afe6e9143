-- May a call go through the breaker? Read-only while closed; flips open to half-open for the one probe.
-- Hash fields: state (closed|open|half_open, missing = closed), failures, until (open: end of the
-- cool-down; half_open: expiry of the probe slot), all times Unix ms from the callers.
-- KEYS: breaker   ARGV: now ms, probe timeout ms, key ttl ms
-- Returns {verdict, retry_after_ms}: {'allow', 0}, {'probe', 0} or {'deny', ms}.
local key = KEYS[1]
local now, probe_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local f = redis.call('HMGET', key, 'state', 'until')
local state, till = f[1], tonumber(f[2] or '0')
if state ~= 'open' and state ~= 'half_open' then return {'allow', 0} end
-- Open and cooling down, or half-open with a probe still out: wait.
if now < till then return {'deny', till - now} end
-- The cool-down is over, or the last probe never reported: this caller, and only it, probes.
redis.call('HSET', key, 'state', 'half_open', 'until', string.format('%.0f', now + probe_ms))
redis.call('PEXPIRE', key, ARGV[3])
return {'probe', 0}
